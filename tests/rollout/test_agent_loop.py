"""Tool parsing, tools, and the multi-turn agent loop (token in / token out)."""

import dataclasses
import json
import time

import pytest

from examples.tool_math import CALCULATOR
from megarl.data.render import render_messages, render_prompt
from megarl.rollout.agent import AgentLoop
from megarl.rollout.engine import Completion, SamplingConfig
from megarl.rollout.tool_parser import MAX_NESTING_DEPTH, MAX_NUMBER_CHARS, HermesToolParser
from megarl.rollout.tool_spec import ToolSpec, ToolSpecError, load_tool_specs
from megarl.rollout.tools import ToolExecutor
from megarl.rollout.tools.builtin import calculator

CALC_SPEC = ToolSpec("calculator", "calc", CALCULATOR["function"]["parameters"],
                     "megarl.rollout.tools.builtin:calculator", timeout_s=2)


def test_hermes_parser():
    p = HermesToolParser()
    t = p.parse('Sure.<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+2"}}\n</tool_call>')
    assert t.content == "Sure." and t.calls[0].name == "calculator" and t.calls[0].arguments == {"expression": "1+2"}
    t = p.parse('<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"3\\"}"}</tool_call>')
    assert t.calls[0].arguments == {"expression": "3"} and not t.errors
    assert p.parse("<tool_call>{oops}</tool_call>").errors[0].startswith("tool call is not valid JSON")
    assert p.parse('<tool_call>{"name": 3}</tool_call>').errors
    assert p.parse("<tool_call>{").errors == ["unterminated <tool_call>"]
    assert p.parse("just text").calls == []


def best_parse_seconds(text: str) -> float:
    """Best of 3 (robust on a loaded machine); each run must return a result, not raise."""
    parser, best = HermesToolParser(), float("inf")
    for _ in range(3):
        start = time.perf_counter()
        parser.parse(text)
        best = min(best, time.perf_counter() - start)
    return best


CALL_OPENING = '<tool_call>{"name": "calculator", "arguments": {'


@pytest.mark.parametrize("text", ["<tool_call>" * 8000,  # 88k chars, ~32k tokens of one repeated tag
                                  CALL_OPENING * 2700,  # ~130k chars of call openings, never closed
                                  CALL_OPENING * 2700 + "</tool_call>",  # ...closed once: one deep block
                                  "<tool_call>" + "[" * 100_000 + "</tool_call>"],
                         ids=["tags", "openings", "openings-closed", "deep"])
def test_degenerate_responses_parse_in_linear_time(text):
    assert best_parse_seconds(text) < 0.1  # a regex parser took ~6 s on the 8000 tags (quadratic)
    assert HermesToolParser().parse(text).errors  # a result that says what was wrong


def call(arguments: str) -> str:
    return f'<tool_call>{{"name": "calculator", "arguments": {arguments}}}</tool_call>'


def test_oversized_calls_are_failed_calls_not_exceptions():
    p = HermesToolParser()
    for text in (call("[" * 100_000), call("[" * 100_000 + "]" * 100_000), call('{"x": ' * 65 + "1" + "}" * 65)):
        t = p.parse(text)
        assert t.calls == [] and t.errors == [f"tool call is nested deeper than {MAX_NESTING_DEPTH} levels"]
    t = p.parse(call('{"x": ' + "1" * 5000 + "}"))  # past Python's 4300-digit int conversion limit
    assert t.calls == [] and t.errors == [f"tool call has a number of 5000 characters (limit {MAX_NUMBER_CHARS})"]
    # the same bounds hold for arguments sent as a JSON string
    t = p.parse(call(json.dumps("[" * 100_000)))
    assert t.errors == [f"tool call arguments string is nested deeper than {MAX_NESTING_DEPTH} levels"]
    t = p.parse(call(json.dumps('{"x": ' + "9" * 5000 + "}")))
    assert t.errors == [f"tool call arguments string has a number of 5000 characters (limit {MAX_NUMBER_CHARS})"]


def test_brackets_in_strings_and_calls_within_the_limits_still_parse():
    deep_ok = '{"x": ' * (MAX_NESTING_DEPTH - 2) + "1" + "}" * (MAX_NESTING_DEPTH - 2)
    in_string = '\\"]' + "[" * 5000 + "\\"  # escapes and brackets inside a string are not nesting
    arguments = {"expression": in_string, "n": int("7" * 200)}
    [parsed] = HermesToolParser().parse(call(json.dumps(arguments)[:-1] + f', "deep": {deep_ok}}}')).calls
    assert parsed.arguments == {**arguments, "deep": json.loads(deep_ok)}


def test_calculator_is_not_eval():
    assert calculator("(3 + 4) * 12") == "84" and calculator("7 / 2") == "3.5" and calculator("-2 ** 2") == "-4"
    for bad in ("__import__('os')", "2 ** 1000", "a + 1", "9 ** 9 ** 9"):
        with pytest.raises(ValueError):
            calculator(bad)


def slow(seconds: float = 5):
    import time

    time.sleep(seconds)
    return "late"


def boom():
    raise RuntimeError("kaput")


def test_tool_executor_turns_failures_into_observations():
    specs = [CALC_SPEC, ToolSpec("slow", "s", {"type": "object", "properties": {"seconds": {"type": "number"}}},
                                 "tests.rollout.test_agent_loop:slow", timeout_s=0.2),
             ToolSpec("boom", "b", {"type": "object", "properties": {}}, "tests.rollout.test_agent_loop:boom")]
    ex = ToolExecutor(specs)
    from megarl.rollout.tool_parser import ToolCall

    assert ex.execute(ToolCall("calculator", {"expression": "2*21"})).text == "42"
    cases = {("nope", ()): "unknown_tool", ("calculator", ()): "invalid_arguments",
             ("calculator", (("expression", 5),)): "invalid_arguments", ("slow", ()): "timeout",
             ("boom", ()): "tool_error", ("calculator", (("expression", "2**999"),)): "tool_error"}
    for (name, args), kind in cases.items():
        r = ex.execute(ToolCall(name, dict(args)))
        assert not r.ok and r.error == kind and r.text.startswith("Error:"), (name, args, r)


def test_tool_yaml_is_validated(tmp_path):
    specs = load_tool_specs("configs/tools/calculator.yaml")
    assert specs[0].name == "calculator" and specs[0].openai_schema()["function"]["parameters"]["required"]
    bad = tmp_path / "t.yaml"
    bad.write_text("tools:\n  - {name: x, description: d, callable: nomodule}\n")
    with pytest.raises(ToolSpecError, match=r"tools\[0\].callable: expected 'module.path:function'"):
        load_tool_specs(str(bad))
    bad.write_text("tools:\n  - {name: x, description: d, callable: a:b, max_concurrency: 0}\n")
    with pytest.raises(ToolSpecError, match=r"tools\[0\].max_concurrency: expected a whole number ≥ 1, got 0"):
        load_tool_specs(str(bad))
    bad.write_text("tools:\n  - {name: x, description: d, callable: a:b, max_concurrency: 64}\n")
    assert load_tool_specs(str(bad))[0].max_concurrency == 64


class ScriptedEngine:
    """Replays fixed model turns through the engine interface (the agent loop is what is tested)."""

    def __init__(self, tokenizer, turns: list[str], versions: list[int] | None = None):
        self.turns = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in turns]
        self.versions = versions   # the weights of each engine call (a sync between two turns), else 3
        self.seen: list[list[int]] = []
        self.limits: list[list[int] | None] = []

    def generate(self, prompts, sampling, max_tokens_each=None):
        out = []
        version = self.versions.pop(0) if self.versions else 3
        self.limits.append(list(max_tokens_each) if max_tokens_each is not None else None)
        for p in prompts:
            self.seen.append(list(p))
            ids = self.turns.pop(0)
            out.append([Completion(ids, [-0.5] * len(ids), "stop", version) for _ in range(sampling.n)])
        return out


def test_scripted_multi_turn_conversation_gives_exact_tokens_and_mask(tiny_hf_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_hf_models["qwen2"])
    call = {"name": "calculator", "arguments": {"expression": "12 * 7"}}
    turns = [f"<tool_call>\n{json.dumps(call)}\n</tool_call><|im_end|>", "The answer is 84.<|im_end|>"]
    prompt = [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "What is 12 * 7?"}]
    engine = ScriptedEngine(tok, turns)
    loop = AgentLoop(engine, tok, ToolExecutor([CALC_SPEC]), max_turns=4, max_total_tokens=2048)
    prompt_ids = render_prompt(tok, prompt, [CALCULATOR])
    [[traj]] = loop.run([prompt_ids], SamplingConfig(n=1, max_tokens=64))
    whole = render_messages(tok, prompt + [
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]},
        {"role": "tool", "content": "84"}, {"role": "assistant", "content": "The answer is 84."}], [CALCULATOR])
    got = traj.prompt_ids + traj.response_ids
    assert got == whole.input_ids[:len(got)]  # the whole rendering only adds the template's final "\n"
    assert tok.decode(whole.input_ids[len(got):]).strip() == "" and sum(whole.loss_mask[len(got):]) == 0
    assert traj.loss_mask == whole.loss_mask[len(prompt_ids):len(got)]
    assert (traj.turns, traj.tool_calls, traj.tool_errors, traj.finish) == (2, 1, 0, "answer")
    assert traj.events[1] == {"role": "tool", "name": "calculator", "text": "84", "ok": True}
    assert engine.seen[1] == traj.prompt_ids + traj.response_ids[:len(engine.seen[1]) - len(prompt_ids)]
    assert traj.weight_versions == {3} and len(traj.rollout_logprobs) == len(traj.response_ids)


def test_a_sync_between_turns_tags_each_token_with_the_weights_that_sampled_it(tiny_hf_models):
    """Asynchronous RL: new weights may arrive between two turns of a conversation (a partial
    rollout). Every model token carries the version of the engine call that produced it, tool
    observations carry -1, and the sample's versions are both (its staleness counts the oldest)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_hf_models["qwen2"])
    call = {"name": "calculator", "arguments": {"expression": "12 * 7"}}
    turns = [f"<tool_call>\n{json.dumps(call)}\n</tool_call><|im_end|>", "The answer is 84.<|im_end|>"]
    loop = AgentLoop(ScriptedEngine(tok, turns, versions=[5, 6]), tok, ToolExecutor([CALC_SPEC]), max_turns=4)
    [[traj]] = loop.run([render_prompt(tok, [{"role": "user", "content": "12 * 7?"}], [CALCULATOR])],
                        SamplingConfig(n=1, max_tokens=64))
    first, answer = (len(tok(t, add_special_tokens=False)["input_ids"]) for t in turns)
    observation = len(traj.response_ids) - first - answer
    assert traj.token_versions == [5] * first + [-1] * observation + [6] * answer
    assert [v >= 0 for v in traj.token_versions] == [m == 1 for m in traj.loss_mask]
    assert traj.weight_versions == {5, 6} and len(traj.token_versions) == len(traj.response_ids)


def test_loop_stops_at_max_turns_and_reports_parse_failures(tiny_hf_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_hf_models["qwen2"])
    turns = ["<tool_call>{broken</tool_call><|im_end|>", "<tool_call>{broken</tool_call><|im_end|>"]
    loop = AgentLoop(ScriptedEngine(tok, turns), tok, ToolExecutor([CALC_SPEC]), max_turns=2)
    [[traj]] = loop.run([render_prompt(tok, [{"role": "user", "content": "hi"}])], SamplingConfig(max_tokens=32))
    assert traj.finish == "max_turns" and traj.parse_failures == 2 and traj.turns == 2
    assert "Error: tool call is not valid JSON" in tok.decode(traj.response_ids)


def test_each_conversation_turn_is_capped_by_its_own_budget(tiny_hf_models):
    """A conversation close to max_total_tokens limits only its own next turn: the lock-step loop
    once capped every conversation's turn by the smallest remaining budget, which cut the answers
    of a whole batch short whenever one conversation ran long."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_hf_models["qwen2"])
    call = {"name": "calculator", "arguments": {"expression": "1 + 1"}}
    turns = [f"<tool_call>\n{json.dumps(call)}\n</tool_call><|im_end|>"] * 2 + ["The answer is 2.<|im_end|>"] * 2
    engine = ScriptedEngine(tok, turns)
    loop = AgentLoop(engine, tok, ToolExecutor([CALC_SPEC]), max_turns=4, max_total_tokens=600)
    short = render_prompt(tok, [{"role": "user", "content": "1 + 1?"}], [CALCULATOR])
    long = render_prompt(tok, [{"role": "user", "content": "1 + 1? " + "please " * 100}], [CALCULATOR])
    groups = loop.run([short, long], SamplingConfig(n=1, max_tokens=64))
    first, second = engine.limits
    assert first == [600 - len(short), 600 - len(long)]
    answer = len(tok(turns[-1], add_special_tokens=False)["input_ids"])
    before_answer = [g[0].total_tokens - answer for g in groups]   # prompt + call + tool result
    assert second == [600 - n for n in before_answer] and second[0] > second[1]
    assert [g[0].finish for g in groups] == ["answer", "answer"]


class ConversationEngine:
    """Answers by conversation, not by call order: prompt i calls the calculator `calls[i]` times,
    then answers; each reply depends only on the tokens it is given (as a seeded engine's does), so
    the lock-step and per-trajectory schedules can be compared token for token. Speaks both
    interfaces and records the largest number of turns it held at once."""

    def __init__(self, tokenizer, prompts: list[list[int]], calls: list[int]):
        self.tok, self.prompts, self.calls = tokenizer, prompts, calls
        self.end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.in_flight = self.most_in_flight = 0

    def reply(self, ids: list[int], n: int, limit: int) -> list[Completion]:
        i = next(k for k, p in enumerate(self.prompts) if ids[:len(p)] == p)
        done = ids[len(self.prompts[i]):].count(self.end) // 2   # an assistant turn + its tool result each
        call = {"name": "calculator", "arguments": {"expression": f"{i} + {done}"}}
        text = (f"<tool_call>\n{json.dumps(call)}\n</tool_call><|im_end|>" if done < self.calls[i]
                else f"The answer is {i + done}.<|im_end|>")
        out = self.tok(text, add_special_tokens=False)["input_ids"][:limit]
        return [Completion(out, [-0.1 * (k + 1) for k in range(len(out))], "stop", 7) for _ in range(n)]

    def generate(self, prompts, sampling, max_tokens_each=None):
        limits = max_tokens_each or [sampling.max_tokens] * len(prompts)
        return [self.reply(p, sampling.n, min(limit, sampling.max_tokens)) for p, limit in zip(prompts, limits)]

    async def turn(self, key, prompt, sampling, max_tokens):
        import asyncio

        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0.001 * (key + 1))      # conversations finish their turns at different times
        self.in_flight -= 1
        return self.reply(prompt, sampling.n, min(max_tokens, sampling.max_tokens))


def test_per_trajectory_loop_gives_exactly_the_lock_step_tokens(tiny_hf_models):
    """Conversations needing 1 to 4 turns (0-3 tool calls), 2 samples each: the per-trajectory
    schedule yields the same tokens, masks, engine log-probs, versions, finishes and tool events
    as the lock-step one, while holding turns of several conversations in flight at once."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_hf_models["qwen2"])
    prompts = [render_prompt(tok, [{"role": "user", "content": f"question {i}"}], [CALCULATOR]) for i in range(4)]
    calls = [0, 3, 1, 2]
    runs = {}
    for schedule in ("lock_step", "per_trajectory"):
        engine = ConversationEngine(tok, prompts, calls)
        loop = AgentLoop(engine, tok, ToolExecutor([CALC_SPEC]), max_turns=4, max_total_tokens=1024, loop=schedule)
        runs[schedule] = (loop.run(prompts, SamplingConfig(n=2, max_tokens=64, seed=3)), engine)
    (a, _), (b, engine) = runs["lock_step"], runs["per_trajectory"]
    fields = ("prompt_ids", "response_ids", "loss_mask", "rollout_logprobs", "token_versions", "turns",
              "tool_calls", "tool_errors", "parse_failures", "finish", "weight_versions", "events")
    for ga, gb in zip(a, b, strict=True):
        for ta, tb in zip(ga, gb, strict=True):
            assert {f: getattr(ta, f) for f in fields} == {f: getattr(tb, f) for f in fields}
    assert [g[0].turns for g in b] == [c + 1 for c in calls] and all(t.finish == "answer" for g in b for t in g)
    assert [g[0].tool_calls for g in b] == calls
    assert engine.most_in_flight >= 4


def test_loop_schedule_is_checked():
    with pytest.raises(ValueError, match="agent loop 'batched': expected lock_step or per_trajectory"):
        AgentLoop(None, type("T", (), {"eos_token_id": 0})(), loop="batched")


class Meeting:
    """A calculator every caller of which waits until `parties` calls are in it at once (a remote
    service's latency, as concurrent callers see it); fewer at once -> the call fails."""

    def __init__(self, parties: int):
        import threading

        self.barrier = threading.Barrier(parties, timeout=10)

    def __call__(self, expression: str) -> str:
        self.barrier.wait()
        return calculator(expression)


def test_per_trajectory_tool_calls_run_at_once_up_to_the_tools_max_concurrency(tiny_hf_models):
    """16 conversations call a tool that waits on a remote service: with max_concurrency 16 all 16
    calls are in flight together (the loop's threads and the tool's pool both let them through)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_hf_models["qwen2"])
    prompts = [render_prompt(tok, [{"role": "user", "content": f"question {i}"}], [CALCULATOR]) for i in range(16)]
    spec = dataclasses.replace(CALC_SPEC, callable="tests.rollout.test_agent_loop:Meeting", options={"parties": 16},
                               max_concurrency=16, timeout_s=15)
    loop = AgentLoop(ConversationEngine(tok, prompts, [1] * 16), tok, ToolExecutor([spec]), max_turns=4,
                     max_total_tokens=1024, loop="per_trajectory")
    groups = loop.run(prompts, SamplingConfig(n=1, max_tokens=64, seed=3))
    assert [(g[0].tool_calls, g[0].tool_errors) for g in groups] == [(1, 0)] * 16
    assert [e["text"] for g in groups for e in g[0].events if e["role"] == "tool"] == [str(i) for i in range(16)]
