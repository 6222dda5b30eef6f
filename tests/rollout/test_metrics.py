import pytest

from megarl.rollout.agent import Trajectory
from megarl.rollout.metrics import rollout_metrics


def traj(turns, calls, errors, failures, finish, generated):
    return Trajectory([1, 2], response_ids=[0] * (generated + 3), loss_mask=[1] * generated + [0] * 3, turns=turns,
                      tool_calls=calls, tool_errors=errors, parse_failures=failures, finish=finish)


def test_rollout_metrics():
    m = rollout_metrics([traj(2, 1, 0, 0, "answer", 10), traj(3, 2, 1, 1, "max_turns", 20),
                         traj(1, 0, 0, 0, "length", 30), traj(1, 0, 0, 0, "answer", 4)], seconds=2.0)
    assert m["rollout/generated_tokens"] == 64 and m["rollout/tokens_per_s"] == 32
    assert m["rollout/tool_call_parse_rate"] == pytest.approx(3 / 4)
    assert m["rollout/tool_error_rate"] == pytest.approx(1 / 3)
    assert m["rollout/truncation_rate"] == 0.25 and m["rollout/completion_rate"] == 0.5
    assert m["rollout/completion_rate_turns_1"] == 0.5 and m["rollout/completion_rate_turns_3"] == 0.0
    assert m["rollout/turns_mean"] == pytest.approx(7 / 4) and m["rollout/finish_max_turns"] == 0.25
    assert rollout_metrics([]) == {}
