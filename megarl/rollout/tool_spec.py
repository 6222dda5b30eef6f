"""Tool declarations from YAML: an OpenAI function schema plus the Python callable that runs it.

    tools:
      - name: calculator
        description: Evaluate an arithmetic expression.
        parameters: {type: object, properties: {expression: {type: string}}, required: [expression]}
        callable: megarl.rollout.tools.builtin:calculator
        timeout_s: 5
        max_concurrency: 4     # calls of this tool running at once (raise it for a remote service)

`callable` may name a class: it is constructed once with `options` (settings the model never sees,
e.g. a sandbox's limits) and then called with the model's arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml

# calls of a tool running at once: a local tool (a sandbox process) competes for the machine's
# cores, so few; a tool that waits on a remote service (search, an execution service) can take many
DEFAULT_CONCURRENCY = 4


class ToolSpecError(ValueError):
    pass


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict
    callable: str
    timeout_s: float = 10.0
    options: dict = field(default_factory=dict)
    max_concurrency: int = DEFAULT_CONCURRENCY

    def openai_schema(self) -> dict:
        """What the chat template shows the model."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def load_tool_specs(path: str) -> list[ToolSpec]:
    """Parse and check a tools YAML file; errors name the tool index and key."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    items = data.get("tools") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise ToolSpecError(f"{path}: expected a non-empty 'tools:' list")
    specs, seen = [], set()
    for i, item in enumerate(items):
        where = f"{path}: tools[{i}]"
        if not isinstance(item, dict):
            raise ToolSpecError(f"{where}: expected a mapping")
        unknown = set(item) - {"name", "description", "parameters", "callable", "timeout_s", "options",
                               "max_concurrency"}
        if unknown:
            raise ToolSpecError(f"{where}: unknown keys {sorted(unknown)}")
        for key in ("name", "description", "callable"):
            if not isinstance(item.get(key), str) or not item[key]:
                raise ToolSpecError(f"{where}.{key}: required text")
        if ":" not in item["callable"]:
            raise ToolSpecError(f"{where}.callable: expected 'module.path:function', got {item['callable']!r}")
        params = item.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict) or params.get("type") != "object":
            raise ToolSpecError(f"{where}.parameters: expected a JSON schema with type: object")
        options = item.get("options", {})
        if not isinstance(options, dict):
            raise ToolSpecError(f"{where}.options: expected a mapping of the callable's settings")
        clash = sorted(set(options) & set(params.get("properties", {})))
        if clash:
            raise ToolSpecError(f"{where}.options: {clash} are also model-visible parameters; a setting is one or "
                                "the other")
        concurrency = item.get("max_concurrency", DEFAULT_CONCURRENCY)
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
            raise ToolSpecError(f"{where}.max_concurrency: expected a whole number ≥ 1, got {concurrency!r}")
        if item["name"] in seen:
            raise ToolSpecError(f"{where}.name: tool {item['name']!r} is declared twice")
        seen.add(item["name"])
        specs.append(ToolSpec(item["name"], item["description"], params, item["callable"],
                              float(item.get("timeout_s", 10.0)), options, concurrency))
    return specs
