"""Row schemas per stage, normalised to OpenAI-style messages.

- sft:        {"messages": [...], "tools": [...]?}  or ShareGPT {"conversations": [{"from", "value"}]}
- prompts:    {"messages": [... ending with a user turn], "tools"?, "ground_truth"?, ...metadata}
              or {"prompt": "text"}; every other key is metadata routed to the reward functions
- preference: {"prompt": messages|text, "chosen": messages|text, "rejected": messages|text}
              or {"chosen": full conversation, "rejected": full conversation} (shared prompt = common prefix)
- kto:        {"prompt": messages|text, "completion": messages|text, "label": true|false}

A message is {"role": system|user|assistant|tool, "content": str, "tool_calls"?: [...],
"tool_call_id"?: str}. Normalisation raises `RowError(kind, detail)` (also for a line the reader
could not parse: a `BadRow`); `checks.py` adds the semantic checks (turn order, tool-call pairing,
JSON, loops, lengths, empty prompts, identical pairs, metadata the reward functions need).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megarl.data.readers import BadRow

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "assistant", "observation": "tool", "tool": "tool"}
STAGE_KINDS = {"sft": "sft", "rm": "preference", "dpo": "preference", "kto": "kto", "ppo": "prompts",
               "grpo": "prompts"}


class RowError(ValueError):
    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


@dataclass
class Row:
    """A normalised row: `messages` is the conversation (sft) or the prompt (prompts, preference,
    kto); `completions` holds chosen/rejected (preference) or the completion (kto)."""

    messages: list[dict]
    tools: list[dict] | None = None
    completions: dict[str, list[dict]] = field(default_factory=dict)
    label: bool | None = None
    metadata: dict = field(default_factory=dict)


def _as_messages(value, what: str, default_role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return value
    raise RowError("bad_schema", f"{what} must be text or a list of messages")


def from_sharegpt(conversations) -> list[dict]:
    if not isinstance(conversations, list):
        raise RowError("bad_schema", "'conversations' must be a list")
    out = []
    for i, turn in enumerate(conversations):
        role = SHAREGPT_ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None:
            speaker = turn.get("from") if isinstance(turn, dict) else turn
            raise RowError("bad_role", f"conversation turn {i}: unknown 'from' {speaker!r}")
        out.append({"role": role, "content": turn.get("value", "")})
    return out


def _tools(row: dict) -> list[dict] | None:
    tools = row.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise RowError("bad_schema", "'tools' must be a list of tool schemas (JSON objects)")
    return tools


def normalize(row: dict | BadRow, kind: str) -> Row:
    if isinstance(row, BadRow):  # a line the reader could not parse
        raise RowError(row.kind, row.detail)
    if not isinstance(row, dict):
        raise RowError("not_an_object", f"a {type(row).__name__}, expected a JSON object")
    if kind == "sft":
        if "messages" in row:
            messages = row["messages"]
        elif "conversations" in row:
            messages = from_sharegpt(row["conversations"])
        else:
            raise RowError("bad_schema", "expected 'messages' (or ShareGPT 'conversations')")
        if not isinstance(messages, list) or not messages:
            raise RowError("no_messages", "expected a non-empty list of messages")
        return Row(messages, _tools(row))
    if kind == "prompts":
        if "messages" in row:
            messages = _as_messages(row["messages"], "'messages'", "user")
        elif "prompt" in row:
            messages = _as_messages(row["prompt"], "'prompt'", "user")
        else:
            raise RowError("bad_schema", "expected 'messages' or 'prompt'")
        meta = {k: v for k, v in row.items() if k not in ("messages", "prompt", "tools")}
        return Row(messages, _tools(row), metadata=meta)
    if kind == "preference":
        if "chosen" not in row or "rejected" not in row:
            raise RowError("bad_schema", "expected 'chosen' and 'rejected'")
        if "prompt" in row:
            prompt = _as_messages(row["prompt"], "'prompt'", "user")
            chosen = _as_messages(row["chosen"], "'chosen'", "assistant")
            rejected = _as_messages(row["rejected"], "'rejected'", "assistant")
        else:
            full_c = _as_messages(row["chosen"], "'chosen'", "assistant")
            full_r = _as_messages(row["rejected"], "'rejected'", "assistant")
            cut = _last_user_index(full_c)
            if cut is None or full_c[:cut + 1] != full_r[:cut + 1]:
                raise RowError("prompt_mismatch", "chosen and rejected do not share the same prompt turns")
            prompt, chosen, rejected = full_c[:cut + 1], full_c[cut + 1:], full_r[cut + 1:]
        return Row(prompt, _tools(row), {"chosen": chosen, "rejected": rejected})
    if kind == "kto":
        if "prompt" not in row or "completion" not in row:
            raise RowError("bad_schema", "expected 'prompt', 'completion' and 'label'")
        label = row.get("label")
        if not isinstance(label, bool):
            raise RowError("bad_label", f"'label' must be true (desirable) or false, got {label!r}")
        return Row(_as_messages(row["prompt"], "'prompt'", "user"), _tools(row),
                   {"completion": _as_messages(row["completion"], "'completion'", "assistant")}, label)
    raise ValueError(f"unknown row kind {kind!r}")


def _last_user_index(messages: list[dict]) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            return i
    return None
