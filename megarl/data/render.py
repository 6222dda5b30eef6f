"""Chat messages (+ tools) -> token ids and a loss mask, through the tokenizer's chat template.

Rendering is incremental: the conversation is cut at message boundaries, each piece is rendered by
the template and tokenized on its own, and the pieces are concatenated. Every prefix of the
conversation therefore has exactly the token ids a rollout builds by appending turns
(token-in-token-out), so no separator token is lost or duplicated at a turn boundary. The result
is checked against rendering the whole conversation at once; a template for which the two differ
is refused, naming the message where they diverge.

The loss mask is 1 on what the assistant writes (content, tool calls and its end-of-turn token)
and 0 on everything else: system/user text, tool results and the role headers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class RenderError(ValueError):
    pass


@dataclass
class Rendered:
    input_ids: list[int]
    loss_mask: list[int]
    message_spans: list[tuple[int, int]]
    """Token [start, end) of each message (the assistant header belongs to its message)."""

    def __len__(self) -> int:
        return len(self.input_ids)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(self.input_ids), torch.tensor(self.loss_mask)


def _text(tokenizer, messages, tools, add_generation_prompt=False) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def render_messages(tokenizer, messages: list[dict], tools: list[dict] | None = None,
                    check_whole: bool = True) -> Rendered:
    ids: list[int] = []
    mask: list[int] = []
    spans = []
    prev_text = ""
    for i, msg in enumerate(messages):
        if msg.get("role") == "assistant":
            header_text = _text(tokenizer, messages[:i], tools, add_generation_prompt=True)
            if not header_text.startswith(prev_text):
                raise RenderError(f"message {i}: the chat template re-renders earlier turns differently")
            header = _ids(tokenizer, header_text[len(prev_text):])
            start = len(ids)
            ids += header
            mask += [0] * len(header)
            prev_text = header_text
        else:
            start = len(ids)
        text = _text(tokenizer, messages[:i + 1], tools)
        if not text.startswith(prev_text):
            raise RenderError(f"message {i} ({msg.get('role')}): the chat template re-renders earlier turns "
                              "differently, so incremental (token-in-token-out) rendering is impossible")
        piece = _ids(tokenizer, text[len(prev_text):])
        ids += piece
        if msg.get("role") == "assistant":
            # train on the assistant's own tokens up to and including its end-of-turn token
            eos = tokenizer.eos_token_id
            body = piece
            keep = len(body)
            if eos in body:
                keep = len(body) - body[::-1].index(eos)
            mask += [1] * keep + [0] * (len(body) - keep)
        else:
            mask += [0] * len(piece)
        spans.append((start, len(ids)))
        prev_text = text
    if check_whole:
        whole = _ids(tokenizer, prev_text)
        if whole != ids:
            at = next((k for k, (a, b) in enumerate(zip(whole, ids)) if a != b), min(len(whole), len(ids)))
            msg_index = next((k for k, (s, e) in enumerate(spans) if s <= at < e), len(spans) - 1)
            raise RenderError(f"message {msg_index}: incremental tokenization differs from the whole conversation "
                              f"at token {at}")
    return Rendered(ids, mask, spans)


def render_prompt(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Token ids of a prompt ending with the assistant header (what a rollout engine continues)."""
    base = render_messages(tokenizer, messages, tools, check_whole=False)
    header = _ids(tokenizer, _text(tokenizer, messages, tools, add_generation_prompt=True)[
        len(_text(tokenizer, messages, tools)):])
    return base.input_ids + header


def render_tool_observation(tokenizer, results: list[str], tools: list[dict] | None = None) -> list[int]:
    """Token ids to append after the model's end-of-turn token so that the conversation continues
    with these tool results and a fresh assistant header — exactly what rendering the whole
    conversation would produce there (the template's text after its end-of-turn token, e.g. the
    newline, then the tool turn(s), then the generation prompt)."""
    probe = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    base = _text(tokenizer, probe, tools)
    after = _text(tokenizer, probe + [{"role": "tool", "content": r} for r in results], tools,
                  add_generation_prompt=True)
    eos = tokenizer.eos_token
    if not after.startswith(base) or eos not in base:
        raise RenderError("the chat template cannot append tool results to a finished assistant turn")
    tail = base[base.rindex(eos) + len(eos):]
    return _ids(tokenizer, tail + after[len(base):])
