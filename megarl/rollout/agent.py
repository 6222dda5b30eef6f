"""The multi-turn agent loop, token in / token out.

For every sample: generate -> parse tool calls -> run the tools -> append the tool-result tokens
(masked out of the loss) and the next assistant header -> generate again, until the model answers
without a tool call, or max turns / max total tokens are reached. Text is never re-tokenized: the
model's own tokens are kept as generated and only the tool observations are rendered, with
`render_tool_observation`, so the trajectory's tokens are what rendering the whole conversation
would give.

Two schedules, the same tokens (`loop`):
- lock_step: all active samples advance together, one engine call per turn for the whole batch,
  so every conversation waits for the slowest turn and for every tool call of that turn;
- per_trajectory: each conversation advances on its own: its next turn goes to its engine
  (`engine.turn`, continuous batching across conversations) as soon as its tool results are back,
  and tool calls run concurrently (each with its tool's timeout). The first turn of a prompt is one
  request for its n samples, as in lock_step, and every later turn is seeded by its own tokens, so
  the two schedules sample the same tokens given the same engine outputs.

Each response token carries the weight version that sampled it (`token_versions`; -1 for tool
observations): under asynchronous RL a weight sync may land between two turns of a conversation.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
from dataclasses import dataclass, field

from megarl.data.render import render_tool_observation
from megarl.rollout.engine import SamplingConfig
from megarl.rollout.tool_parser import get_parser
from megarl.rollout.tools import ToolExecutor

MAX_CONVERSATION_THREADS = 1024   # per_trajectory: conversations between two turns at once


@dataclass
class Trajectory:
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)          # 1: model tokens, 0: tool observations
    rollout_logprobs: list[float] = field(default_factory=list)  # engine log-probs (0 for observations)
    token_versions: list[int] = field(default_factory=list)      # weights that sampled each token (-1: observation)
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    parse_failures: int = 0
    finish: str = ""        # "answer" | "length" | "max_turns" | "max_total_tokens" | "abort"
    weight_versions: set = field(default_factory=set)
    events: list[dict] = field(default_factory=list)             # readable log for rewards and review

    @property
    def total_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


class AgentLoop:
    def __init__(self, engine, tokenizer, tools: ToolExecutor | None = None, tool_call_format: str = "hermes",
                 max_turns: int = 4, max_total_tokens: int = 2048, max_tool_output_tokens: int = 512,
                 loop: str = "lock_step"):
        """`engine`: `generate(prompts, sampling, max_tokens_each)` (lock_step) or an async
        `turn(key, prompt, sampling, max_tokens)` (per_trajectory; `key` keeps a prompt's
        conversations on one engine, whose prefix cache holds their shared prompt)."""
        if loop not in ("lock_step", "per_trajectory"):
            raise ValueError(f"agent loop {loop!r}: expected lock_step or per_trajectory")
        self.engine, self.tokenizer, self.tools, self.loop = engine, tokenizer, tools, loop
        self.parser = get_parser(tool_call_format)
        self.max_turns, self.max_total_tokens = max_turns, max_total_tokens
        self.max_tool_output_tokens = max_tool_output_tokens
        self.eos = tokenizer.eos_token_id

    def run(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[list[Trajectory]]:
        """`sampling.n` trajectories per prompt."""
        if self.loop == "per_trajectory":
            return asyncio.run(self._run_each(prompt_ids, sampling))
        groups = [[Trajectory(list(p)) for _ in range(sampling.n)] for p in prompt_ids]
        active = [t for g in groups for t in g]
        first = True
        while active:
            step = self._turn_sampling(sampling)
            # each conversation's turn is capped by its own remaining budget: one long conversation
            # must not cut every other one's answer short
            if first:  # n samples of each prompt in one request
                step.n = sampling.n
                budgets = [self.max_total_tokens - len(p) for p in prompt_ids]
                outs = self.engine.generate(prompt_ids, step, budgets)
                completions = [c for out in outs for c in out]
                first = False
            else:
                budgets = [self.max_total_tokens - t.total_tokens for t in active]
                outs = self.engine.generate([t.prompt_ids + t.response_ids for t in active], step, budgets)
                completions = [out[0] for out in outs]
            still = []
            for traj, comp in zip(active, completions):
                if self._advance(traj, comp):
                    still.append(traj)
            active = still
        return groups

    def _turn_sampling(self, sampling: SamplingConfig) -> SamplingConfig:
        """One sample per request after the first turn; a turn ends at the end-of-turn token."""
        return SamplingConfig(n=1, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                              max_tokens=sampling.max_tokens, seed=sampling.seed, stop_token_ids=[self.eos])

    async def _run_each(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[list[Trajectory]]:
        groups = [[Trajectory(list(p)) for _ in range(sampling.n)] for p in prompt_ids]
        turn = self._turn_sampling(sampling)
        # a thread per conversation between turns (they mostly wait on a tool): asyncio's default of
        # cpu_count + 4 threads would let only that many conversations call tools at once
        threads = min(MAX_CONVERSATION_THREADS, len(prompt_ids) * sampling.n)
        asyncio.get_running_loop().set_default_executor(
            concurrent.futures.ThreadPoolExecutor(max(1, threads), thread_name_prefix="megarl-conversation"))

        async def conversation(key: int, t: Trajectory, comp) -> None:
            # tools (and the parsing) in a worker thread: other conversations go on meanwhile
            while await asyncio.to_thread(self._advance, t, comp):
                budget = self.max_total_tokens - t.total_tokens
                comp = (await self.engine.turn(key, t.prompt_ids + t.response_ids, turn, budget))[0]

        async def prompt(key: int, ids: list[int], group: list[Trajectory]) -> None:
            first = await self.engine.turn(key, ids, dataclasses.replace(turn, n=sampling.n),
                                           self.max_total_tokens - len(ids))
            await asyncio.gather(*(conversation(key, t, c) for t, c in zip(group, first)))

        await asyncio.gather(*(prompt(i, ids, g) for i, (ids, g) in enumerate(zip(prompt_ids, groups))))
        return groups

    def _advance(self, t: Trajectory, comp) -> bool:
        """Append one model turn (and its tool results); True while the trajectory goes on."""
        t.turns += 1
        t.response_ids += comp.token_ids
        t.loss_mask += [1] * len(comp.token_ids)
        t.rollout_logprobs += comp.logprobs
        t.token_versions += [comp.weight_version] * len(comp.token_ids)
        t.weight_versions.add(comp.weight_version)
        text = self.tokenizer.decode(comp.token_ids, skip_special_tokens=False)
        parsed = self.parser.parse(text.removesuffix(self.tokenizer.eos_token))
        t.parse_failures += len(parsed.errors)
        t.events.append({"role": "assistant", "text": text, "calls": [c.__dict__ for c in parsed.calls],
                         "parse_errors": parsed.errors})
        if comp.finish_reason != "stop":
            t.finish = "length" if comp.finish_reason == "length" else "abort"
            return False
        if not parsed.calls and not parsed.errors:
            t.finish = "answer"
            return False
        if t.turns >= self.max_turns:
            t.finish = "max_turns"
            return False
        results = []
        for call in parsed.calls:
            t.tool_calls += 1
            result = self.tools.execute(call) if self.tools else None
            text_out = result.text if result else f"Error: no tools are available (called {call.name!r})"
            if result is None or not result.ok:
                t.tool_errors += 1
            results.append(self._clip(text_out))
            t.events.append({"role": "tool", "name": call.name, "text": results[-1],
                             "ok": bool(result and result.ok)})
        results += [f"Error: {e}" for e in parsed.errors]  # the model learns why its call failed
        obs = render_tool_observation(self.tokenizer, results)
        if t.total_tokens + len(obs) >= self.max_total_tokens:
            t.finish = "max_total_tokens"
            return False
        t.response_ids += obs
        t.loss_mask += [0] * len(obs)
        t.rollout_logprobs += [0.0] * len(obs)
        t.token_versions += [-1] * len(obs)
        return True

    def _clip(self, text: str) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.max_tool_output_tokens:
            return text
        kept = self.tokenizer.decode(ids[:self.max_tool_output_tokens])
        return f"{kept}\n[tool output cut: {len(ids)} tokens, budget {self.max_tool_output_tokens}]"
