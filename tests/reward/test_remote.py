"""Remote HTTP reward against a real local server: values, retries on 5xx, timeouts, concurrency,
and answers that are not a reward (HTML error pages, plain text, a string); NaN and inf are values."""

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from megarl.config.recipe import RemoteRewardConfig, RewardConfig, RewardFunctionConfig
from megarl.reward.engine import RewardEngine
from megarl.reward.functions import TrajectoryView

# a gateway's error page, longer than the part an error message quotes
GATEWAY_PAGE = b"<html><head><title>502 Bad Gateway</title></head><body>" + b"x" * 300 + b"END</body></html>"
NON_FINITE = {"nan": (200, b'{"reward": NaN}'), "inf": (200, b'{"reward": Infinity}')}
# answers that are not a reward, by metadata kind: (HTTP status, body)
NOT_A_REWARD = {"html502": (502, GATEWAY_PAGE), "text200": (200, b"service warming up, try later"),
                "string": (200, b'{"reward": "x"}'), "list": (200, b"[1.0]")}


class Handler(BaseHTTPRequestHandler):
    state = {"active": 0, "peak": 0, "flaky": 0}
    lock = threading.Lock()

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            self.state["active"] += 1
            self.state["peak"] = max(self.state["peak"], self.state["active"])
        try:
            status, data = self._answer(body)
        finally:
            # leave the count before answering: once the answer is out, the client may send its
            # next request before this thread would get to decrement (a false overlap under load)
            with self.lock:
                self.state["active"] -= 1
        self.send_response(status)
        if data is not None:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data is not None:
            self.wfile.write(data)

    def _answer(self, body) -> tuple[int, bytes | None]:
        kind = body["metadata"].get("kind")
        time.sleep(0.05)
        if kind == "flaky" and self.state["flaky"] < 2:
            self.state["flaky"] += 1
            return 503, None
        if kind == "slow":
            time.sleep(1.0)
        if kind in NOT_A_REWARD:
            return NOT_A_REWARD[kind]
        if kind in NON_FINITE:
            return NON_FINITE[kind]
        reward = 1.0 if "84" in body["response"] else 0.25
        return 200, json.dumps({"reward": reward}).encode()


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    Handler.state.update(active=0, peak=0, flaky=0)
    yield f"http://127.0.0.1:{srv.server_address[1]}/score"
    srv.shutdown()
    srv.server_close()


def test_remote_reward(server):
    cfg = RewardConfig(functions=[RewardFunctionConfig("tool_call_format", 0.5, "format")],
                       remote=RemoteRewardConfig(url=server, weight=2.0, timeout_s=0.5, retries=2, max_concurrency=2))
    engine = RewardEngine(cfg)
    views = [TrajectoryView(["The answer is 84."]), TrajectoryView(["no idea"]), TrajectoryView(["84"]),
             TrajectoryView(["84"])] + [TrajectoryView(["84"]) for _ in range(4)]
    meta = [{}, {}, {"kind": "flaky"}, {"kind": "slow"}] + [{} for _ in range(4)]
    results, metrics = engine.score_batch(views, meta)
    assert results[0].scalar == pytest.approx(0.5 + 2.0) and results[0].components == {"format": 0.5, "task": 2.0}
    assert results[1].values["remote"] == 0.25
    assert not results[2].failed and Handler.state["flaky"] == 2  # two 503s, then a success
    assert results[3].failed and "after 3 attempts" in results[3].errors[0]
    assert metrics["reward/failed_frac"] == pytest.approx(1 / 8)


def test_concurrency_is_bounded(server):
    cfg = RewardConfig(remote=RemoteRewardConfig(url=server, timeout_s=5, max_concurrency=3))
    results, _ = RewardEngine(cfg).score_batch([TrajectoryView(["84"]) for _ in range(12)], [{} for _ in range(12)])
    assert all(not r.failed and r.scalar == 1.0 for r in results)
    assert Handler.state["peak"] == 3  # requests overlap, never more than the bound


def test_unreachable_service_fails_the_samples_not_the_run():
    cfg = RewardConfig(remote=RemoteRewardConfig(url="http://127.0.0.1:9/none", timeout_s=0.2, retries=1))
    [result], _ = RewardEngine(cfg).score_batch([TrajectoryView(["x"])], [{}])
    assert result.failed and result.errors[0].startswith("remote: remote reward failed after 2 attempts")


def test_answers_that_are_not_a_reward_fail_their_sample_only(server):
    cfg = RewardConfig(remote=RemoteRewardConfig(url=server, timeout_s=5, retries=1, max_concurrency=4))
    kinds = [None, *NOT_A_REWARD, None]
    views = [TrajectoryView(["84"]) for _ in kinds]
    results, metrics = RewardEngine(cfg).score_batch(views, [{"kind": k} if k else {} for k in kinds])
    assert not results[0].failed and not results[-1].failed and results[0].scalar == results[-1].scalar == 1.0
    errors = {k: r.errors[0] for k, r in zip(kinds[1:-1], results[1:-1], strict=True)}
    assert all(r.failed and r.scalar == 0.0 for r in results[1:-1])
    assert all(f"remote reward at {server} answered HTTP" in e for e in errors.values()), errors
    # a gateway page and a plain-text body are retried like other transient failures, then quoted
    assert errors["html502"].startswith("remote: remote reward failed after 2 attempts")
    assert "HTTP 502 '<html><head><title>502 Bad Gateway" in errors["html502"] and "END" not in errors["html502"]
    assert "after 2 attempts" in errors["text200"] and "HTTP 200 'service warming up" in errors["text200"]
    assert "which is not JSON" in errors["text200"]
    # JSON that is not a number is the service's answer: no retry
    for kind in ("string", "list"):
        assert errors[kind].endswith('expected {"reward": number}') and "attempts" not in errors[kind]
    assert metrics["reward/failed_frac"] == pytest.approx(len(NOT_A_REWARD) / len(kinds))


def test_a_nonfinite_remote_reward_is_passed_on_for_the_step_to_refuse(server):
    """NaN / Infinity answers are values, not failures: `trainers.rl.step.check_finite_rewards`
    stops the step on them (a failure would be masked and the run would go on)."""
    cfg = RewardConfig(remote=RemoteRewardConfig(url=server, timeout_s=5, retries=1, max_concurrency=2))
    results, _ = RewardEngine(cfg).score_batch([TrajectoryView(["84"])] * 2, [{"kind": "nan"}, {"kind": "inf"}])
    assert [r.failed for r in results] == [False, False]
    assert math.isnan(results[0].values["remote"]) and results[1].values["remote"] == math.inf
