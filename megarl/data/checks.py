"""Dataset validation with a report: every problem kind, how many rows, which rows, an example.

Problem kinds: bad_encoding, bad_json, not_an_object (a line that is not a row: see readers.py),
bad_schema, no_messages, bad_role, bad_content, bad_role_order, tool_result_without_call,
call_without_result, malformed_tool_call, unknown_tool, repeated_tool_call, tool_output_too_long,
empty_prompt, identical_pair, missing_metadata (a key the recipe's reward functions read, e.g.
ground_truth), prompt_too_long, too_long, prompt_mismatch, bad_label, render_failed (the training
sets add no_trainable_tokens, bad_margin and no_kl_partner: see sft.py and preference.py). A row
with any problem is rejected (never truncated or silently fixed); the recipe's `data.on_bad_row`
decides whether rejected rows stop the run.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from megarl.data.readers import BadRow, read_rows
from megarl.data.schemas import STAGE_KINDS, Row, RowError, normalize

ROLES = ("system", "user", "assistant", "tool")
TEXT_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


@dataclass
class CheckContext:
    tools: set[str] | None = None          # declared tool names (recipe); rows may add their own
    tokenizer: object | None = None        # enables the token-length checks
    max_prompt_length: int | None = None   # RL prompts, preference/kto prompts
    max_length: int | None = None          # whole sequences (sft, preference, kto)
    max_tool_output_tokens: int | None = None
    loop_threshold: int = 3                # identical tool calls allowed in one conversation
    required_metadata: dict[str, list[str]] | None = None
    """RL prompts: {metadata key: the reward functions that read it}; a row without the key is
    rejected. Plain strings from the caller (the recipe's reward functions), so data never imports reward."""


@dataclass
class DataReport:
    path: str
    stage: str
    total: int = 0
    problems: dict[str, list[tuple[int, str]]] = field(default_factory=lambda: defaultdict(list))
    rejected_rows: dict[int, dict] = field(default_factory=dict)

    @property
    def rejected(self) -> int:
        return len(self.rejected_rows)

    def add(self, row_number: int, raw: dict, kind: str, detail: str) -> None:
        self.problems[kind].append((row_number, detail))
        self.rejected_rows.setdefault(row_number, raw.text if isinstance(raw, BadRow) else raw)

    def render(self, max_rows: int = 10) -> str:
        lines = [f"{self.path}: {self.total} rows, stage {self.stage}: {self.total - self.rejected} ok, "
                 f"{self.rejected} rejected"]
        for kind, hits in sorted(self.problems.items(), key=lambda kv: -len(kv[1])):
            rows = ", ".join(str(r) for r, _ in hits[:max_rows]) + (" ..." if len(hits) > max_rows else "")
            lines.append(f"  {kind}: {len(hits)} (rows {rows})")
            lines.append(f"      e.g. row {hits[0][0]}: {hits[0][1]}")
        return "\n".join(lines)

    def write_rejected(self, path: str) -> None:
        reasons = defaultdict(list)
        for kind, hits in self.problems.items():
            for row, detail in hits:
                reasons[row].append({"kind": kind, "detail": detail})
        with open(path, "w") as f:
            for row in sorted(self.rejected_rows):
                f.write(json.dumps({"row": row, "problems": reasons[row], "data": self.rejected_rows[row]}) + "\n")

    def summary(self) -> dict:
        return {"rows": self.total, "rejected": self.rejected,
                "problems": dict(Counter({k: len(v) for k, v in self.problems.items()}))}


def _call_name_args(call) -> tuple[str | None, object]:
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict):
        return None, None
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return fn.get("name"), None
    return fn.get("name"), args if isinstance(args, dict) else None


def check_conversation(messages: list[dict], tools: set[str] | None, ctx: CheckContext,
                       ends_with_prompt: bool = False) -> list[tuple[str, str]]:
    """Structural checks of one message list."""
    problems: list[tuple[str, str]] = []
    pending = 0
    seen_calls: Counter = Counter()
    prev = None
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            return [("bad_role", f"message {i}: role must be one of {', '.join(ROLES)}, got {role!r}")]
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            problems.append(("bad_content", f"message {i}: content must be text"))
        if content is None and not (role == "assistant" and m.get("tool_calls")):
            problems.append(("bad_content", f"message {i} ({role}): content is missing"))
        if role == "system" and i != 0:
            problems.append(("bad_role_order", f"message {i}: a system message after the first turn"))
        first_turn = prev is None or (prev == "system" and i == 1)
        if first_turn and role not in ("user", "system" if prev is None else "user"):
            problems.append(("bad_role_order", f"message {i}: the conversation must start with a user turn, "
                                               f"not {role}"))
        if role == prev and role in ("user", "assistant"):
            problems.append(("bad_role_order", f"message {i}: two {role} turns in a row"))
        if role == "tool":
            if pending == 0:
                problems.append(("tool_result_without_call", f"message {i}: a tool result no call asked for"))
            else:
                pending -= 1
            if ctx.max_tool_output_tokens and isinstance(content, str):
                n = (len(ctx.tokenizer(content, add_special_tokens=False)["input_ids"]) if ctx.tokenizer
                     else len(content) // 4)
                if n > ctx.max_tool_output_tokens:
                    problems.append(("tool_output_too_long", f"message {i}: {n} tokens > budget "
                                                             f"{ctx.max_tool_output_tokens}"))
        else:
            if pending:
                problems.append(("call_without_result", f"message {i - 1}: {pending} tool call(s) got no result"))
                pending = 0
        if role == "assistant":
            structured = m.get("tool_calls") or []
            if not isinstance(structured, list):
                problems.append(("malformed_tool_call", f"message {i}: 'tool_calls' must be a list"))
                structured = []
            calls = list(structured)
            for j, block in enumerate(TEXT_TOOL_CALL.findall(content if isinstance(content, str) else "")):
                try:
                    calls.append(json.loads(block))
                except json.JSONDecodeError:
                    problems.append(("malformed_tool_call", f"message {i}: <tool_call> block {j} is not JSON"))
            for call in calls:
                name, args = _call_name_args(call)
                if not isinstance(name, str) or args is None:
                    problems.append(("malformed_tool_call", f"message {i}: a tool call needs a name and a JSON "
                                                            f"object of arguments, got {json.dumps(call)[:120]}"))
                    continue
                if tools is not None and name not in tools:
                    problems.append(("unknown_tool", f"message {i}: tool {name!r} is not declared "
                                                     f"(declared: {', '.join(sorted(tools)) or 'none'})"))
                key = (name, json.dumps(args, sort_keys=True))
                seen_calls[key] += 1
                if seen_calls[key] == ctx.loop_threshold:
                    problems.append(("repeated_tool_call", f"message {i}: {name}({key[1][:80]}) called "
                                                           f"{ctx.loop_threshold} times"))
            pending += len(structured)
        prev = role
    if pending and not ends_with_prompt:
        problems.append(("call_without_result", f"message {len(messages) - 1}: {pending} tool call(s) got no result"))
    return problems


def _declared(row: Row, ctx: CheckContext) -> set[str] | None:
    names = set(ctx.tools or ())
    for t in row.tools or []:
        fn = t.get("function", t) if isinstance(t, dict) else {}
        if isinstance(fn.get("name"), str):
            names.add(fn["name"])
    return names if (ctx.tools is not None or row.tools) else None


def check_row(row: Row, kind: str, ctx: CheckContext) -> list[tuple[str, str]]:
    tools = _declared(row, ctx)
    if kind == "sft":
        problems = check_conversation(row.messages, tools, ctx)
        if not any(m.get("role") == "assistant" for m in row.messages if isinstance(m, dict)):
            problems.append(("no_assistant_turn", "nothing to train on: no assistant message"))
        return problems
    if kind == "prompts":
        problems = check_conversation(row.messages, tools, ctx, ends_with_prompt=True) + _empty_prompt(row)
        if row.messages and isinstance(row.messages[-1], dict) and row.messages[-1].get("role") not in ("user", "tool"):
            problems.append(("bad_role_order", "a prompt must end with a user (or tool) turn"))
        for key, needed_by in (ctx.required_metadata or {}).items():
            if row.metadata.get(key) is None:
                fns = ("reward function " if len(needed_by) == 1 else "reward functions ") + ", ".join(needed_by)
                problems.append(("missing_metadata", f"no {key!r} in the row (needed by {fns})"))
        return problems
    problems = check_conversation(row.messages, tools, ctx, ends_with_prompt=True) + _empty_prompt(row)
    if "chosen" in row.completions and row.completions["chosen"] == row.completions.get("rejected"):
        problems.append(("identical_pair", "chosen equals rejected: nothing to learn"))
    for name, completion in row.completions.items():
        problems += [(k, f"{name}: {d}") for k, d in check_conversation(row.messages + completion, tools, ctx)
                     if k not in {k2 for k2, _ in problems}]
        if not any(m.get("role") == "assistant" for m in completion if isinstance(m, dict)):
            problems.append(("bad_schema", f"{name}: has no assistant turn"))
    return problems


def _empty_prompt(row: Row) -> list[tuple[str, str]]:
    """A prompt with no user text (no messages, or only empty/whitespace user turns) asks nothing."""
    if any(isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str)
           and m["content"].strip() for m in row.messages):
        return []
    return [("empty_prompt", "the prompt has no user content" if row.messages else "the prompt has no messages")]


def _texts_for_length(row: Row, kind: str, tokenizer) -> dict[str, str]:
    """Rendered texts whose token counts the length checks compare with the budgets."""
    def render(msgs, gen=False):
        return tokenizer.apply_chat_template(msgs, tools=row.tools or None, tokenize=False,
                                             add_generation_prompt=gen)

    if kind == "sft":
        return {"whole": render(row.messages)}
    out = {"prompt": render(row.messages, gen=True)}
    for name, completion in row.completions.items():
        out[name] = render(row.messages + completion)
    return out


def _check_rows(rows: list[tuple[int, dict]], kind: str, ctx: CheckContext) -> list[tuple[int, str, str]]:
    """(row, problem kind, detail) for a chunk of rows, lengths tokenized in one batch."""
    found: list[tuple[int, str, str]] = []
    pending: list[tuple[int, str, str]] = []
    for n, raw in rows:
        try:
            row = normalize(raw, kind)
        except RowError as e:
            found.append((n, e.kind, e.detail))
            continue
        problems = check_row(row, kind, ctx)
        found += [(n, k, d) for k, d in problems]
        if ctx.tokenizer is not None and not problems:
            try:
                pending += [(n, part, text) for part, text in _texts_for_length(row, kind, ctx.tokenizer).items()]
            except Exception as e:  # noqa: BLE001 - a template that cannot render this row
                found.append((n, "render_failed", str(e)[:200]))
    if pending:
        lengths = TokenCounter.of(ctx.tokenizer).count([t for *_, t in pending])
        for (n, part, _), length in zip(pending, lengths):
            if part == "prompt" and ctx.max_prompt_length and length > ctx.max_prompt_length:
                found.append((n, "prompt_too_long", f"prompt has {length} tokens > max prompt length "
                                                    f"{ctx.max_prompt_length}"))
            elif part != "prompt" and ctx.max_length and length > ctx.max_length:
                found.append((n, "too_long", f"{part}: {length} tokens > max length {ctx.max_length}"))
    return found


class TokenCounter:
    """Exact token counts of many chat-rendered texts, fast.

    HF tokenizers split text at special tokens first and tokenize the pieces independently, so a
    text's count is the number of special tokens plus the counts of the pieces between them. Chat
    datasets repeat most pieces (system prompt, tool schemas, role headers), so each distinct piece
    is tokenized once. The equivalence is verified against whole-text tokenization on the first
    texts seen; a tokenizer for which it fails is counted whole, text by text."""

    VERIFY = 32
    _instances: dict[int, TokenCounter] = {}

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        specials = sorted({t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
                           if getattr(t, "special", False)}, key=len, reverse=True)
        self.split = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
        self.specials = set(specials)
        self.cache: dict[str, int] = {}
        self.verified = 0
        self.exact_by_pieces = self.split is not None

    @classmethod
    def of(cls, tokenizer) -> TokenCounter:
        if id(tokenizer) not in cls._instances:
            cls._instances[id(tokenizer)] = cls(tokenizer)
        return cls._instances[id(tokenizer)]

    def _whole(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def count(self, texts: list[str]) -> list[int]:
        if not self.exact_by_pieces:
            return self._whole(texts)
        pieces = [[p for p in self.split.split(t) if p] for t in texts]
        new = sorted({p for ps in pieces for p in ps if p not in self.specials and p not in self.cache})
        if new:
            self.cache.update(zip(new, self._whole(new)))
        counts = [sum(1 if p in self.specials else self.cache[p] for p in ps) for ps in pieces]
        if self.verified < self.VERIFY:
            sample = texts[:self.VERIFY - self.verified]
            if self._whole(sample) != counts[:len(sample)]:
                self.exact_by_pieces = False
                return self._whole(texts)
            self.verified += len(sample)
        return counts


_WORKER: dict = {}


def _worker_init(kind: str, ctx: CheckContext) -> None:
    _WORKER.update(kind=kind, ctx=ctx)


def _worker_check(rows):
    return _check_rows(rows, _WORKER["kind"], _WORKER["ctx"])


def check_dataset(path: str, stage: str, ctx: CheckContext | None = None, fmt: str = "auto",
                  workers: int | None = None, chunk_rows: int = 2000) -> DataReport:
    """Check every row of `path` for `stage`; token lengths are checked when ctx.tokenizer is set.

    Rows are checked in chunks by `workers` processes (default: one per core when the dataset is
    large); the report lists rows in file order either way."""
    import os

    ctx = ctx or CheckContext()
    kind = STAGE_KINDS[stage]
    report = DataReport(path, stage)
    rows = list(read_rows(path, fmt))
    report.total = len(rows)
    raw_of = dict(rows)
    chunks = [rows[i:i + chunk_rows] for i in range(0, len(rows), chunk_rows)]
    workers = workers if workers is not None else (os.cpu_count() or 1) if len(chunks) > 1 else 1
    if workers > 1 and len(chunks) > 1:
        import multiprocessing as mp

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # processes give the parallelism here
        with mp.get_context("fork").Pool(workers, initializer=_worker_init, initargs=(kind, ctx)) as pool:
            results = pool.map(_worker_check, chunks)
    else:
        results = [_check_rows(chunk, kind, ctx) for chunk in chunks]
    for found in results:
        for n, problem_kind, detail in found:
            report.add(n, raw_of[n], problem_kind, detail)
    return report
