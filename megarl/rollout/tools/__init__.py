"""Tools the agent loop can call: declared in YAML (tool_spec.py), run by `ToolExecutor`. A tool
that raises, times out or gets invalid arguments yields an error observation for the model; it never
crashes the rollout."""

from __future__ import annotations

import concurrent.futures
import functools
import importlib
import inspect
from dataclasses import dataclass

from megarl.rollout.tool_parser import ToolCall
from megarl.rollout.tool_spec import ToolSpec

JSON_TYPES = {"string": str, "number": (int, float), "integer": int, "boolean": bool, "object": dict,
              "array": list}


@dataclass
class ToolResult:
    text: str
    ok: bool
    error: str | None = None


def _bind(spec: ToolSpec):
    """The function a call runs: a class named by `callable` is constructed once with the spec's
    options (a sandbox checks its layers then, at setup); a function gets them as fixed keywords."""
    module, _, name = spec.callable.partition(":")
    try:
        target = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"tool {spec.name!r}: cannot import {spec.callable!r} ({e})") from None
    try:
        inspect.signature(target).bind_partial(**spec.options)
    except TypeError as e:
        raise ValueError(f"tool {spec.name!r}: options {sorted(spec.options)} do not fit {spec.callable} "
                         f"({e})") from None
    if isinstance(target, type):
        return target(**spec.options)
    return functools.partial(target, **spec.options) if spec.options else target


class ToolExecutor:
    def __init__(self, specs: list[ToolSpec]):
        self.specs = {s.name: s for s in specs}
        self.fns = {}
        for s in specs:
            self.fns[s.name] = _bind(s)
        self.pools = {s.name: concurrent.futures.ThreadPoolExecutor(s.max_concurrency, f"megarl-tool-{s.name}")
                      for s in specs}

    def close(self) -> None:
        """Wait for the calls in flight and stop the tools' threads."""
        for pool in self.pools.values():
            pool.shutdown()

    def schemas(self) -> list[dict]:
        return [s.openai_schema() for s in self.specs.values()]

    def _validate(self, spec: ToolSpec, args: dict) -> str | None:
        props = spec.parameters.get("properties", {})
        for key in spec.parameters.get("required", []):
            if key not in args:
                return f"missing required argument {key!r}"
        for key, value in args.items():
            if key not in props:
                return f"unknown argument {key!r} (expected {', '.join(props) or 'none'})"
            expected = JSON_TYPES.get(props[key].get("type"))
            if expected and (not isinstance(value, expected) or (expected is int and isinstance(value, bool))):
                return f"argument {key!r} must be a {props[key]['type']}"
        return None

    def execute(self, call: ToolCall) -> ToolResult:
        spec = self.specs.get(call.name)
        if spec is None:
            return ToolResult(f"Error: unknown tool {call.name!r}", False, "unknown_tool")
        problem = self._validate(spec, call.arguments)
        if problem:
            return ToolResult(f"Error: {problem}", False, "invalid_arguments")
        future = self.pools[call.name].submit(self.fns[call.name], **call.arguments)
        try:
            value = future.result(timeout=spec.timeout_s)
        except concurrent.futures.TimeoutError:
            return ToolResult(f"Error: {call.name} timed out after {spec.timeout_s:g}s", False, "timeout")
        except Exception as e:  # noqa: BLE001 - the model sees the error, the rollout goes on
            return ToolResult(f"Error: {type(e).__name__}: {e}", False, "tool_error")
        return ToolResult(str(value), True)
