"""Tool-call parsers: model text -> (content, tool calls, parse errors). Pluggable by name.

Hermes / Qwen format:  <tool_call>\n{"name": "calculator", "arguments": {"expression": "1+2"}}\n</tool_call>

Parsing is model output, so it must never crash the step: it runs in time linear in the text (a
degenerate 32k-token response of repeated tags parses in milliseconds), and a call block that is
malformed, nested deeper than MAX_NESTING_DEPTH or holds a number longer than MAX_NUMBER_CHARS
becomes an error of that call in `ParsedTurn.errors` (the model is told why), never an exception.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

# No real tool call nests this deep; json's C decoder recurses per level and raises
# RecursionError near 1000, and deep values would trip later consumers (json.dumps, validators).
MAX_NESTING_DEPTH = 64
# Far below Python's 4300-digit int conversion limit (a ValueError), and longer than any real argument.
MAX_NUMBER_CHARS = 256


@dataclass
class ToolCall:
    name: str
    arguments: dict


@dataclass
class ParsedTurn:
    content: str
    calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class CallRefused(Exception):
    """A call block that cannot be decoded; the message says what was wrong, for the model."""


# The characters that change JSON nesting or string state; everything else is skipped in C.
_STRUCTURAL = re.compile(r'[\[\]{}"\\]')


def exceeds_nesting(text: str, limit: int) -> bool:
    """Whether JSON `text` nests [ / { deeper than `limit` (brackets inside strings don't count).
    One pass, stopping at the first level over the limit; texts with few brackets skip it."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth, in_string, escaped_at = 0, False, -1
    for match in _STRUCTURAL.finditer(text):
        char, at = match.group(), match.start()
        if at == escaped_at:  # the character after a backslash inside a string
            continue
        if char == "\\":
            escaped_at = at + 1 if in_string else -1
        elif char == '"':
            in_string = not in_string
        elif not in_string:
            depth += 1 if char in "[{" else -1
            if depth > limit:
                return True
    return False


def _bounded_number(convert):
    def parse(literal: str):
        if len(literal) > MAX_NUMBER_CHARS:
            raise CallRefused(f"has a number of {len(literal)} characters (limit {MAX_NUMBER_CHARS})")
        return convert(literal)

    return parse


_parse_int, _parse_float = _bounded_number(int), _bounded_number(float)


def decode_bounded(text: str, what: str) -> Any:
    """json.loads for model output, with nesting and number size bounded; raises CallRefused
    with a message starting with `what` ("tool call", "tool call arguments string")."""
    if exceeds_nesting(text, MAX_NESTING_DEPTH):
        raise CallRefused(f"{what} is nested deeper than {MAX_NESTING_DEPTH} levels")
    try:
        return json.loads(text, parse_int=_parse_int, parse_float=_parse_float)
    except json.JSONDecodeError as e:
        raise CallRefused(f"{what} is not valid JSON ({e.msg})") from e
    except CallRefused as e:
        raise CallRefused(f"{what} {e}") from e
    except (ValueError, RecursionError) as e:  # the checks above should leave none; still the model's fault
        raise CallRefused(f"{what} could not be decoded ({type(e).__name__}: {e})") from e


class HermesToolParser:
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def parse(self, text: str) -> ParsedTurn:
        outside, blocks = self.split_blocks(text)
        turn = ParsedTurn(content=outside.replace(self.OPEN, "").strip())
        for block in blocks:
            try:
                turn.calls.append(self.parse_call(block))
            except CallRefused as e:
                turn.errors.append(str(e))
            except Exception as e:  # noqa: BLE001 - a model's malformed call must not kill the step
                turn.errors.append(f"tool call could not be parsed ({type(e).__name__}: {e})")
        if text.count(self.OPEN) > text.count(self.CLOSE):
            turn.errors.append("unterminated <tool_call>")
        return turn

    def split_blocks(self, text: str) -> tuple[str, list[str]]:
        """(the text outside the blocks, each block's inside), in one left-to-right pass. A block
        ends at the first </tool_call> after its <tool_call>; once no closing tag follows, the
        rest is text. (A non-greedy regex rescanned the tail from every unclosed tag: quadratic.)"""
        outside, blocks, pos = [], [], 0
        while (start := text.find(self.OPEN, pos)) != -1:
            end = text.find(self.CLOSE, start + len(self.OPEN))
            if end == -1:
                break
            outside.append(text[pos:start])
            blocks.append(text[start + len(self.OPEN):end])
            pos = end + len(self.CLOSE)
        outside.append(text[pos:])
        return "".join(outside), blocks

    @staticmethod
    def parse_call(block: str) -> ToolCall:
        """One block's JSON -> ToolCall; `arguments` may be an object or a JSON string of one."""
        data = decode_bounded(block, "tool call")
        args = data.get("arguments", {}) if isinstance(data, dict) else None
        if isinstance(args, str):
            args = decode_bounded(args, "tool call arguments string")
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not isinstance(args, dict):
            raise CallRefused('a tool call needs {"name": str, "arguments": object}')
        return ToolCall(data["name"], args)


PARSERS = {"hermes": HermesToolParser}


def get_parser(name: str):
    if name not in PARSERS:
        raise KeyError(f"unknown tool-call format {name!r}; valid: {', '.join(sorted(PARSERS))}")
    return PARSERS[name]()
