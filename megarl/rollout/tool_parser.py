"""Tool-call parsers: model text -> (content, tool calls, parse errors). Pluggable by name.

Hermes / Qwen format:  <tool_call>\n{"name": "calculator", "arguments": {"expression": "1+2"}}\n</tool_call>
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field


@dataclass
class ToolCall:
    name: str
    arguments: dict


@dataclass
class ParsedTurn:
    content: str
    calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class HermesToolParser:
    BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)

    def parse(self, text: str) -> ParsedTurn:
        turn = ParsedTurn(content=self.BLOCK.sub("", text).replace("<tool_call>", "").strip())
        for block in self.BLOCK.findall(text):
            try:
                data = json.loads(block)
            except json.JSONDecodeError as e:
                turn.errors.append(f"tool call is not valid JSON ({e.msg})")
                continue
            args = data.get("arguments", {}) if isinstance(data, dict) else None
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    args = None
            if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not isinstance(args, dict):
                turn.errors.append('a tool call needs {"name": str, "arguments": object}')
                continue
            turn.calls.append(ToolCall(data["name"], args))
        if text.count("<tool_call>") > text.count("</tool_call>"):
            turn.errors.append("unterminated <tool_call>")
        return turn


PARSERS = {"hermes": HermesToolParser}


def get_parser(name: str):
    if name not in PARSERS:
        raise KeyError(f"unknown tool-call format {name!r}; valid: {', '.join(sorted(PARSERS))}")
    return PARSERS[name]()
