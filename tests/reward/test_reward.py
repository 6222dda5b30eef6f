import pytest

from megarl.config.recipe import RewardConfig, RewardFunctionConfig, RewardModelConfig
from megarl.reward.engine import RewardEngine, failure_counts
from megarl.reward.functions import (
    REWARD_FUNCTIONS,
    TrajectoryView,
    answer_uses_tool_result,
    forbidden_patterns,
    numeric_match,
    tool_call_format,
    tool_efficiency,
    tool_result_match,
)

CALL = {"name": "calculator", "arguments": {"expression": "12*7"}}


def view(final="The answer is 84.", calls=(CALL,), ok=(True,), failures=0):
    texts = ['<tool_call>{"name": "calculator"}</tool_call>'] * len(calls) + [final]
    return TrajectoryView(texts, list(calls), [{"name": c["name"], "text": "84", "ok": k} for c, k in zip(calls, ok)],
                          failures)


def test_rule_functions():
    assert numeric_match(view(), {"ground_truth": "84"}) == 1.0
    assert numeric_match(view("It is 83, no wait, 85"), {"ground_truth": 84}) == 0.0
    assert numeric_match(view("1,024"), {"ground_truth": "1024"}) == 1.0
    assert tool_call_format(view(failures=1), {}) == 0.5 and tool_call_format(view(calls=()), {}) == 1.0
    assert tool_efficiency(view(), {}) == 1.0 and tool_efficiency(view(calls=(CALL, CALL), ok=(True, True)), {}) == 0.5
    assert tool_efficiency(view(calls=()), {}) == 0.0 and tool_efficiency(view(calls=()), {"expected_calls": 0}) == 1.0
    assert forbidden_patterns(view("rm -rf /"), {}) == -1.0 and forbidden_patterns(view(), {}) == 0.0


def test_process_rewards_credit_the_tool_step_and_the_faithful_answer_separately():
    truth = {"ground_truth": "84"}
    right_call_miscopied = view("The answer is 48.")
    wrong_call_copied = TrajectoryView(["<tool_call>x</tool_call>", "The answer is 85."], [CALL],
                                       [{"name": "calculator", "text": "85", "ok": True}])
    assert (tool_result_match(view(), truth), answer_uses_tool_result(view(), truth)) == (1.0, 1.0)
    assert (tool_result_match(right_call_miscopied, truth), answer_uses_tool_result(right_call_miscopied, truth)) \
        == (1.0, 0.0)
    assert (tool_result_match(wrong_call_copied, truth), answer_uses_tool_result(wrong_call_copied, truth)) \
        == (0.0, 1.0)
    failed_call = view(ok=(False,))                       # an error result is no result
    assert (tool_result_match(failed_call, truth), answer_uses_tool_result(failed_call, truth)) == (0.0, 0.0)
    no_call = view(calls=())
    assert (tool_result_match(no_call, truth), answer_uses_tool_result(no_call, truth)) == (0.0, 0.0)
    with pytest.raises(KeyError, match="ground_truth"):
        tool_result_match(view(), {})


def test_engine_combines_weights_keeps_components_and_marks_failures():
    cfg = RewardConfig(functions=[RewardFunctionConfig("numeric_match", 1.0, "task"),
                                  RewardFunctionConfig("tool_call_format", 0.2, "format"),
                                  RewardFunctionConfig("forbidden_patterns", 1.0, "safety")])
    engine = RewardEngine(cfg)
    r = engine.score(view(), {"ground_truth": "84"})
    assert r.scalar == pytest.approx(1.2) and r.components == {"task": 1.0, "format": 0.2, "safety": 0.0}
    bad = engine.score(view(), {})  # no ground truth: numeric_match raises
    assert bad.failed and bad.scalar == 0.0 and "numeric_match: KeyError" in bad.errors[0]
    assert bad.values == {"tool_call_format": 1.0, "forbidden_patterns": 0.0}
    results, metrics = engine.score_batch([view(), view()], [{"ground_truth": "84"}, {}])
    assert metrics["reward/failed_frac"] == 0.5 and metrics["reward/task"] == 1.0


def test_failures_are_counted_per_component_and_function_for_the_console():
    cfg = RewardConfig(functions=[RewardFunctionConfig("numeric_match", 1.0, "task"),
                                  RewardFunctionConfig("tool_result_match", 0.5, "process")])
    _, metrics = RewardEngine(cfg).score_batch([view()] * 4, [{"ground_truth": "84"}, {}, {}, {"x": 1}])
    assert metrics["reward/failed/task/numeric_match"] == 3.0
    assert metrics["reward/failed/process/tool_result_match"] == 3.0
    assert failure_counts(metrics) == "process/tool_result_match 3, task/numeric_match 3"
    _, clean = RewardEngine(cfg).score_batch([view()], [{"ground_truth": "84"}])
    assert failure_counts(clean) == "" and not any(k.startswith("reward/failed/") for k in clean)


def test_unknown_function_and_unimplemented_sources_are_refused():
    with pytest.raises(KeyError, match="unknown reward function 'numeric'; valid: answer_uses_tool_result, "
                                       "exact_match"):
        RewardEngine(RewardConfig(functions=[RewardFunctionConfig("numeric")]))
    with pytest.raises(ValueError, match="needs a reward-model worker"):
        RewardEngine(RewardConfig(reward_model=RewardModelConfig(path="x")))


def test_reward_model_scores_join_the_components():
    cfg = RewardConfig(functions=[RewardFunctionConfig("tool_call_format", 1.0, "format")],
                       reward_model=RewardModelConfig(path="rm", weight=0.5))
    engine = RewardEngine(cfg, rm_scorer=lambda seqs: [float(len(s)) for s in seqs])
    [r], metrics = engine.score_batch([view()], [{}], token_ids=[[1, 2, 3, 4]])
    assert r.values["reward_model"] == 4.0 and r.scalar == pytest.approx(1.0 + 2.0)
    assert r.components == {"format": 1.0, "task": 2.0} and metrics["reward/task"] == 2.0
    assert "numeric_match" in REWARD_FUNCTIONS
