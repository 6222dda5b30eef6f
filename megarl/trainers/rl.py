"""GRPO / PPO-family RL on Ray: the driver loop.

    prompts ─► rollout fleet (vLLM, multi-turn tools) ─► rewards (components) ─► old / ref log-probs
      ─► advantages (registry) ─► ppo_epochs × mini-batches of actor updates ─► weight sync ─► metrics

Workers: the actor gang (one `PolicyWorker` Ray actor per megatron rank), a frozen reference gang
when KL needs one, and the `RolloutFleet`. The driver holds the data position, the KL controller
and the step; a checkpoint (every `save_freq`, at the end, and on SIGTERM/SIGUSR1) stores them
with the actor's model, optimizer, LR schedule and RNG states, and `trainer.resume: auto`
continues from the newest complete one. The engines are re-synced to the resumed weights before
the first rollout, and every rollout is stamped with the weight version that produced it.
"""

from __future__ import annotations

import os
import signal
import socket
import time

import torch

from megarl.config.recipe import Recipe
from megarl.trainers.common import CKPT_DIR, EXIT_CHECKPOINTED, METRICS_FILE, has_hf_weights, initial_checkpoint

TAG = "rl"


class WorkerLost(RuntimeError):
    """A megatron worker process died; the gang cannot continue without it."""


class Gang:
    """The Ray actors of one megatron model group; `call` runs a method on every rank."""

    def __init__(self, recipe: Recipe, init_ckpt: str, role: str, threads: int):
        import ray

        from megarl.workers.policy import PolicyWorker

        world = recipe.derived.train_world_size
        port = _free_port()
        cls = ray.remote(num_cpus=0)(PolicyWorker)  # logical 0: CPU threads are set explicitly
        self.role = role
        self.workers = [cls.options(name=None).remote(recipe, init_ckpt, role, r, world, "127.0.0.1", port, threads)
                        for r in range(world)]
        self.call("pid")  # up, process group and model built (or this raises)

    def call(self, method: str, *args, **kwargs) -> list:
        import ray
        from ray.exceptions import RayActorError

        try:
            return ray.get([getattr(w, method).remote(*args, **kwargs) for w in self.workers])
        except RayActorError as e:
            raise WorkerLost(f"a {self.role} worker died during {method}: {str(e).splitlines()[0]}. Restart the "
                             "run: with trainer.resume=auto it continues from the last checkpoint") from None

    def call_async(self, method: str, *args, **kwargs) -> list:
        return [getattr(w, method).remote(*args, **kwargs) for w in self.workers]

    def logprobs(self, batch: dict, with_entropy: bool = False) -> dict[str, torch.Tensor]:
        return self.gather("compute_logprobs", batch, with_entropy)

    def gather(self, method: str, *args) -> dict[str, torch.Tensor]:
        """Per-sample tensors from the reporting rank of each data-parallel replica, in row order."""
        from megarl.runtime.local_group import from_bytes

        parts = sorted((from_bytes(p) for p in self.call(method, *args) if p is not None), key=lambda p: p[0])
        out = {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1] if k != "seconds"}
        out["seconds"] = max(p[1]["seconds"] for p in parts)  # model compute inside the workers
        return out

    def reward_scorer(self, dp: int):
        """`RewardEngine`'s rm_scorer: token sequences -> reward-model scores, the list padded with
        copies to a multiple of the data-parallel size (each replica scores an equal share)."""
        def scorer(sequences: list[list[int]]) -> list[float]:
            pad = (-len(sequences)) % dp
            return self.gather("score", list(sequences) + [sequences[0]] * pad)["scores"][:len(sequences)].tolist()

        return scorer

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w)


class WeightSync:
    """The actor gang's senders and the fleet's engines joined in one sync group (megarl.sync)."""

    def __init__(self, recipe: Recipe, actor: Gang, fleet, hf_cfg: dict):
        from megarl.config.validate import sync_transport
        from megarl.runtime.device import select_device
        from megarl.sync.plan import EngineLayout, WeightSyncPlan
        from megarl.sync.transport import Rendezvous

        ro = recipe.rollout
        dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[recipe.model.dtype]
        # `auto` is settled at load unless the device is only known here (cluster.device: auto)
        transport = sync_transport(ro.weight_sync.transport, not select_device(recipe.cluster.device).is_cuda,
                                   recipe.cluster.nodes, ro.quantization)
        self.plan = WeightSyncPlan.build(recipe.parallel, EngineLayout(ro.engines, ro.engine_tp),
                                         hf_cfg["model_type"], hf_cfg, bucket_bytes=ro.weight_sync.bucket_mb << 20,
                                         dtype=dtype, quantization=ro.quantization,
                                         transport=transport)
        self.actor, self.fleet, self.config = actor, fleet, ro.weight_sync
        self.generation = 0
        port = actor.call("sync_open_store", "127.0.0.1", ro.weight_sync.timeout_s)[0]
        self.rendezvous = Rendezvous("127.0.0.1", port, timeout_s=ro.weight_sync.timeout_s)
        self._join()
        print(f"[{TAG}] {self.plan.summary()}", flush=True)

    def _join(self) -> None:
        import ray

        engines = self.fleet.join_weight_sync_async(self.plan, self.rendezvous, self.generation)
        senders = self.actor.call_async("sync_join", self.plan, self.rendezvous, self.generation)
        ray.get(senders + engines)

    def push(self, version: int, verify_tokens: list[list[int]] | None = None) -> dict:
        import ray

        t0 = time.perf_counter()
        receives = self.fleet.receive_weights_async(version)
        sends = self.actor.call_async("sync_send", version)
        try:
            send_stats = ray.get(sends)
        except ray.exceptions.RayActorError as e:
            raise WorkerLost(f"an actor worker died during the weight sync: {str(e).splitlines()[0]}") from None
        except Exception as e:  # noqa: BLE001 - a sender's transport error usually means an engine went away
            from megarl.rollout.fleet import EngineLost
            from megarl.sync.transport import WeightSyncError

            try:
                self.fleet.finish_receive(receives, version)
            except EngineLost:
                raise
            except Exception:  # noqa: BLE001 - the engines' own failure adds nothing to the sender's
                pass
            raise WeightSyncError(f"the weight sync to version {version} failed on the trainer side: "
                                  f"{str(e).strip().splitlines()[-1]}") from None
        recv_stats = self.fleet.finish_receive(receives, version)
        out = {"sync/seconds": time.perf_counter() - t0, "sync/bytes": float(self.plan.total_bytes),
               "sync/buckets": float(len(self.plan.buckets)),
               "sync/engine_load_s": max(s["load_seconds"] for s in recv_stats),
               "sync/sender_gather_s": max(s["gather_seconds"] for s in send_stats)}
        if self.config.verify_logprobs and verify_tokens:
            out["sync/verify_max_diff"] = self.verify(verify_tokens)
        return out

    def verify(self, seqs: list[list[int]]) -> float:
        from megarl.sync.verify import compare_logprobs

        n = len(seqs)
        tokens = torch.tensor(seqs)
        batch = {"tokens": tokens, "mask": torch.ones(n, tokens.shape[1] - 1)}
        trainer = self.actor.logprobs(batch)["logp"].tolist()
        return compare_logprobs(trainer, self.fleet.prompt_logprobs(seqs), self.config.logprob_tolerance)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _engine_model_dir(recipe: Recipe, init_ckpt: str) -> str:
    """An HF directory with weights for the engines to start from (the weights are replaced by
    the first sync anyway; the engine needs a complete model to build itself)."""
    if has_hf_weights(recipe.model.path):
        return recipe.model.path
    from megarl.checkpoint.hf import convert_megatron_to_hf
    from megarl.runtime.local_group import run_local_group

    out = os.path.join(recipe.trainer.output_dir, "engine_init")
    if not has_hf_weights(out):
        run_local_group(convert_megatron_to_hf, 1, args=(init_ckpt, out), timeout=3600)
    return out


def loss_weights(mask: torch.Tensor, mode: str, norm_length: int) -> torch.Tensor:
    """Per-token weights w so that Σ w·ℓ / Σ mask is the requested aggregation over this
    mini-batch (megatron divides by the mini-batch's token count across all ranks)."""
    n_tok = mask.sum().clamp(min=1.0)
    n_seq = max(mask.shape[0], 1)
    if mode == "token-mean":
        return mask.clone()
    if mode == "seq-mean-token-mean":
        return mask * n_tok / (n_seq * mask.sum(-1, keepdim=True).clamp(min=1.0))
    if mode == "seq-mean-token-sum":
        return mask * n_tok / n_seq
    if mode == "seq-mean-token-sum-norm":
        return mask * n_tok / (n_seq * norm_length)
    raise KeyError(f"unknown loss aggregation {mode!r}")


class _Stop:
    def __init__(self):
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.signal = signum
        print(f"[{TAG}] received signal {signum}: checkpointing after this step, then stopping", flush=True)


def run(recipe: Recipe) -> int:
    import ray
    from transformers import AutoTokenizer

    from megarl.algorithms.advantages import ADVANTAGE_ESTIMATORS, AdvantageInputs, scores_to_token_rewards
    from megarl.algorithms.correction import mismatch_metrics, rollout_correction
    from megarl.algorithms.filtering import informative_groups, overlong_penalty
    from megarl.algorithms.kl import kl_penalized_rewards, make_kl_controller, token_kl
    from megarl.algorithms.masked import masked_whiten
    from megarl.checkpoint.hf import convert_megatron_to_hf
    from megarl.checkpoint.paths import latest_checkpoint
    from megarl.data.prompts import PromptDataset
    from megarl.data.sampler import EpochSampler
    from megarl.metrics import MetricsLogger, ProgressBar, SampleWriter
    from megarl.models.hf_config import read_hf_config
    from megarl.reward.engine import RewardEngine, reward_summary
    from megarl.reward.functions import TrajectoryView
    from megarl.rollout.agent import AgentLoop
    from megarl.rollout.batch import TrajectoryBatch
    from megarl.rollout.engine import EngineConfig, SamplingConfig
    from megarl.rollout.fleet import RolloutFleet
    from megarl.rollout.metrics import rollout_metrics
    from megarl.rollout.tool_spec import load_tool_specs
    from megarl.rollout.tools import ToolExecutor
    from megarl.runtime.local_group import run_local_group
    from megarl.trainers.common import critic_hf_dir
    from megarl.workers.policy import ACTOR, CRITIC, REFERENCE, REWARD

    t, ro, a = recipe.trainer, recipe.rollout, recipe.algorithm
    ov = a.overlong
    os.makedirs(t.output_dir, exist_ok=True)
    stop = _Stop()
    init = initial_checkpoint(recipe, TAG)
    engine_dir = _engine_model_dir(recipe, init)
    hf_cfg = read_hf_config(os.path.join(init, "hf"))
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(init, "hf"))
    mt = ro.multi_turn
    tools = ToolExecutor(load_tool_specs(mt.tools)) if mt and mt.tools else None
    extra_tools = tools.schemas() if tools else None
    data = PromptDataset(recipe.data.train, tokenizer, ro.max_prompt_length,
                         tools=set(tools.specs) if tools else None, fmt=recipe.data.format,
                         on_bad_row=recipe.data.on_bad_row, extra_tools=extra_tools)
    if data.report.rejected:
        print(f"[{TAG}] {data.report.render()}", flush=True)
    eval_data = (PromptDataset(recipe.data.eval, tokenizer, ro.max_prompt_length,
                               tools=set(tools.specs) if tools else None, fmt=recipe.data.format,
                               on_bad_row=recipe.data.on_bad_row, extra_tools=extra_tools)
                 if recipe.data.eval else None)
    rm_init = (initial_checkpoint(recipe, TAG, recipe.reward.reward_model.path, "reward_model_init")
               if recipe.reward.reward_model else None)

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):  # a cluster the launcher (megarl launch) brought up
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True, configure_logging=False)
        else:  # a private local cluster; logical CPUs >= actors (threads are set explicitly)
            ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=True,
                     configure_logging=False)
    threads = max(1, (os.cpu_count() or 1) // recipe.derived.train_world_size)
    fleet = actor = reference = critic = reward_model = None
    critic_init = (initial_checkpoint(recipe, TAG, critic_hf_dir(recipe, TAG), "critic_init")
                   if a.advantage_estimator == "gae" else None)
    logger = None
    try:
        actor = Gang(recipe, init, ACTOR, threads)
        needs_ref = a.kl.coef > 0
        reference = Gang(recipe, init, REFERENCE, threads) if needs_ref else None
        critic = Gang(recipe, critic_init, CRITIC, threads) if critic_init else None
        reward_model = Gang(recipe, rm_init, REWARD, threads) if rm_init else None
        rewards = RewardEngine(recipe.reward, reward_model.reward_scorer(recipe.derived.dp) if reward_model else None)
        fleet = RolloutFleet(EngineConfig(engine_dir, dtype={"fp32": "float32", "bf16": "bfloat16",
                                                             "fp16": "float16"}[recipe.model.dtype],
                                          max_model_len=ro.max_prompt_length + ro.max_response_length
                                          + (mt.max_tool_output_tokens * mt.max_turns if mt else 0),
                                          tensor_parallel_size=ro.engine_tp, kv_cache_bytes=ro.kv_cache_bytes,
                                          gpu_memory_utilization=ro.gpu_memory_utilization, seed=t.seed,
                                          quantization=ro.quantization),
                             ro.engines)
        sync = WeightSync(recipe, actor, fleet, hf_cfg)

        step, sampler = 0, EpochSampler(len(data), recipe.data.seed, recipe.data.shuffle)
        kl_ctl = make_kl_controller(a.kl.controller, a.kl.coef, a.kl.target, a.kl.horizon)
        ckpt_root = os.path.join(t.output_dir, CKPT_DIR)
        critic_root = os.path.join(t.output_dir, "critic_" + CKPT_DIR)
        resume_from = {"auto": latest_checkpoint(ckpt_root), "never": None}.get(t.resume, t.resume)
        if resume_from:
            state = actor.call("load", resume_from)[0]
            if critic is not None:  # written before the actor's, so it exists whenever the actor's does
                critic.call("load", os.path.join(critic_root, os.path.basename(resume_from)))
            step = state["step"]
            sampler = EpochSampler.from_state(len(data), recipe.data.seed, recipe.data.shuffle, state["sampler"])
            kl_ctl.load_state_dict(state["kl"])
            print(f"[{TAG}] resumed from {resume_from} at step {step}", flush=True)
        elif os.path.exists(os.path.join(t.output_dir, METRICS_FILE)):
            os.remove(os.path.join(t.output_dir, METRICS_FILE))  # a fresh run starts a fresh curve
        if step > 0:
            sync.push(step)  # the engines start from the initial model: give them the resumed weights

        logger = MetricsLogger(t.output_dir, recipe.logging.sinks, recipe.logging.project, recipe.logging.run_name,
                               recipe.logging.wandb_mode)
        samples = SampleWriter(t.output_dir, recipe.logging.samples_every)
        bar = ProgressBar(t.steps, step)
        loop = AgentLoop(fleet, tokenizer, tools, mt.tool_call_format if mt else "hermes",
                         mt.max_turns if mt else 1,
                         mt.max_total_tokens if mt else ro.max_prompt_length + ro.max_response_length,
                         mt.max_tool_output_tokens if mt else 512)
        multiple = recipe.parallel.tp * recipe.parallel.cp * 2 if (recipe.parallel.sp or recipe.parallel.cp > 1) else 1
        verify_seqs = None
        if ro.weight_sync.verify_logprobs:
            from megarl.sync.verify import verification_sequences

            verify_seqs = verification_sequences(hf_cfg["vocab_size"], count=recipe.derived.dp, length=16 * multiple)

        def checkpoint(at: int) -> str:
            path = os.path.join(ckpt_root, f"step_{at:06d}")
            if critic is not None:
                critic.call("save", os.path.join(critic_root, f"step_{at:06d}"), {"step": at})
            actor.call("save", path, {"step": at, "sampler": sampler.state_dict(), "kl": kl_ctl.state_dict()})
            return path

        def evaluate(at: int) -> dict:
            if eval_data is None:
                return {}
            t0 = time.perf_counter()
            sampling = SamplingConfig(n=1, temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k,
                                      max_tokens=ro.max_response_length, seed=t.seed + 10_000 + at)
            trajs = [g[0] for g in loop.run([p.prompt_ids for p in eval_data.prompts], sampling)]
            res, m = rewards.score_batch([TrajectoryView.from_trajectory(x) for x in trajs],
                                         [p.metadata for p in eval_data.prompts],
                                         [x.prompt_ids + x.response_ids for x in trajs])
            out = {f"eval/{k.split('/', 1)[1]}": v for k, v in m.items()}
            out["eval/seconds"] = time.perf_counter() - t0
            return out

        if t.eval_freq and step == 0:
            logger.log(0, evaluate(0))
        taken = 0
        while step < t.steps:
            timings: dict[str, float] = {}
            t_step = time.perf_counter()
            # ---- rollout + rewards (+ DAPO dynamic sampling / overlong shaping) -----------------
            t0 = time.perf_counter()
            engine_before = fleet.engine_seconds
            reward_seconds = 0.0
            kept: list[tuple] = []     # (prompt, trajectories, reward results, scores)
            spare: list[tuple] = []
            candidates = [data[i] for i in sampler.take(t.prompts_per_step)]
            rounds = 0
            first_informative = None
            while True:
                sampling = SamplingConfig(n=ro.n, temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k,
                                          max_tokens=ro.max_response_length, seed=t.seed + 1000 * rounds + step)
                groups = loop.run([p.prompt_ids for p in candidates], sampling)
                t_r = time.perf_counter()
                flat = [x for g in groups for x in g]
                gids = [i for i, g in enumerate(groups) for _ in g]
                res, _ = rewards.score_batch([TrajectoryView.from_trajectory(x) for x in flat],
                                             [candidates[i].metadata for i in gids],
                                             [x.prompt_ids + x.response_ids for x in flat])
                scores = torch.tensor([r.scalar for r in res])
                if ov.mode == "shaping":
                    lengths = torch.tensor([len(x.response_ids) for x in flat])
                    scores = scores + overlong_penalty(lengths, ro.max_response_length, ov.buffer, ov.penalty)
                informative = informative_groups(scores, torch.tensor(gids))
                reward_seconds += time.perf_counter() - t_r
                if first_informative is None:
                    first_informative = float(informative.float().mean())
                for i, (prompt, g) in enumerate(zip(candidates, groups)):
                    rows = [j for j, gid in enumerate(gids) if gid == i]
                    entry = (prompt, g, [res[j] for j in rows], scores[rows])
                    (kept if not a.dynamic_sampling or bool(informative[rows[0]]) else spare).append(entry)
                short = t.prompts_per_step - len(kept)
                if short <= 0 or rounds >= a.dynamic_sampling_max_rounds:
                    break
                rounds += 1
                candidates = [data[i] for i in sampler.take(short)]
            kept = (kept + spare[:max(0, t.prompts_per_step - len(kept))])[:t.prompts_per_step]
            trajs = [x for _, g, _, _ in kept for x in g]
            group_ids = [i for i, (_, g, _, _) in enumerate(kept) for _ in g]
            results = [r for _, _, rs, _ in kept for r in rs]
            timings["timing/engine_generate_s"] = fleet.engine_seconds - engine_before
            timings["timing/rollout_s"] = time.perf_counter() - t0 - reward_seconds
            t0 = time.perf_counter()
            reward_m = reward_summary(results)  # over the kept groups
            if a.dynamic_sampling:
                reward_m["dynamic_sampling/rounds"] = float(rounds)
                reward_m["dynamic_sampling/informative_frac_first_round"] = first_informative
            batch = TrajectoryBatch.from_trajectories(trajs, group_ids, tokenizer.pad_token_id, multiple)
            batch.scores = torch.cat([sc for _, _, _, sc in kept])
            failed = torch.tensor([r.failed for r in results])
            batch.mask[failed] = 0.0  # failed rewards are left out of the update (and reported)
            if ov.mode == "filter":  # DAPO overlong filtering: truncated samples teach nothing about the answer
                truncated = torch.tensor([x.finish in ("length", "max_total_tokens") for x in trajs])
                batch.mask[truncated] = 0.0
                reward_m["overlong/filtered_frac"] = float(truncated.float().mean())
            timings["timing/reward_s"] = reward_seconds + time.perf_counter() - t0
            # ---- old / reference log-probs ----------------------------------------------------
            t0 = time.perf_counter()
            model_in = {"tokens": batch.tokens, "mask": batch.mask}
            old = actor.logprobs(model_in, with_entropy=True)
            batch.old_logp = old["logp"] * batch.mask
            timings["timing/old_logprobs_s"] = time.perf_counter() - t0
            compute = timings["timing/engine_generate_s"] + old["seconds"]
            kl_metrics = {}
            if reference is not None:
                t0 = time.perf_counter()
                ref = reference.logprobs(model_in)
                batch.ref_logp = ref["logp"] * batch.mask
                timings["timing/ref_logprobs_s"] = time.perf_counter() - t0
                compute += ref["seconds"]
                kl = token_kl(batch.old_logp, batch.ref_logp, a.kl.estimator, a.kl.clamp) * batch.mask
                kl_metrics["kl/ref_mean"] = float(kl.sum() / batch.mask.sum().clamp(min=1))
                kl_metrics["kl/coef"] = kl_ctl.coef
            if critic is not None:
                t0 = time.perf_counter()
                vals = critic.gather("compute_values", model_in)
                batch.values = vals["values"] * batch.mask
                timings["timing/values_s"] = time.perf_counter() - t0
                compute += vals["seconds"]
            # ---- advantages -------------------------------------------------------------------
            t0 = time.perf_counter()
            token_rewards = None
            if reference is not None and a.kl.placement == "reward":
                token_rewards = kl_penalized_rewards(scores_to_token_rewards(batch.scores, batch.mask),
                                                     token_kl(batch.old_logp, batch.ref_logp, a.kl.estimator,
                                                              a.kl.clamp), kl_ctl.coef, batch.mask)
            inputs = AdvantageInputs(batch.mask, scores=batch.scores, group_ids=batch.group_ids,
                                     token_rewards=token_rewards, values=batch.values)
            batch.advantages, batch.returns = ADVANTAGE_ESTIMATORS.get(a.advantage_estimator)(
                inputs, gamma=a.gamma, lam=a.lam, norm_adv_by_std=a.norm_adv_by_std)
            if critic is not None:  # PPO: whiten GAE advantages over the batch's trained tokens
                batch.advantages = masked_whiten(batch.advantages, batch.mask) * batch.mask
            rc = a.rollout_correction
            is_weight, train_mask = rollout_correction(batch.old_logp, batch.rollout_logp, batch.mask, rc.mode,
                                                       rc.threshold)
            mismatch = {f"mismatch/{k.removeprefix('mismatch_')}": float(v)
                        for k, v in mismatch_metrics(batch.old_logp, batch.rollout_logp, batch.mask,
                                                     rc.threshold).items()}
            per_mini = recipe.derived.samples_per_minibatch
            weights = torch.cat([loss_weights(train_mask[i:i + per_mini], a.loss_agg_mode, ro.max_response_length)
                                 for i in range(0, batch.size, per_mini)])
            timings["timing/advantage_s"] = time.perf_counter() - t0
            # ---- update -----------------------------------------------------------------------
            t0 = time.perf_counter()
            update_in = {"tokens": batch.tokens, "mask": train_mask, "old_logp": batch.old_logp,
                         "advantages": batch.advantages, "is_weight": is_weight, "loss_weight": weights}
            if batch.ref_logp is not None:
                update_in["ref_logp"] = batch.ref_logp
            update_m = actor.call("update", update_in, recipe.derived.minibatches_per_step, kl_ctl.coef)[0]
            if critic is not None:
                critic_in = {"tokens": batch.tokens, "mask": batch.mask, "values": batch.values,
                             "returns": batch.returns}
                critic_m = critic.call("update_critic", critic_in, recipe.derived.minibatches_per_step)[0]
                update_m.update(critic_m)
                m_values = (batch.values * batch.mask).sum() / batch.mask.sum().clamp(min=1)
                update_m["critic/values_mean"] = float(m_values)
            timings["timing/update_s"] = time.perf_counter() - t0
            step += 1
            taken += 1
            # ---- weight sync ------------------------------------------------------------------
            t0 = time.perf_counter()
            sync_m = sync.push(step, verify_seqs)
            timings["timing/sync_s"] = time.perf_counter() - t0
            if reference is not None:
                kl_ctl.update(kl_metrics.get("kl/ref_mean", 0.0), batch.size)
            # ---- metrics ----------------------------------------------------------------------
            timings["timing/step_s"] = time.perf_counter() - t_step
            compute += update_m["timing/update_compute_s"]
            timings["timing/model_compute_s"] = compute
            timings["timing/overhead_fraction"] = max(0.0, 1.0 - compute / timings["timing/step_s"])
            tokens = float(batch.mask.sum())
            m = {**reward_m, **rollout_metrics(trajs, timings["timing/rollout_s"]), **update_m, **kl_metrics,
                 **mismatch, **sync_m, **timings,
                 "throughput/trained_tokens_per_s": tokens / timings["timing/step_s"],
                 "throughput/samples_per_s": batch.size / timings["timing/step_s"],
                 "adv/mean": float((batch.advantages * batch.mask).sum() / batch.mask.sum().clamp(min=1)),
                 "adv/abs_mean": float((batch.advantages.abs() * batch.mask).sum() / batch.mask.sum().clamp(min=1)),
                 "actor/entropy_rollout": float((old["entropy"] * batch.mask).sum() / batch.mask.sum().clamp(min=1)),
                 "response/length_mean": sum(batch.response_lengths) / batch.size,
                 "response/length_max": float(max(batch.response_lengths)),
                 "weight_version/min": float(min(batch.weight_versions))}
            for name, value in ((n, v) for r in results for n, v in r.values.items()):
                m.setdefault(f"reward_fn/{name}", 0.0)
                m[f"reward_fn/{name}"] += value / len(results)
            if t.eval_freq and (step % t.eval_freq == 0 or step == t.steps):
                m.update(evaluate(step))
            logger.log(step, m)
            samples.maybe_write(step, trajs, results, tokenizer)
            bar.update({"reward": m.get("reward/mean", 0.0), "s": timings["timing/step_s"]})
            print(f"[{TAG}] step {step}/{t.steps} reward {m.get('reward/mean', 0.0):.3f} "
                  f"task {m.get('reward/task', 0.0):.3f} turns {m['rollout/turns_mean']:.2f} "
                  f"pg {m['actor/pg_loss']:.4f} {timings['timing/step_s']:.1f}s", flush=True)
            stop_now = stop.signal is not None or (t.max_steps_this_run is not None and taken >= t.max_steps_this_run)
            if step == t.steps or stop_now or (t.save_freq and step % t.save_freq == 0):
                checkpoint(step)
            if stop_now and step < t.steps:
                print(f"[{TAG}] stopping at step {step}; `megarl train` with trainer.resume=auto continues", flush=True)
                return EXIT_CHECKPOINTED if stop.signal is not None else 0
        bar.close()
        final = latest_checkpoint(ckpt_root)
        out = os.path.join(t.output_dir, "hf")
        run_local_group(convert_megatron_to_hf, 1, args=(final, out), timeout=3600)
        print(f"[{TAG}] exported {final} to {out}; metrics in {logger.path}", flush=True)
        return 0
    finally:
        if logger is not None:
            logger.close()
        for gang in (actor, reference, critic, reward_model):
            if gang is not None:
                gang.shutdown()
        if fleet is not None:
            fleet.shutdown()
