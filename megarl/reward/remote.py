"""A remote reward: POST each sample as JSON to an HTTP service, with a timeout, retries with
backoff, and bounded concurrency. The service answers {"reward": float}. A sample whose request
still fails after the retries is marked failed with the error (never a hang, never a made-up 0).

Request body: {"response": final answer text, "assistant_texts": [...], "tool_calls": [...],
"metadata": row metadata}.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from megarl.config.recipe import RemoteRewardConfig
from megarl.reward.functions import TrajectoryView


class RemoteReward:
    def __init__(self, config: RemoteRewardConfig):
        self.config = config

    def _one(self, payload: dict) -> tuple[float | None, str | None]:
        body = json.dumps(payload).encode()
        error = None
        for attempt in range(self.config.retries + 1):
            if attempt:
                time.sleep(min(0.2 * 2 ** (attempt - 1), 2.0))
            request = urllib.request.Request(self.config.url, data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
                    data = json.loads(response.read())
                reward = data.get("reward") if isinstance(data, dict) else None
                if not isinstance(reward, (int, float)) or isinstance(reward, bool):
                    return None, f"remote reward answered {str(data)[:120]!r}, expected {{\"reward\": number}}"
                return float(reward), None
            except urllib.error.HTTPError as e:
                error = f"HTTP {e.code}"
                if e.code < 500:
                    return None, f"remote reward refused the request: {error}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        return None, f"remote reward failed after {self.config.retries + 1} attempts: {error}"

    def score(self, views: list[TrajectoryView], metadata: list[dict]) -> list[tuple[float | None, str | None]]:
        payloads = [{"response": v.final_answer, "assistant_texts": v.assistant_texts, "tool_calls": v.tool_calls,
                     "metadata": m} for v, m in zip(views, metadata)]
        with ThreadPoolExecutor(max_workers=self.config.max_concurrency) as pool:
            return list(pool.map(self._one, payloads))
