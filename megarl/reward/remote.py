"""A remote reward: POST each sample as JSON to an HTTP service, with a timeout, retries with
backoff, and bounded concurrency. The service answers {"reward": float}. A sample whose request
still fails after the retries is marked failed with the error (never a hang, never a made-up 0,
never an exception that ends the run).

Retried: 5xx, network errors and timeouts, and a body that is not JSON at all (typically a proxy's
HTML error page). Not retried (the answer would repeat): 4xx, and JSON that is not
{"reward": number}. Each message names the URL, the HTTP status and the start of the body. A NaN or
infinite number is passed on as the service's value: the RL step refuses it (it stops before any
update, naming the sample), since a service that answers NaN is broken, not one sample.

Request body: {"response": final answer text, "assistant_texts": [...], "tool_calls": [...],
"metadata": row metadata}.
"""

from __future__ import annotations

import http.client
import json
import math
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from megarl.config.recipe import RemoteRewardConfig
from megarl.reward.functions import TrajectoryView

BODY_PREVIEW_CHARS = 200


class RetryableFailure(Exception):
    """A failed attempt that another attempt may fix."""


class FinalFailure(Exception):
    """A failed attempt that another attempt would repeat."""


def body_preview(raw: bytes) -> str:
    """The start of a response body for an error message, whatever its encoding."""
    text = raw[:4 * BODY_PREVIEW_CHARS].decode("utf-8", "replace")[:BODY_PREVIEW_CHARS]
    return repr(text) if text else "(empty body)"


class RemoteReward:
    def __init__(self, config: RemoteRewardConfig):
        self.config = config

    def _one(self, payload: dict) -> tuple[float | None, str | None]:
        """(reward, None) or (None, why the sample failed)."""
        body = json.dumps(payload).encode()
        error = None
        for attempt in range(self.config.retries + 1):
            if attempt:
                time.sleep(min(0.2 * 2 ** (attempt - 1), 2.0))
            try:
                return self._attempt(body), None
            except FinalFailure as e:
                return None, str(e)
            except RetryableFailure as e:
                error = str(e)
            except Exception as e:  # noqa: BLE001 - one bad answer must fail its sample, not the run
                return None, f"remote reward at {self.config.url}: {type(e).__name__}: {e}"
        return None, f"remote reward failed after {self.config.retries + 1} attempts: {error}"

    def _attempt(self, body: bytes) -> float:
        """One POST -> the reward; raises RetryableFailure or FinalFailure with the reason."""
        request = urllib.request.Request(self.config.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as e:
            answered = self._answered(e.code, self._error_body(e))
            if e.code < 500:
                raise FinalFailure(f"remote reward refused the request: {answered}") from e
            raise RetryableFailure(answered) from e
        except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException) as e:
            raise RetryableFailure(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from e
        return self._reward_from(status, raw)

    def _reward_from(self, status: int, raw: bytes) -> float:
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and bad encodings are ValueErrors
            raise RetryableFailure(f"{self._answered(status, raw)}, which is not JSON ({e})") from e
        reward = data.get("reward") if isinstance(data, dict) else None
        if not isinstance(reward, (int, float)) or isinstance(reward, bool):
            raise FinalFailure(f"{self._answered(status, raw)}, expected {{\"reward\": number}}")
        try:
            return float(reward)
        except OverflowError:  # an int beyond float range
            return math.inf

    def _answered(self, status: int, raw: bytes) -> str:
        return f"remote reward at {self.config.url} answered HTTP {status} {body_preview(raw)}"

    @staticmethod
    def _error_body(error: urllib.error.HTTPError) -> bytes:
        try:
            return error.read()
        except (OSError, http.client.HTTPException):
            return b""

    def score(self, views: list[TrajectoryView], metadata: list[dict]) -> list[tuple[float | None, str | None]]:
        payloads = [{"response": v.final_answer, "assistant_texts": v.assistant_texts, "tool_calls": v.tool_calls,
                     "metadata": m} for v, m in zip(views, metadata)]
        with ThreadPoolExecutor(max_workers=self.config.max_concurrency) as pool:
            return list(pool.map(self._one, payloads))
