"""SFT rows -> rendered token ids + assistant-only loss masks, with rejected rows reported.

Rows follow the sft schema (megarl.data.schemas: messages + tools, or ShareGPT) and pass the
structural checks of megarl.data.checks. A row that fails a check, or is longer than the token
budget, is rejected (never truncated) and written with its reason to the rejected-rows file, or
stops the run when data.on_bad_row is "fail" (the first problem of each row is reported).
"""

from __future__ import annotations

import os

from megarl.data.checks import CheckContext, DataReport, check_row
from megarl.data.readers import DatasetError, read_rows
from megarl.data.render import Rendered, RenderError, render_messages
from megarl.data.schemas import RowError, normalize


class SFTDataset:
    """All rows rendered once at start-up; `report` (a DataReport) says what was left out and why."""

    def __init__(self, path: str, tokenizer, max_length: int, fmt: str = "auto", on_bad_row: str = "reject",
                 rejected_path: str | None = None):
        self.samples: list[Rendered] = []
        self.rows: list[int] = []
        self.report = DataReport(path, "sft")
        ctx = CheckContext()
        for n, raw in read_rows(path, fmt):
            self.report.total += 1
            try:
                row = normalize(raw, "sft")
                problems = check_row(row, "sft", ctx)
            except RowError as e:
                problems = [(e.kind, e.detail)]
            if not problems:
                try:
                    rendered = render_messages(tokenizer, row.messages, row.tools)
                except (RenderError, Exception) as e:  # noqa: BLE001 - template errors name the row
                    problems = [("render_failed", str(e))]
                else:
                    if len(rendered) > max_length:
                        problems = [("too_long", f"{len(rendered)} tokens > data.max_length {max_length}")]
                    elif sum(rendered.loss_mask) == 0:
                        problems = [("no_trainable_tokens", "the assistant turns render to no tokens")]
            for kind, detail in problems:
                self.report.add(n, raw, kind, detail)
            if not problems:
                self.samples.append(rendered)
                self.rows.append(n)
        if self.report.rejected and on_bad_row == "fail":
            raise DatasetError(self.report.render())
        if self.report.rejected and rejected_path:
            os.makedirs(os.path.dirname(os.path.abspath(rejected_path)), exist_ok=True)
            self.report.write_rejected(rejected_path)
        if not self.samples:
            raise DatasetError(f"{path}: no usable rows\n{self.report.render()}")

    def __len__(self) -> int:
        return len(self.samples)
