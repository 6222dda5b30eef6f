"""Preference (rm, dpo) and KTO rows -> rendered token sequences, with rejected rows reported.

Every training example is a small tuple of *segments*, each a full rendered conversation
(prompt + one completion) with its assistant-only loss mask:

- pairs (rm, dpo):  (chosen, rejected)
- kto:              (completion, kl_partner) where kl_partner is this row's prompt with the
                    completion of another row: KTO's KL baseline z0 is estimated on such
                    mismatched pairs (Ethayarajh et al. 2024, sec. 4). The partner is the next row
                    (in file order, wrapping) whose completion fits the token budget with this
                    prompt, so the pairing is fixed and its reference log-probs can be precomputed.

Rows follow the schemas of megarl.data.schemas and pass megarl.data.checks; a row that fails a
check, renders too long (data.max_length), or whose chosen and rejected render identically is
rejected (never truncated) and written with its reason to the rejected-rows file, or stops the run
when data.on_bad_row is "fail".
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from megarl.data.checks import CheckContext, DataReport, check_row
from megarl.data.readers import DatasetError, read_rows
from megarl.data.render import Rendered, render_messages
from megarl.data.schemas import RowError, normalize


@dataclass
class Example:
    """One training example: its segments, the source row (1-based) and, for KTO, the label."""

    segments: tuple[Rendered, ...]
    row: int
    desirable: bool | None = None
    margin: float | None = None
    """Reward-model pairs: the row's `margin` (Llama 2's Bradley–Terry margin), when asked for."""


class PreferenceDataset:
    """All rows rendered once at start-up; `kind` is "preference" (pairs) or "kto"."""

    def __init__(self, path: str, kind: str, tokenizer, max_length: int, fmt: str = "auto",
                 on_bad_row: str = "reject", rejected_path: str | None = None, margin: bool = False):
        if kind not in ("preference", "kto"):
            raise ValueError(f"kind must be preference or kto, got {kind!r}")
        self.kind, self.path = kind, path
        self.examples: list[Example] = []
        self.report = DataReport(path, kind)
        ctx = CheckContext()
        kto_rows: list[tuple[int, dict, object, Rendered]] = []
        for n, raw in read_rows(path, fmt):
            self.report.total += 1
            problems, rendered, row = self._render(n, raw, ctx, tokenizer, max_length)
            for k, detail in problems:
                self.report.add(n, raw, k, detail)
            if problems:
                continue
            if kind == "preference":
                value = raw.get("margin")
                if margin and (isinstance(value, bool) or not isinstance(value, (int, float))):
                    self.report.add(n, raw, "bad_margin", f"preference.margin is on: expected a number in "
                                    f"'margin', got {value!r}")
                    continue
                self.examples.append(Example((rendered["chosen"], rendered["rejected"]), n,
                                             margin=float(value) if margin else None))
            else:
                kto_rows.append((n, raw, row, rendered["completion"]))
        if kind == "kto" and kto_rows:
            self._pair_kto(kto_rows, tokenizer, max_length)
        if self.report.rejected and on_bad_row == "fail":
            raise DatasetError(self.report.render())
        if self.report.rejected and rejected_path:
            os.makedirs(os.path.dirname(os.path.abspath(rejected_path)), exist_ok=True)
            self.report.write_rejected(rejected_path)
        if not self.examples:
            raise DatasetError(f"{path}: no usable rows\n{self.report.render()}")

    def _render(self, n: int, raw: dict, ctx, tokenizer, max_length: int):
        try:
            row = normalize(raw, self.kind)
            problems = check_row(row, self.kind, ctx)
        except RowError as e:
            return [(e.kind, e.detail)], {}, None
        if problems:
            return problems, {}, row
        rendered = {}
        for name, completion in row.completions.items():
            try:
                r = render_messages(tokenizer, row.messages + completion, row.tools)
            except Exception as e:  # noqa: BLE001 - template errors name the row
                return [("render_failed", f"{name}: {e}")], {}, row
            if len(r) > max_length:
                return [("too_long", f"{name}: {len(r)} tokens > data.max_length {max_length}")], {}, row
            if sum(r.loss_mask) == 0:
                return [("no_trainable_tokens", f"{name}: the assistant turns render to no tokens")], {}, row
            rendered[name] = r
        if self.kind == "preference" and rendered["chosen"].input_ids == rendered["rejected"].input_ids:
            return [("identical_pair", "chosen and rejected render to the same tokens: nothing to prefer")], {}, row
        return [], rendered, row

    def _pair_kto(self, rows: list, tokenizer, max_length: int) -> None:
        n = len(rows)
        for i, (row_number, raw, row, completion) in enumerate(rows):
            partner = None
            for step in range(1, n):
                other = rows[(i + step) % n][2]
                r = render_messages(tokenizer, row.messages + other.completions["completion"], row.tools,
                                    check_whole=False)
                if len(r) <= max_length:
                    partner = r
                    break
            if partner is None:
                # a single usable row (or none that fits) has no mismatched partner: say so
                self.report.add(row_number, raw, "no_kl_partner",
                                "no other row's completion fits data.max_length with this prompt (KTO's KL "
                                "baseline needs mismatched prompt/completion pairs); add rows or raise max_length")
                continue
            self.examples.append(Example((completion, partner), row_number, bool(row.label)))

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def num_desirable(self) -> int:
        return sum(1 for e in self.examples if e.desirable)
