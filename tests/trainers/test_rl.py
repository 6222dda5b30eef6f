"""The GRPO loop end to end on CPU (`megarl train`, Ray, megatron workers, a vLLM engine, weight
sync) on a tiny random model and the synthetic tool-calling task:

- it runs, logs every metric family, checkpoints, writes sample traces and exports HF weights;
- 4 steps straight == 2 steps, stop, resume, 2 steps: bitwise-identical exported weights and the
  same metrics (fp32, deterministic sampling seeds);
- one-step-off-policy: every sample after the first step is exactly one weight version old, and a
  stop + resume trains on the rollouts the checkpoint kept: the same prompts, metrics and weights as
  the uninterrupted one-step-off run;
- a rollout engine killed mid-run makes the run fail with a clear message, never hang.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def rl_setup(tmp_path_factory, tiny_hf_models):
    from examples.tool_math import rl_row, write

    root = tmp_path_factory.mktemp("rl")
    rng = random.Random(0)
    write(str(root / "rl.jsonl"), (rl_row(rng) for _ in range(64)))
    write(str(root / "eval.jsonl"), (rl_row(rng) for _ in range(8)))
    return root, tiny_hf_models["qwen2"]


def _train(root, model, out, *extra, timeout=600, strict=False):
    args = [sys.executable, "-m", "megarl.cli", "train", os.path.join(ROOT, "configs/tiny/grpo_cpu.yaml"),
            "--set", f"model.path={model}", "--set", f"data.train={root / 'rl.jsonl'}",
            "--set", f"data.eval={root / 'eval.jsonl'}", "--set", f"trainer.output_dir={out}",
            "--set", "trainer.steps=4", "--set", "trainer.prompts_per_step=4", "--set", "rollout.n=4",
            "--set", "trainer.samples_per_minibatch=16",  # one update per step: old log-probs from the update
            "--set", "trainer.micro_batch_per_rank=2", "--set", "trainer.save_freq=0", "--set", "trainer.eval_freq=4",
            "--set", "rollout.max_response_length=48", "--set", "logging.samples_every=2",
            "--set", "logging.sinks=[jsonl, tensorboard, wandb]", "--set", "rollout.weight_sync.verify_logprobs=true",
            "--set", "rollout.weight_sync.logprob_tolerance=1e-4", "--set", "algorithm.dynamic_sampling=true",
            "--set", "algorithm.dynamic_sampling_max_rounds=1", "--set", "algorithm.overlong.mode=filter",
            "--set", "optim.lr=1.0e-4", "--set", "optim.min_lr=0", "--set", "optim.lr_scheduler=linear",
            "--set", "optim.warmup_steps=0",
            "--set", "algorithm.kl.coef=0.001", *extra]   # a reference gang too (the demo recipe runs without)
    # warnings as a user sees them (conftest sets PYTHONWARNINGS=ignore for the suite's own processes)
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}, "WANDB_MODE": "offline"}
    if strict:   # every worker tensor where a GPU run needs it (runtime/strict_device.py)
        env["MEGARL_STRICT_DEVICE"] = "1"
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _metrics(out) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))}


@pytest.fixture(scope="module")
def straight(rl_setup):
    root, model = rl_setup
    out = root / "straight"
    proc = _train(root, model, out, "--set", "trainer.resume=never", strict=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (root / "straight_output.txt").write_text(proc.stdout + proc.stderr)
    return out


def test_grpo_runs_logs_checkpoints_and_exports(straight):
    m = _metrics(straight)
    assert sorted(m) == [0, 1, 2, 3, 4]                  # eval at 0, then every step
    last = m[4]
    for key in ("reward/mean", "reward/task", "reward/format", "reward_fn/numeric_match", "rollout/turns_mean",
                "rollout/tool_call_parse_rate", "rollout/truncation_rate", "actor/pg_loss", "actor/clip_frac",
                "actor/grad_norm", "actor/lr", "actor/entropy_rollout", "adv/abs_mean", "mismatch/k3_kl",
                "mismatch/abs_logp_diff", "sync/seconds", "sync/verify_max_diff", "timing/rollout_s",
                "timing/update_s", "timing/step_s", "throughput/trained_tokens_per_s", "response/length_mean",
                "eval/mean", "eval/task", "dynamic_sampling/rounds", "overlong/filtered_frac", "kl/ref_mean",
                "actor/kl_ref"):
        assert key in last, key
    # the LR schedule counts RL steps: linear decay over 4 steps
    assert [m[s]["actor/lr"] for s in (1, 2, 3)] == pytest.approx([0.75e-4, 0.5e-4, 0.25e-4])
    assert last["sync/verify_max_diff"] <= 1e-4          # engines score like the trainer after each sync
    # exactly on-policy (one update per step): no separate old-log-prob pass; the update's own forward
    # gives them, and they equal the engine's (fp32) and the reference KL the controller reads
    assert "timing/old_logprobs_s" not in last and "timing/ref_logprobs_s" in last
    assert last["mismatch/abs_logp_diff"] < 1e-3 and 0 < last["actor/entropy_rollout"]
    assert last["kl/ref_mean"] == last["actor/kl_ref"] and last["kl/ref_mean"] > 0
    assert m[0]["eval/mean"] >= 0.0 and "eval/mean" in m[4]
    assert all(m[s]["async/staleness_max"] == 0 and m[s]["async/generated_ahead"] == 0 for s in (1, 2, 3, 4))
    prompts = [json.loads(line) for line in open(straight / "prompts.jsonl")]
    assert [p["step"] for p in prompts] == [1, 2, 3, 4] and all(len(p["rows"]) == 4 for p in prompts)
    assert [p["weight_versions"] for p in prompts] == [[s] * 4 for s in range(4)]
    assert os.path.isdir(straight / "checkpoints" / "step_000004")
    # the bring-up's phases, logged once (engines starting while the actor gang builds)
    startup = {k: v for k, v in m[1].items() if k.startswith("startup/")}
    assert {"startup/inputs_s", "startup/ray_s", "startup/engines_launch_s", "startup/gangs_launch_s",
            "startup/gangs_build_s", "startup/engines_wait_s", "startup/total_s"} <= set(startup)
    assert startup["startup/total_s"] > startup["startup/gangs_build_s"] + startup["startup/ray_s"]
    assert not any(k.startswith("startup/") for s in (2, 3, 4) for k in m[s])
    ready = re.search(r"ready [0-9.]+s after `megarl train` started \((.*)\)",
                      (straight.parent / "straight_output.txt").read_text())
    phases = [part.split()[0] for part in ready[1].split(", ")]
    # the model path holds HF weights: the engines launch before the inputs load, the gangs after
    assert phases.index("engines_launch") < phases.index("inputs") < phases.index("gangs_launch"), phases
    assert os.path.isfile(straight / "hf" / "model.safetensors")
    # synchronous rollouts: the training ranks wait while the engine generates, so it takes both slots' cores
    assert m[1]["startup/engine_threads"] == 2 * max(1, len(os.sched_getaffinity(0)) // 2)
    assert os.path.isdir(straight / "tensorboard") and os.path.isdir(straight / "wandb")
    samples = [json.loads(line) for line in open(straight / "samples.jsonl")]
    assert {s["step"] for s in samples} == {2, 4} and all("reward" in s and "response" in s for s in samples)
    for s in samples:   # the response split into trained and masked (tool output) runs, nothing lost
        assert "".join(seg["text"] for seg in s["segments"]) == s["response"]
        assert any(seg["trained"] for seg in s["segments"]) and len(s["events"]) >= s["turns"]
    # Ray workers silence megatron/torch import and deprecation noise as local-group ranks do
    output = (straight.parent / "straight_output.txt").read_text()
    assert "[rl] actor: 2 rank(s)" in output
    assert "Apex is not installed" not in output and "is deprecated. Please use" not in output, output[-3000:]


def test_resume_is_bitwise_identical(rl_setup, straight):
    from safetensors.torch import load_file

    root, model = rl_setup
    out = root / "resumed"
    first = _train(root, model, out, "--set", "trainer.resume=never", "--set", "trainer.max_steps_this_run=2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert os.path.isdir(out / "checkpoints" / "step_000002") and not os.path.exists(out / "hf")
    with open(out / "samples.jsonl", "a") as f:   # as if the run had written step 3's samples, then died
        f.write(json.dumps({"step": 3, "prompt": "stale"}) + "\n")
    second = _train(root, model, out, "--set", "trainer.resume=auto")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from" in second.stdout
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps == [0, 1, 2, 3, 4]                      # every step once across the stop and the resume
    samples = [json.loads(line)["step"] for line in open(out / "samples.jsonl")]
    assert samples == [2] * 4 + [4] * 4                  # the same for the sample traces
    a, b = load_file(str(straight / "hf" / "model.safetensors")), load_file(str(out / "hf" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    ma, mb = _metrics(straight), _metrics(out)
    for step in (3, 4):
        for key in ("reward/mean", "actor/pg_loss", "actor/grad_norm", "rollout/generated_tokens"):
            assert ma[step][key] == mb[step][key], (step, key)


def test_bf16_run_keeps_fp32_master_weights_and_the_engines_within_tolerance(rl_setup):
    """model.dtype bf16: megatron computes in bf16 with fp32 master weights (the checkpoint's optimizer
    copies), the engines run bf16, and after every sync their log-probs agree with the trainer's
    within the tolerance the recipe documents for bf16 (5e-2); the difference is real (> fp32's 1e-4),
    so the check is doing work. A CPU without bf16 matmuls gets a warning saying to use fp32."""
    from torch.distributed.checkpoint import FileSystemReader

    from megarl.runtime.device import cpu_has_bf16_matmul

    root, model = rl_setup
    out = root / "bf16"
    proc = _train(root, model, out, "--set", "model.dtype=bf16", "--set", "trainer.steps=2", *OVERLAP,
                  "--set", "rollout.weight_sync.logprob_tolerance=5e-2", "--set", "algorithm.kl.coef=0",
                  "--set", "logging.sinks=[jsonl]")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = _metrics(out)
    diffs = [m[s]["sync/verify_max_diff"] for s in (1, 2)]
    assert all(1e-4 < d <= 5e-2 for d in diffs), diffs
    metadata = FileSystemReader(str(out / "checkpoints" / "step_000002")).read_metadata().state_dict_metadata
    tensors = {key: str(meta.properties.dtype) for key, meta in metadata.items() if hasattr(meta, "properties")}
    masters = {dtype for key, dtype in tensors.items() if key.startswith("optimizer.state.param.")}
    weights = {dtype for key, dtype in tensors.items() if not key.startswith("optimizer.")}
    assert masters == {"torch.float32"} and weights == {"torch.bfloat16"}, tensors
    assert ("model.dtype is bf16 but this CPU has no bf16 matrix instructions" in proc.stdout) != cpu_has_bf16_matmul()


OVERLAP = ("--set", "trainer.eval_freq=0")


@pytest.fixture(scope="module")
def one_step_off(rl_setup):
    """4 one-step-off steps straight."""
    root, model = rl_setup
    out = root / "osp_straight"
    proc = _train(root, model, out, *OVERLAP, "--set", "trainer.rollout_mode=one_step_off",
                  "--set", "trainer.resume=never")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _stop_and_resume(root, model, out, *mode) -> str:
    """2 steps, stop (checkpoint), resume to 4 -> the resumed run's stdout."""
    first = _train(root, model, out, *OVERLAP, *mode, "--set", "trainer.resume=never",
                   "--set", "trainer.max_steps_this_run=2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = _train(root, model, out, *OVERLAP, *mode, "--set", "trainer.resume=auto")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return second.stdout


def test_one_step_off_is_one_version_old_and_resumes_without_losing_a_prompt(rl_setup, one_step_off):
    """Step k+1's rollouts are generated on step k's weights while step k trains; a checkpoint keeps
    the rollouts generated ahead, so 2 steps + stop + resume == 4 steps straight, prompt by prompt."""
    from safetensors.torch import load_file

    root, model = rl_setup
    straight, resumed = one_step_off, root / "osp_resumed"
    stdout = _stop_and_resume(root, model, resumed, "--set", "trainer.rollout_mode=one_step_off")
    assert "with the next step's rollouts generated ahead" in stdout
    assert os.path.isfile(resumed / "checkpoints" / "step_000002" / "driver" / "rollouts_ahead.pkl")
    m, mr = _metrics(straight), _metrics(resumed)
    assert [m[s]["async/staleness_max"] for s in (1, 2, 3, 4)] == [0, 1, 1, 1]
    assert all(m[s]["async/staleness_min"] == m[s]["async/staleness_max"] for s in m)
    assert [m[s]["async/generated_ahead"] for s in (1, 2, 3, 4)] == [0, 1, 1, 1]
    assert all(m[s]["sync/verify_max_diff"] <= 1e-4 for s in m)
    assert m[1]["startup/engine_threads"] == 1   # generation overlaps training: the engine keeps its share
    prompts = [json.loads(line) for line in open(straight / "prompts.jsonl")]
    assert [p["weight_versions"] for p in prompts] == [[0] * 4, [0] * 4, [1] * 4, [2] * 4]
    rows = [r for p in prompts for r in p["rows"]]
    assert len(rows) == len(set(rows))                   # DAPO refills included: no prompt twice in an epoch
    assert open(resumed / "prompts.jsonl").read() == open(straight / "prompts.jsonl").read()
    for step in (1, 2, 3, 4):
        for key in ("reward/mean", "actor/pg_loss", "actor/grad_norm", "rollout/generated_tokens"):
            assert m[step][key] == mr[step][key], (step, key)
    a, b = load_file(str(straight / "hf" / "model.safetensors")), load_file(str(resumed / "hf" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_async_keeps_the_staleness_bound_and_a_resume_loses_no_prompt(rl_setup):
    """The producer generates (per-trajectory agent loop: turns streamed to the engine actor) while
    the trainer trains, syncs land between engine calls, no batch is more than max_staleness=1
    version old; stopped after 2 steps and resumed (the checkpoint holds the buffer and the
    position before the round in flight), the run uses each of the data sampler's first prompts
    exactly once (no drops under stale_policy wait): trained or, with DAPO dynamic sampling on,
    filtered out as uninformative."""
    from megarl.data.sampler import EpochSampler

    root, model = rl_setup
    out = root / "async_resumed"
    _stop_and_resume(root, model, out, "--set", "trainer.rollout_mode=async",
                     "--set", "rollout.multi_turn.loop=per_trajectory")
    assert os.path.isfile(out / "checkpoints" / "step_000002" / "driver" / "rollout_buffer.pkl")
    m = _metrics(out)
    assert sorted(m) == [1, 2, 3, 4]
    assert all(m[s]["async/staleness_max"] <= 1 and m[s]["async/dropped_groups"] == 0 for s in m)
    assert all(m[s]["sync/verify_max_diff"] <= 1e-4 for s in m)
    assert all("dynamic_sampling/rounds" in m[s] and "async/filtered_groups" in m[s] for s in m)
    assert all(m[s]["timing/engine_generate_s"] > 0 for s in m)    # the producer's engine time, per batch
    prompts = list(map(json.loads, open(out / "prompts.jsonl")))
    assert [len(p["rows"]) for p in prompts] == [4] * 4
    used = [r for p in prompts for r in p["rows"] + p.get("filtered_rows", [])]
    order = [i + 1 for i in EpochSampler(64, seed=1234).take(len(used))]   # data.seed; rows are 1-based lines
    assert sorted(used) == sorted(order)


def _engine_processes_of(driver_pid: int) -> list[int]:
    """PIDs of the vLLM engine actors under one `megarl train` process (its private Ray cluster's
    workers are its descendants)."""
    import psutil

    found = []
    for child in psutil.Process(driver_pid).children(recursive=True):
        try:
            if "EngineActorImpl" in " ".join(child.cmdline()) or child.name().startswith("ray::EngineActor"):
                found.append(child.pid)
        except psutil.Error:
            continue
    return found


def test_engine_killed_mid_run_fails_clearly(rl_setup):
    root, model = rl_setup
    out = root / "killed"
    args = [sys.executable, "-m", "megarl.cli", "train", os.path.join(ROOT, "configs/tiny/grpo_cpu.yaml"),
            "--set", f"model.path={model}", "--set", f"data.train={root / 'rl.jsonl'}",
            "--set", f"trainer.output_dir={out}", "--set", "trainer.steps=50", "--set", "trainer.prompts_per_step=4",
            "--set", "trainer.samples_per_minibatch=8", "--set", "trainer.save_freq=0", "--set", "rollout.n=4",
            "--set", "rollout.max_response_length=48", "--set", "rollout.weight_sync.timeout_s=30",
            "--set", "trainer.eval_freq=0", "--set", f"data.eval={root / 'eval.jsonl'}"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not os.path.isfile(out / "metrics.jsonl"):
            time.sleep(1)
        assert os.path.isfile(out / "metrics.jsonl"), "the run never completed a step"
        engines = _engine_processes_of(proc.pid)   # this run's engines only, never another run's
        assert engines, "no engine process found"
        for pid in engines:
            os.kill(pid, signal.SIGKILL)
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "rollout engine" in output and "died" in output, output[-3000:]


def test_ppo_with_critic_learns_values_and_checkpoints_both(rl_setup):
    """PPO with a critic, and a reward model (a scalar-head megatron gang) scoring every sample."""
    from tests.conftest import make_scalar_head_model

    root, model = rl_setup
    out = root / "ppo"
    _, rm_hf, _ = make_scalar_head_model(model, root / "rm", "Qwen2ForSequenceClassification", 5)
    args = [sys.executable, "-m", "megarl.cli", "train", os.path.join(ROOT, "configs/tiny/ppo_cpu.yaml"),
            "--set", f"model.path={model}", "--set", f"critic.path={model}", "--set", f"data.train={root / 'rl.jsonl'}",
            "--set", f"data.eval={root / 'eval.jsonl'}", "--set", f"trainer.output_dir={out}",
            "--set", "trainer.steps=4", "--set", "trainer.prompts_per_step=4", "--set", "trainer.eval_freq=0",
            "--set", "trainer.samples_per_minibatch=8",
            "--set", "trainer.save_freq=2", "--set", "rollout.max_response_length=48", "--set", "trainer.resume=never",
            "--set", f"reward.reward_model={{path: {rm_hf}, component: safety, weight: 0.5}}",
            "--set", "cluster.cpu_threads_per_rank=1"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MEGARL_STRICT_DEVICE": "1"})   # runtime/strict_device.py
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "building the critic" in proc.stdout
    for role in ("actor", "critic", "reward_model"):   # cluster.cpu_threads_per_rank reaches every gang
        assert re.search(rf"\[rl\] {role}: \d+ rank\(s\), 1 torch thread\(s\) each", proc.stdout), role
    m = _metrics(out)
    assert "timing/old_logprobs_s" in m[1] and m[1]["actor/updates"] == 2.0  # ppo_epochs 2: a separate pass
    assert m[1]["reward/mean"] != 0                           # format reward + RM: the critic has returns to fit
    assert m[1]["reward/safety"] != 0 and m[2]["reward/safety"] != m[1]["reward/safety"]  # the RM scored samples
    assert m[1]["critic/values_mean"] == 0.0                  # zero-initialised value head
    assert m[4]["critic/value_loss"] < m[1]["critic/value_loss"]
    assert abs(m[4]["critic/values_mean"]) > 0 and "adv/abs_mean" in m[4] and "critic/grad_norm" in m[4]
    for step in ("step_000002", "step_000004"):
        assert os.path.isdir(out / "checkpoints" / step) and os.path.isdir(out / "critic_checkpoints" / step)
    assert os.path.isfile(out / "hf" / "model.safetensors")
