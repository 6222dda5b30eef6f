"""SFT rows -> rendered token ids + assistant-only loss masks, with rejected rows reported.

Rows follow the sft schema (megarl.data.schemas: messages + tools, or ShareGPT) and pass the
structural checks of megarl.data.checks. A row that fails a check, or is longer than the token
budget, is rejected (never truncated) and written with its reason to the rejected-rows file, or
stops the run when data.on_bad_row is "fail" (the first problem of each row is reported).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass

from megarl.data.checks import CheckContext, check_row
from megarl.data.readers import DatasetError, read_rows
from megarl.data.render import Rendered, RenderError, render_messages
from megarl.data.schemas import RowError, normalize


@dataclass
class Rejected:
    row: int
    kind: str
    detail: str


class SFTDataset:
    """All rows rendered once at start-up; `rejected` lists what was left out and why."""

    def __init__(self, path: str, tokenizer, max_length: int, fmt: str = "auto", on_bad_row: str = "reject",
                 rejected_path: str | None = None):
        self.samples: list[Rendered] = []
        self.rows: list[int] = []
        self.rejected: list[Rejected] = []
        ctx = CheckContext()
        for n, raw in read_rows(path, fmt):
            try:
                row = normalize(raw, "sft")
                problems = check_row(row, "sft", ctx)
            except RowError as e:
                problems = [(e.kind, e.detail)]
            problem = problems[0] if problems else None
            if problem is None:
                try:
                    rendered = render_messages(tokenizer, row.messages, row.tools)
                except (RenderError, Exception) as e:  # noqa: BLE001 - template errors name the row
                    problem = ("render_failed", str(e))
                else:
                    if len(rendered) > max_length:
                        problem = ("too_long", f"{len(rendered)} tokens > data.max_length {max_length}")
                    elif sum(rendered.loss_mask) == 0:
                        problem = ("no_trainable_tokens", "the assistant turns render to no tokens")
            if problem:
                self.rejected.append(Rejected(n, *problem))
                continue
            self.samples.append(rendered)
            self.rows.append(n)
        if self.rejected:
            self._report(path, on_bad_row, rejected_path)
        if not self.samples:
            raise DatasetError(f"{path}: no usable rows ({len(self.rejected)} rejected)")

    def _report(self, path: str, on_bad_row: str, rejected_path: str | None) -> None:
        counts = Counter(r.kind for r in self.rejected)
        first = {}
        for r in self.rejected:
            first.setdefault(r.kind, r)
        summary = "; ".join(f"{k}: {c} (e.g. row {first[k].row}: {first[k].detail})" for k, c in counts.items())
        if on_bad_row == "fail":
            raise DatasetError(f"{path}: {len(self.rejected)} bad rows - {summary}")
        if rejected_path:
            os.makedirs(os.path.dirname(os.path.abspath(rejected_path)), exist_ok=True)
            with open(rejected_path, "w") as f:
                for r in self.rejected:
                    f.write(json.dumps({"row": r.row, "kind": r.kind, "detail": r.detail}) + "\n")
        self.report = f"{path}: rejected {len(self.rejected)} rows - {summary}" + (
            f"; listed in {rejected_path}" if rejected_path else "")

    def __len__(self) -> int:
        return len(self.samples)
