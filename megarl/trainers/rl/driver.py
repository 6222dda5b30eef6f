"""GRPO / PPO-family RL on Ray: the driver loop.

    prompts ─► rollout fleet (vLLM, multi-turn tools) ─► rewards (components) ─► old / ref log-probs
      (and values) ─► advantages (registry) ─► ppo_epochs × mini-batches of actor (and critic)
      updates ─► weight sync ─► metrics, checkpoint

`RLDriver.__init__` reads the inputs; `start` brings up the actor gang (one megatron rank per Ray
actor), the frozen reference gang when KL needs one, the critic (PPO), a reward-model gang, and
the rollout fleet joined to the actor in one weight-sync group. `train` is the loop; each phase
of `step` is a named function of `step.py`. The driver holds the data position, the KL controller
and the step; a checkpoint stores them with the actor's (and critic's) model, optimizer, LR
schedule and RNG states, and `trainer.resume: auto` continues from the newest complete one (the
engines are re-synced to the resumed weights before the first rollout). Every rollout is stamped
with the weight version that produced it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from megarl.config.recipe import Recipe
from megarl.metrics import SAMPLES_FILE, PhaseTimer
from megarl.trainers.common import critic_hf_dir, has_hf_weights, initial_checkpoint
from megarl.trainers.rl import step as phases
from megarl.trainers.rl.ahead import FILE as AHEAD_FILE
from megarl.trainers.rl.ahead import Produced, RolloutsAhead
from megarl.trainers.rl.gangs import (
    TAG,
    Gang,
    MemoryHandOff,
    RayPlacement,
    WeightSync,
    build_fleet,
    engine_model_dir,
    handoff_enabled,
    start_ray,
)
from megarl.trainers.rl.producer import FILE as BUFFER_FILE
from megarl.trainers.rl.producer import AsyncRollouts, EngineGate, GatedEngine
from megarl.trainers.runner import (
    StagePolicy,
    StageResult,
    checkpoint_path,
    open_metrics,
    resume_checkpoint,
    run_stage,
    truncate_metrics,
)

CRITIC_CKPT_DIR = "critic_checkpoints"
PROMPTS_FILE = "prompts.jsonl"   # per step: the data rows trained on and the weight versions that sampled them


def run(recipe: Recipe) -> int:
    def body() -> StageResult:
        driver = RLDriver(recipe)
        try:
            driver.start()
            return driver.train()
        finally:
            driver.close()

    return run_stage(recipe, TAG, body)


@dataclass
class RLInputs:
    """What the driver reads before the gangs start (the engines may already be starting)."""

    init: str                 # the actor's starting megatron checkpoint
    hf_cfg: dict
    tokenizer: object
    tools: object             # ToolExecutor or None
    data: object              # PromptDataset
    eval_data: object         # PromptDataset or None


def load_inputs(recipe: Recipe) -> RLInputs:
    from megarl.data.prompts import PromptDataset
    from megarl.data.tokenizer import load_tokenizer
    from megarl.models.hf_config import read_hf_config
    from megarl.reward.functions import required_metadata
    from megarl.rollout.tool_spec import load_tool_specs
    from megarl.rollout.tools import ToolExecutor

    ro, mt = recipe.rollout, recipe.rollout.multi_turn
    init = initial_checkpoint(recipe, TAG)
    tokenizer = load_tokenizer(recipe.model, os.path.join(init, "hf"))
    tools = ToolExecutor(load_tool_specs(mt.tools)) if mt and mt.tools else None
    needs = required_metadata([f.name for f in recipe.reward.functions]) if recipe.reward else None

    def prompts(path):
        return PromptDataset(path, tokenizer, ro.max_prompt_length, tools=set(tools.specs) if tools else None,
                             fmt=recipe.data.format, on_bad_row=recipe.data.on_bad_row,
                             extra_tools=tools.schemas() if tools else None, required_metadata=needs)

    data = prompts(recipe.data.train)
    if data.report.rejected:
        print(f"[{TAG}] {data.report.render()}", flush=True)
    eval_data = prompts(recipe.data.eval) if recipe.data.eval else None
    if eval_data is not None and eval_data.report.rejected:
        print(f"[{TAG}] eval: {eval_data.report.render()}", flush=True)
    return RLInputs(init, read_hf_config(os.path.join(init, "hf")), tokenizer, tools, data, eval_data)


class RLDriver:
    def __init__(self, recipe: Recipe):
        from megarl.algorithms.kl import make_kl_controller
        from megarl.config.loader import with_absolute_paths

        recipe = self.recipe = with_absolute_paths(recipe)  # workers on other nodes have other working dirs
        t, k = recipe.trainer, recipe.algorithm.kl
        os.makedirs(t.output_dir, exist_ok=True)
        self.startup = PhaseTimer("startup")   # bring-up phases, logged with the first step
        self.inputs: RLInputs | None = None     # read in start(), once the engines are starting
        self.sampler = None                      # an EpochSampler over inputs.data
        self.kl_ctl = make_kl_controller(k.controller, k.coef, k.target, k.horizon)
        self.old_logprobs_in_update = phases.old_logprobs_in_update(recipe)
        self.step_count = 0
        self.actor = self.reference = self.critic = self.reward_model = self.fleet = self.placement = None
        self.logger = None
        self.handoff = MemoryHandOff(False, [], None)
        self.ahead = RolloutsAhead(self.produce)   # one_step_off; also holds rollouts a checkpoint kept
        self.producer: AsyncRollouts | None = None   # rollout_mode async
        self.gate: EngineGate | None = None

    # ---- bring-up ------------------------------------------------------------------------------
    def start(self) -> None:
        """Ray, the engines (the longest to start: launched first, then the inputs load and the gangs
        build meanwhile), gangs, rewards, the sync group; then resume and the per-run helpers. Each
        phase is timed (`startup/*`)."""
        from megarl.launch.placement import build_placement

        r, clock = self.recipe, self.startup
        pmap = build_placement(r)
        with clock.phase("ray"):
            start_ray(min_cpus=len(pmap.used_slots()))
            self.placement = RayPlacement(pmap, pin_cpus=r.cluster.cpu_pinning)
        print("\n".join(f"[{TAG}] placement: {line}" for line in pmap.lines()), flush=True)
        print(f"[{TAG}] nodes: " + ", ".join(f"{i}={ip}" for i, ip in enumerate(self.placement.node_ips)), flush=True)
        handoff = handoff_enabled(r, self.placement.gpu)   # then the engines wait for the gangs to leave the GPUs
        early = not handoff and has_hf_weights(r.model.path)   # else they start from the converted checkpoint
        if early:
            self._launch_engines(None)
        with clock.phase("inputs"):   # tokenizer, data, the starting checkpoint (converted once per content)
            self._load_inputs()
        init = self.inputs.init
        if not handoff and not early:
            self._launch_engines(init)
        self._start_gangs(pmap, init)
        self.handoff = MemoryHandOff(handoff, [self.actor, self.reference, self.critic],
                                     verify_sync=r.rollout.weight_sync.verify_logprobs)
        with clock.phase("engines_wait"):
            self.fleet = self.fleet or self.handoff.start_engines(
                lambda: build_fleet(r, engine_model_dir(r, init), self.placement))
            self.fleet.wait_ready()
        threads = "/".join(map(str, sorted(set(self.fleet.threads))))
        print(f"[{TAG}] engines: {threads} OpenMP thread(s) each", flush=True)
        with clock.phase("sync_setup"):
            self.sync = WeightSync(r, self.actor, self.fleet, self.inputs.hf_cfg)
        self.agent = self._agent_loop(self.fleet)
        if r.trainer.rollout_mode == "async":
            self._make_producer()
        with clock.phase("resume"):
            self._resume()
        self.logger = open_metrics(r, self.step_count)
        for name in (PROMPTS_FILE, SAMPLES_FILE):   # a fresh run starts them anew, a resumed one drops later steps
            truncate_metrics(os.path.join(r.trainer.output_dir, name), self.step_count)
        self.verify_seqs = self._verification_sequences()
        if self.producer is not None:
            self.producer.start()
        self._report_startup()

    def _launch_engines(self, init: str | None) -> None:
        """`init`: the converted starting checkpoint, needed only when model.path holds no HF weights."""
        with self.startup.phase("engines_launch"):
            self.fleet = build_fleet(self.recipe, engine_model_dir(self.recipe, init), self.placement, wait=False)

    def _load_inputs(self) -> None:
        from megarl.data.sampler import EpochSampler

        r = self.recipe
        self.inputs = load_inputs(r)
        self.sampler = EpochSampler(len(self.inputs.data), r.data.seed, r.data.shuffle)

    def _start_gangs(self, pmap, init: str) -> None:
        from megarl.reward.engine import RewardEngine
        from megarl.runtime.device import threads_per_rank
        from megarl.workers import ACTOR, CRITIC, REFERENCE, REWARD_MODEL

        r, clock = self.recipe, self.startup
        threads = threads_per_rank(r.derived.train_world_size, r.cluster.cpu_threads_per_rank)
        with clock.phase("gangs_launch"):   # every gang's processes start together, then build together
            starts = {ACTOR: init}
            if REFERENCE in pmap.roles:
                starts[REFERENCE] = init
            if CRITIC in pmap.roles:
                starts[CRITIC] = initial_checkpoint(r, TAG, critic_hf_dir(r, TAG))
            if REWARD_MODEL in pmap.roles:
                starts[REWARD_MODEL] = initial_checkpoint(r, TAG, r.reward.reward_model.path)
            gangs = []
            for role, ckpt in starts.items():   # kept as made (self.<role>): close() shuts down what exists
                gangs.append(Gang(r, ckpt, role, threads, self.placement, wait=False))
                setattr(self, role, gangs[-1])
            for gang in gangs:
                gang.begin_build()
        with clock.phase("gangs_build"):
            for gang in gangs:
                gang.ready()
        scorer = self.reward_model.reward_scorer(r.derived.dp) if self.reward_model else None
        self.rewards = RewardEngine(r.reward, scorer)

    def _report_startup(self) -> None:
        """`startup/*` seconds (logged with the first step) and one line: from the process's start
        (imports and recipe included) to the first step."""
        import psutil

        seconds = self.startup.seconds
        seconds["startup/total_s"] = time.time() - psutil.Process().create_time()
        parts = ", ".join(f"{k[8:-2]} {v:.1f}" for k, v in seconds.items() if k != "startup/total_s")
        print(f"[{TAG}] ready {seconds['startup/total_s']:.1f}s after `megarl train` started ({parts})", flush=True)

    def _make_producer(self) -> None:
        """The async producer: its own agent loop over the fleet behind the gate."""
        t = self.recipe.trainer
        self.gate = EngineGate()
        agent = self._agent_loop(GatedEngine(self.fleet, self.gate))

        def produce(round_: int, prompts: list) -> list:
            groups = agent.run([p.prompt_ids for p in prompts], phases.sampling_for(self.recipe, round_))
            return phases.score_groups(self.recipe, prompts, groups, self.score)

        a = self.recipe.algorithm
        self.producer = AsyncRollouts(t.prompts_per_step, t.max_staleness, t.stale_policy, self.sampler,
                                      self.rows, produce, lambda: self.fleet.weight_version, self.step_count,
                                      a.dynamic_sampling_max_rounds if a.dynamic_sampling else None,
                                      lambda: self.fleet.engine_seconds)

    def _engines(self):
        """The engines to the driver's thread alone (weight sync, evaluation): in async mode the
        producer pauses after its engine call in flight."""
        import contextlib

        return self.gate.exclusive() if self.gate is not None else contextlib.nullcontext()

    def _resume(self) -> None:
        from megarl.data.sampler import EpochSampler

        path = resume_checkpoint(self.recipe, TAG, (CRITIC_CKPT_DIR,) if self.critic is not None else ())
        if not path:
            return
        state = self.actor.call("load", path)[0]
        if self.critic is not None:  # written before the actor's, so it exists whenever the actor's does
            self.critic.call("load", checkpoint_path(self.recipe, state["step"], CRITIC_CKPT_DIR))
        d = self.recipe.data
        self.step_count = state["step"]
        self.sampler = EpochSampler.from_state(len(self.inputs.data), d.seed, d.shuffle, state["sampler"])
        if self.producer is not None:   # its rounds count steps (the admission rule), unless its buffer says more
            self.producer.sampler, self.producer.rounds = self.sampler, self.step_count
            self.producer.next_step = self.step_count
        self.kl_ctl.load_state_dict(state["kl"])
        ahead = os.path.join(path, "driver", AHEAD_FILE)
        if os.path.exists(ahead):   # generated before the checkpoint, not trained on yet: trained on next
            with open(ahead, "rb") as f:
                self.ahead.load(f.read(), self.step_count)
        buffered = os.path.join(path, "driver", BUFFER_FILE)
        if os.path.exists(buffered):
            if self.producer is None:
                raise RuntimeError(f"{path} was written by an asynchronous run (trainer.rollout_mode: async) and holds "
                                   "its rollout buffer; resume it with rollout_mode async, or its buffered prompts "
                                   "would be skipped")
            with open(buffered, "rb") as f:
                self.producer.load(f.read())
        print(f"[{TAG}] resumed from {path} at step {self.step_count}"
              + (" with the next step's rollouts generated ahead" if self.ahead.ready else ""), flush=True)
        with self.handoff.sync_window():   # the engines start from the initial model: give them these weights
            self.sync.push(self.step_count)

    def _agent_loop(self, engine):
        from megarl.rollout.agent import AgentLoop

        ro, mt = self.recipe.rollout, self.recipe.rollout.multi_turn
        return AgentLoop(engine, self.inputs.tokenizer, self.inputs.tools, mt.tool_call_format if mt else "hermes",
                         mt.max_turns if mt else 1,
                         mt.max_total_tokens if mt else ro.max_prompt_length + ro.max_response_length,
                         mt.max_tool_output_tokens if mt else 512, loop=mt.loop if mt else "lock_step")

    def _verification_sequences(self):
        if not self.recipe.rollout.weight_sync.verify_logprobs:
            return None
        from megarl.sync.verify import verification_sequences

        return verification_sequences(self.inputs.hf_cfg["vocab_size"], count=self.recipe.derived.dp,
                                      length=16 * phases.sequence_multiple(self.recipe))

    # ---- the loop ------------------------------------------------------------------------------
    def train(self) -> StageResult:
        from megarl.metrics import ProgressBar, SampleWriter

        t = self.recipe.trainer
        samples = SampleWriter(t.output_dir, self.recipe.logging.samples_every)
        bar = ProgressBar(t.steps, self.step_count)
        policy = StagePolicy(self.recipe, t.steps)
        if t.eval_freq and self.step_count == 0:
            with self._engines():
                self.logger.log(0, self.evaluate(0))
        first = True
        while self.step_count < t.steps:
            metrics, rollouts = self.step()
            if first:   # the bring-up's phases and the engines' threads (startup/*), logged once per process
                metrics.update(self.startup.seconds)
                if self.fleet.threads:
                    metrics["startup/engine_threads"] = float(min(self.fleet.threads))
                first = False
            if t.eval_freq and (self.step_count % t.eval_freq == 0 or self.step_count == t.steps):
                with self._engines():
                    metrics.update(self.evaluate(self.step_count))
            self.logger.log(self.step_count, metrics)
            samples.maybe_write(self.step_count, rollouts.trajectories, rollouts.results, self.inputs.tokenizer)
            bar.update({"reward": metrics.get("reward/mean", 0.0), "s": metrics["timing/step_s"]})
            self._print(metrics)
            decision = policy.after_step(self.step_count)
            if decision.save:
                self.checkpoint(self.step_count)
            if decision.stop:
                return policy.result(self.step_count, decision)
        bar.close()
        return policy.result(self.step_count)

    def step(self):
        """One RL step, phase by phase -> (metrics, the rollouts it trained on)."""
        timer, r = PhaseTimer(), self.recipe
        t_step, version = time.perf_counter(), self.step_count   # the weights this step starts from
        produced, ahead, async_m = self._rollouts(timer)
        rollouts = produced.rollouts
        with timer.phase("reward"):
            batch, reward_m = phases.build_batch(r, rollouts, self.inputs.tokenizer.pad_token_id)
        logprob_m, compute = self.score_batch(batch, timer)
        with timer.phase("advantage"):
            plan = phases.compute_advantages(r, batch, self.kl_ctl.coef)
        with timer.phase("update"):
            update_m = self.update(batch, plan)
        if self.reference is not None and batch.old_logp is None:  # KL of the policy that sampled, as the update saw it
            logprob_m.update({"kl/ref_mean": update_m["actor/kl_ref"], "kl/coef": self.kl_ctl.coef})
        self.step_count += 1
        if self.ahead.running:   # the engines finish the next step's rollouts before new weights arrive
            with timer.phase("rollout_wait"):
                self.ahead.finish()
        with timer.phase("sync"), self._engines(), self.handoff.sync_window():
            sync_m = self.sync.push(self.step_count, self.verify_seqs)
        if self.producer is not None:
            self.producer.weights_updated()
        if self.reference is not None:
            self.kl_ctl.update(logprob_m.get("kl/ref_mean", 0.0), batch.size)
        timings = self._timings(timer, 0.0 if ahead else rollouts.reward_seconds, t_step, produced.engine_seconds,
                                compute + update_m["timing/update_compute_s"])
        entropy = logprob_m.pop("entropy")
        passes = tuple(name for name, ran in (("old_logprobs", not self.old_logprobs_in_update),
                                              ("ref_logprobs", self.reference is not None),
                                              ("values", self.critic is not None)) if ran)
        flops_m = phases.flops_metrics(self.inputs.hf_cfg, batch, r.algorithm.ppo_epochs, passes)
        lag_m = {**phases.staleness_metrics(batch, rollouts.trajectories, version, produced.seconds, ahead), **async_m}
        self._record_prompts(rollouts)
        return phases.step_metrics(batch, rollouts, timings, entropy, reward_m, update_m, logprob_m, plan.metrics,
                                   sync_m, flops_m, lag_m,
                                   generate_seconds=produced.seconds - rollouts.reward_seconds), rollouts

    def _rollouts(self, timer: PhaseTimer) -> tuple[Produced, bool, dict]:
        """This step's rollouts -> (them, whether they were generated ahead, async/* metrics). With
        one_step_off the next step's generation starts here, on the engines' current weights,
        before this one trains; in async mode they come from the producer's buffer."""
        step, last = self.step_count, self.recipe.trainer.steps
        produced, metrics = None, {}
        if self.ahead.running or self.ahead.ready:
            with timer.phase("rollout_wait"):
                produced = self.ahead.take(step)
        elif self.producer is not None:
            with timer.phase("rollout_wait"):
                taken, metrics = self.producer.take(step)
            produced = self._from_buffer(step, taken)
        ahead = produced is not None
        if not ahead:
            with timer.phase("rollout"):
                produced = self.produce(step)
        if self.recipe.trainer.rollout_mode == "one_step_off" and step + 1 < last:
            self.ahead.start(step + 1)
        return produced, ahead, metrics

    @staticmethod
    def _from_buffer(step: int, taken) -> Produced:
        """The async producer's groups as a step's rollouts; generation time = that of the rounds'
        worth looked at (each group carries its round's time, a round is one batch of groups)."""
        looked, per_round = taken.groups + taken.filtered, len(taken.groups)
        seconds = sum(b.seconds for b in looked) / per_round
        engine_seconds = sum(b.engine_seconds for b in looked) / per_round
        rollouts = phases.Rollouts([b.group for b in taken.groups], taken.rounds, taken.first_round_informative,
                                   filtered=[b.group for b in taken.filtered])
        return Produced(step, rollouts, seconds, engine_seconds)

    def produce(self, step: int) -> Produced:
        """Step `step`'s rollouts with their rewards (in the driver's thread, or in `self.ahead`'s)."""
        t0, engine_before = time.perf_counter(), self.fleet.engine_seconds
        with self.handoff.rollout_window():
            rollouts = phases.collect_rollouts(self.recipe, step, self.sampler_take, self.agent.run, self.score)
        return Produced(step, rollouts, time.perf_counter() - t0, self.fleet.engine_seconds - engine_before)

    def _record_prompts(self, rollouts) -> None:
        """prompts.jsonl: the data rows each step trained on and the weight version that sampled each
        (audits that a resumed or asynchronous run neither drops nor repeats a prompt)."""
        import json

        record = {"step": self.step_count, "rows": [g.prompt.row for g in rollouts.groups],
                  "weight_versions": [phases.oldest_version(g.trajectories) for g in rollouts.groups]}
        if rollouts.filtered:   # dynamic sampling used these prompts and left their groups out
            record["filtered_rows"] = [g.prompt.row for g in rollouts.filtered]
        with open(os.path.join(self.recipe.trainer.output_dir, PROMPTS_FILE), "a") as f:
            f.write(json.dumps(record) + "\n")

    # ---- phases that call the gangs ----------------------------------------------------------
    def sampler_take(self, k: int) -> list:
        return self.rows(self.sampler.take(k))

    def rows(self, indices: list[int]) -> list:
        """The prompts at these dataset indices."""
        return [self.inputs.data[i] for i in indices]

    def score(self, trajectories: list, metadata: list[dict]) -> list:
        from megarl.reward.functions import TrajectoryView

        views = [TrajectoryView.from_trajectory(x) for x in trajectories]
        return self.rewards.score_batch(views, metadata, [x.prompt_ids + x.response_ids for x in trajectories])[0]

    def score_batch(self, batch, timer: PhaseTimer) -> tuple[dict, float]:
        """Old (and reference) log-probs and critic values into the batch -> (metrics with the
        rollout's entropy, model compute seconds inside the workers)."""
        model_in = {"tokens": batch.tokens, "mask": batch.mask}
        metrics, compute = {"entropy": None}, 0.0
        if not self.old_logprobs_in_update:
            with timer.phase("old_logprobs"):
                old = self.actor.logprobs(model_in, with_entropy=True)
            batch.old_logp = old["logp"] * batch.mask
            metrics, compute = {"entropy": old["entropy"]}, old["seconds"]
        if self.reference is not None:
            with timer.phase("ref_logprobs"):
                ref = self.reference.logprobs(model_in)
            batch.ref_logp = ref["logp"] * batch.mask
            if batch.old_logp is not None:  # else the update reports it (actor/kl_ref)
                metrics.update(phases.reference_kl(self.recipe, batch, self.kl_ctl.coef))
            compute += ref["seconds"]
        if self.critic is not None:
            with timer.phase("values"):
                vals = self.critic.gather("compute_values", model_in)
            batch.values = vals["values"] * batch.mask
            compute += vals["seconds"]
        return metrics, compute

    def update(self, batch, plan: phases.UpdatePlan) -> dict:
        from megarl.algorithms.masked import masked_mean

        minibatches = self.recipe.derived.minibatches_per_step
        metrics = self.actor.call_sharded("update", phases.update_inputs(batch, plan), minibatches, self.kl_ctl.coef,
                                          minibatches=minibatches)[0]
        if self.critic is not None:
            metrics.update(self.critic.call_sharded("update_critic", phases.critic_inputs(batch), minibatches,
                                                    minibatches=minibatches)[0])
            metrics["critic/values_mean"] = float(masked_mean(batch.values, batch.mask))
        return metrics

    def evaluate(self, at: int) -> dict:
        """Reward metrics (eval/*) over rollout.eval_n answers per held-out prompt at rollout.eval_temperature."""
        if self.inputs.eval_data is None:
            return {}
        t0 = time.perf_counter()
        prompts = self.inputs.eval_data.prompts
        sampling = phases.eval_sampling(self.recipe, at)
        with self.handoff.rollout_window():
            groups = self.agent.run([p.prompt_ids for p in prompts], sampling)
        from megarl.reward.engine import reward_summary

        trajs = [x for g in groups for x in g]
        m = reward_summary(self.score(trajs, [p.metadata for p, g in zip(prompts, groups) for _ in g]))
        out = {f"eval/{k.split('/', 1)[1]}": v for k, v in m.items()}
        out["eval/seconds"] = time.perf_counter() - t0
        return out

    def checkpoint(self, at: int) -> None:
        """The actor's (and critic's) checkpoint with the driver's state: data position, KL
        controller, and the rollouts generated ahead and not yet trained on (the data position is
        past their prompts: without them a resumed run would skip those prompts)."""
        import ray

        if self.critic is not None:
            self.critic.call("save", checkpoint_path(self.recipe, at, CRITIC_CKPT_DIR), {"step": at})
        sampler, files = self.sampler.state_dict(), {}
        if (ahead := self.ahead.state()) is not None:
            files[AHEAD_FILE] = ray.put(ahead)
        if self.producer is not None:   # the position from before the round in flight, which is generated again
            sampler, buffered = self.producer.snapshot()
            files[BUFFER_FILE] = ray.put(buffered)
        self.actor.call("save", checkpoint_path(self.recipe, at),
                        {"step": at, "sampler": sampler, "kl": self.kl_ctl.state_dict()}, files)

    # ---- bookkeeping ---------------------------------------------------------------------------
    @staticmethod
    def _timings(timer: PhaseTimer, rollout_reward_s: float, t_step: float, engine_s: float, compute: float) -> dict:
        """The driver thread's phases (they add up to the step); rollouts generated ahead show as
        the time waited for them (`timing/rollout_wait_s`), their own time in `async/*`."""
        out = dict(timer.seconds)
        out.setdefault("timing/rollout_s", 0.0)
        # the reward calls made while collecting belong to the reward phase, not the rollout
        out["timing/rollout_s"] -= rollout_reward_s
        out["timing/reward_s"] += rollout_reward_s
        out["timing/engine_generate_s"] = engine_s
        out["timing/step_s"] = time.perf_counter() - t_step
        out["timing/model_compute_s"] = engine_s + compute
        out["timing/overhead_fraction"] = max(0.0, 1.0 - out["timing/model_compute_s"] / out["timing/step_s"])
        return out

    def _print(self, m: dict) -> None:
        from megarl.reward.engine import failure_counts

        failed = failure_counts(m)
        print(f"[{TAG}] step {self.step_count}/{self.recipe.trainer.steps} reward {m.get('reward/mean', 0.0):.3f} "
              f"task {m.get('reward/task', 0.0):.3f} turns {m['rollout/turns_mean']:.2f} "
              f"pg {m['actor/pg_loss']:.4f} {m['timing/step_s']:.1f}s"
              + (f" | reward failures: {failed}" if failed else ""), flush=True)

    def close(self) -> None:
        if self.producer is not None:
            self.producer.stop()
        if self.logger is not None:
            self.logger.close()
        for gang in (self.actor, self.reference, self.critic, self.reward_model):
            if gang is not None:
                gang.shutdown()
        if self.fleet is not None:
            self.fleet.shutdown()
        if self.placement is not None:
            self.placement.remove()
