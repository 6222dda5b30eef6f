"""RL prompt rows -> prompt token ids (ending with the assistant header) + reward metadata.

The prompt is rendered by `render_prompt`, the same function the rollout's agent loop continues
from, so training and rollout see identical tokens. Rows that fail a check or are longer than
`max_prompt_length` are rejected (never truncated) and reported; `on_bad_row: fail` stops instead.
Lines that are not rows (bad JSON or encoding, not an object) are rejected the same way, and so
are rows without a metadata key the recipe's reward functions read (`required_metadata`, given by
the caller as {key: reward function names}: e.g. numeric_match needs ground_truth).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megarl.data.checks import CheckContext, DataReport, check_row
from megarl.data.readers import DatasetError, read_rows
from megarl.data.render import render_prompt
from megarl.data.schemas import RowError, normalize


@dataclass
class Prompt:
    row: int
    prompt_ids: list[int]
    messages: list[dict]
    tools: list[dict] | None
    metadata: dict = field(default_factory=dict)
    """Everything else in the row (e.g. ground_truth), routed to the reward functions."""


class PromptDataset:
    def __init__(self, path: str, tokenizer, max_prompt_length: int, tools: set[str] | None = None,
                 fmt: str = "auto", on_bad_row: str = "reject", extra_tools: list[dict] | None = None,
                 required_metadata: dict[str, list[str]] | None = None):
        self.prompts: list[Prompt] = []
        self.report = DataReport(path, "grpo")
        ctx = CheckContext(tools=tools, required_metadata=required_metadata)
        for n, raw in read_rows(path, fmt):
            self.report.total += 1
            try:
                row = normalize(raw, "prompts")
            except RowError as e:
                self.report.add(n, raw, e.kind, e.detail)
                continue
            problems = check_row(row, "prompts", ctx)
            for kind, detail in problems:
                self.report.add(n, raw, kind, detail)
            if problems:
                continue
            row_tools = row.tools if row.tools is not None else extra_tools
            try:
                ids = render_prompt(tokenizer, row.messages, row_tools)
            except Exception as e:  # noqa: BLE001 - a template that cannot render this row names the row
                self.report.add(n, raw, "render_failed", str(e).strip()[:200])
                continue
            if len(ids) > max_prompt_length:
                self.report.add(n, raw, "prompt_too_long", f"prompt has {len(ids)} tokens > max prompt length "
                                                           f"{max_prompt_length}")
                continue
            self.prompts.append(Prompt(n, ids, row.messages, row_tools, row.metadata))
        if self.report.rejected and on_bad_row == "fail":
            raise DatasetError(self.report.render())
        if not self.prompts:
            raise DatasetError(f"{path}: no usable prompts\n{self.report.render()}")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> Prompt:
        return self.prompts[i]
