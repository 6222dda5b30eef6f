"""Rule-based reward functions, registered by the names recipes use.

Each takes a `TrajectoryView` (what the model wrote, the tools it called and what came back) and
the row's metadata (e.g. `ground_truth`), plus the function's `args` from the recipe, and returns a
float. They are pure: no trainer or rollout imports.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from megarl.registry import Registry

REWARD_FUNCTIONS: Registry = Registry("reward function")
NEEDS_METADATA: dict[str, tuple[str, ...]] = {
    "numeric_match": ("ground_truth",),
    "exact_match": ("ground_truth",),
    "tool_result_match": ("ground_truth",),
}
"""The row metadata keys each reward function cannot score without (rows lacking one are rejected
when the prompts are loaded, and by `megarl data check --recipe`)."""
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
TOOL_BLOCK = re.compile(r"<tool_call>.*?</tool_call>", re.S)


@dataclass
class TrajectoryView:
    assistant_texts: list[str]                                # each model turn, special tokens removed
    tool_calls: list[dict] = field(default_factory=list)      # {"name", "arguments"}
    tool_results: list[dict] = field(default_factory=list)    # {"name", "text", "ok"}
    parse_failures: int = 0
    finish: str = "answer"

    @property
    def final_answer(self) -> str:
        """The last model turn without its tool-call blocks."""
        return TOOL_BLOCK.sub("", self.assistant_texts[-1]).strip() if self.assistant_texts else ""

    @classmethod
    def from_trajectory(cls, traj, eos_token: str = "<|im_end|>") -> TrajectoryView:
        texts, calls, results = [], [], []
        for e in traj.events:
            if e["role"] == "assistant":
                texts.append(e["text"].replace(eos_token, ""))
                calls += e["calls"]
            else:
                results.append({"name": e["name"], "text": e["text"], "ok": e["ok"]})
        return cls(texts, calls, results, traj.parse_failures, traj.finish)


def required_metadata(names: list[str]) -> dict[str, list[str]]:
    """{metadata key: the named reward functions that need it}, for the data checks (plain strings:
    megarl.data does not import reward)."""
    out: dict[str, list[str]] = {}
    for name in names:
        for key in NEEDS_METADATA.get(name, ()):
            out.setdefault(key, []).append(name)
    return out


def _number(text: str) -> float | None:
    found = NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


@REWARD_FUNCTIONS.register("numeric_match")
def numeric_match(view: TrajectoryView, metadata: dict, tolerance: float = 1e-6) -> float:
    """1 if the last number of the final answer equals `ground_truth` (within tolerance), else 0."""
    if "ground_truth" not in metadata:
        raise KeyError("numeric_match needs 'ground_truth' in the row")
    got, want = _number(view.final_answer), float(metadata["ground_truth"])
    return float(got is not None and abs(got - want) <= tolerance * max(1.0, abs(want)))


@REWARD_FUNCTIONS.register("exact_match")
def exact_match(view: TrajectoryView, metadata: dict) -> float:
    """1 if the final answer equals `ground_truth` after whitespace/case normalisation."""
    norm = lambda s: " ".join(str(s).lower().split())  # noqa: E731
    return float(norm(view.final_answer) == norm(metadata["ground_truth"]))


@REWARD_FUNCTIONS.register("tool_call_format")
def tool_call_format(view: TrajectoryView, metadata: dict) -> float:
    """Share of tool-call attempts that parsed (1 when the model made none)."""
    attempts = len(view.tool_calls) + view.parse_failures
    return 1.0 if attempts == 0 else len(view.tool_calls) / attempts


def _ok_tool_numbers(view: TrajectoryView) -> list[float]:
    """The last number of each successful tool result, in call order."""
    return [n for n in (_number(r["text"]) for r in view.tool_results if r["ok"]) if n is not None]


def _same(a: float | None, b: float, tolerance: float) -> bool:
    return a is not None and abs(a - b) <= tolerance * max(1.0, abs(b))


@REWARD_FUNCTIONS.register("tool_result_match")
def tool_result_match(view: TrajectoryView, metadata: dict, tolerance: float = 1e-6) -> float:
    """Process credit for the tool step: 1 if a successful tool result's last number equals
    `ground_truth` (the model called the tool with the right inputs), whatever the final answer says."""
    if "ground_truth" not in metadata:
        raise KeyError("tool_result_match needs 'ground_truth' in the row")
    want = float(metadata["ground_truth"])
    return float(any(_same(n, want, tolerance) for n in _ok_tool_numbers(view)))


@REWARD_FUNCTIONS.register("answer_uses_tool_result")
def answer_uses_tool_result(view: TrajectoryView, metadata: dict, tolerance: float = 1e-6) -> float:
    """Process credit for faithfulness: 1 if the final answer's last number equals the last
    successful tool result's (the model reports what the tool returned); 0 without one."""
    results = _ok_tool_numbers(view)
    return float(bool(results) and _same(_number(view.final_answer), results[-1], tolerance))


@REWARD_FUNCTIONS.register("tool_efficiency")
def tool_efficiency(view: TrajectoryView, metadata: dict, expected_calls: int = 1) -> float:
    """1 for using about as many successful tool calls as needed; less for extra calls; 0 for none
    when some were expected. `expected_calls` may come from the row's metadata."""
    expected = int(metadata.get("expected_calls", expected_calls))
    ok_calls = sum(1 for r in view.tool_results if r["ok"])
    if expected == 0:
        return 1.0 if not view.tool_calls else 0.0
    if ok_calls == 0:
        return 0.0
    return min(1.0, expected / len(view.tool_calls))


@REWARD_FUNCTIONS.register("forbidden_patterns")
def forbidden_patterns(view: TrajectoryView, metadata: dict, patterns: list[str] | None = None) -> float:
    """−1 if any model turn or tool call matches a forbidden regex (e.g. shell commands), else 0."""
    patterns = patterns or [r"rm\s+-rf", r"\bimport\s+os\b", r"subprocess", r"socket"]
    haystack = "\n".join(view.assistant_texts + [str(c) for c in view.tool_calls])
    return -1.0 if any(re.search(p, haystack) for p in patterns) else 0.0
