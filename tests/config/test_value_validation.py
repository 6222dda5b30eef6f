"""Validation covers values, not only types (issue 18, item 5): every bad value is refused at load,
naming its key, the value and what was expected, instead of failing mid-run or doing nothing."""

import dataclasses
import glob
import json
import os

import pytest

from megarl.cli import main as cli
from megarl.config import ConfigError
from megarl.config.loader import MAX_RENDERED_ISSUES, load_recipe
from megarl.config.plan import render_plan
from tests.config.test_recipes import DPO, GRPO, ROOT, merge, write

SFT = merge(DPO, {"stage": "sft", "data": {"train": "sft.jsonl"}})
REMOTE = merge(GRPO, {"reward": {"remote": {"url": "http://127.0.0.1:9/score"}}})

# (id, base recipe, --set overrides, key, fragment of the message)
CASES = [
    ("prompts_per_step_zero", GRPO, ["trainer.prompts_per_step=0"], "trainer.prompts_per_step",
     "expected >= 1 or null, got 0"),
    ("prompts_per_step_negative", GRPO, ["trainer.prompts_per_step=-4"], "trainer.prompts_per_step", "got -4"),
    ("steps_zero", GRPO, ["trainer.steps=0"], "trainer.steps", "expected >= 1 or null, got 0"),
    ("steps_negative", SFT, ["trainer.steps=-10"], "trainer.steps", "got -10"),
    ("max_response_length_zero", GRPO, ["rollout.max_response_length=0"], "rollout.max_response_length",
     "expected >= 1, got 0"),
    ("max_response_length_negative", GRPO, ["rollout.max_response_length=-8"], "rollout.max_response_length",
     "got -8"),
    ("lr_nan", GRPO, ["optim.lr=.nan"], "optim.lr", "expected > 0 and finite, got nan"),
    ("lr_nan_text", GRPO, ["optim.lr=nan"], "optim.lr", "got nan"),
    ("lr_inf", GRPO, ["optim.lr=.inf"], "optim.lr", "got inf"),
    ("temperature_nan", GRPO, ["rollout.temperature=.nan"], "rollout.temperature", "> 0 and finite"),
    ("temperature_inf", GRPO, ["rollout.temperature=.inf"], "rollout.temperature", "got inf"),
    ("clip_ratio_low_one", GRPO, ["algorithm.clip_ratio_low=1.0"], "algorithm.clip_ratio_low",
     "expected 0 <= clip_ratio_low < 1"),
    ("clip_ratio_low_above_one", GRPO, ["algorithm.clip_ratio_low=1.5"], "algorithm.clip_ratio_low", "got 1.5"),
    ("clip_ratio_high_below_low", GRPO, ["algorithm.clip_ratio_low=0.2", "algorithm.clip_ratio_high=0.1"],
     "algorithm.clip_ratio_high", "expected clip_ratio_high >= clip_ratio_low (0.2), got 0.1"),
    ("engine_cpu_threads_zero", GRPO, ["rollout.engine_cpu_threads=0"], "rollout.engine_cpu_threads",
     "expected >= 1 or null (null: from the placement and the rollout mode), got 0"),
    ("kv_cache_bytes_negative", GRPO, ["rollout.kv_cache_bytes=-1"], "rollout.kv_cache_bytes",
     "expected >= 1 or null (bytes"),
    ("kl_horizon_zero", GRPO, ["algorithm.kl.horizon=0"], "algorithm.kl.horizon", "expected >= 1 (steps), got 0"),
    ("remote_max_concurrency_zero", REMOTE, ["reward.remote.max_concurrency=0"], "reward.remote.max_concurrency",
     "expected >= 1, got 0"),
    ("remote_timeout_negative", REMOTE, ["reward.remote.timeout_s=-1"], "reward.remote.timeout_s",
     "expected > 0 and finite, got -1.0"),
    ("remote_retries_negative", REMOTE, ["reward.remote.retries=-3"], "reward.remote.retries",
     "expected >= 0, got -3"),
    ("ep_on_dense_model", GRPO, ["parallel.ep=2"], "parallel.ep", "the model is dense"),
    ("etp_on_dense_model", GRPO, ["parallel.etp=1"], "parallel.etp", "the model is dense"),
    ("kl_in_reward_without_coef", GRPO, ["algorithm.kl.placement=reward", "algorithm.kl.coef=0"],
     "algorithm.kl.placement", "does nothing without a coefficient"),
    ("reward_on_sft", merge(SFT, {"reward": {"functions": [{"name": "numeric_match"}]}}), [], "reward",
     "'numeric_match' would never run"),
    ("resume_missing_path", GRPO, ["trainer.resume=/nonexistent"], "trainer.resume",
     "no checkpoint at '/nonexistent'"),
    # the rest of the range table: one row each for its kinds of range
    ("min_lr_above_lr", GRPO, ["optim.lr=1e-6", "optim.min_lr=1e-5"], "optim.min_lr", "expected min_lr <= lr"),
    ("warmup_not_below_steps", GRPO, ["trainer.steps=4", "optim.warmup_steps=4"], "optim.warmup_steps",
     "expected fewer than trainer.steps (4), got 4"),
    ("top_p_zero", GRPO, ["rollout.top_p=0"], "rollout.top_p", "a fraction in (0, 1], got 0.0"),
    ("gpu_memory_utilization_above_one", GRPO, ["rollout.gpu_memory_utilization=1.5"],
     "rollout.gpu_memory_utilization", "(0, 1], got 1.5"),
    ("top_k_below_minus_one", GRPO, ["rollout.top_k=-2"], "rollout.top_k", "-1 or 0 = off"),
    ("gamma_above_one", GRPO, ["algorithm.gamma=1.5"], "algorithm.gamma", "in [0, 1], got 1.5"),
    ("reward_weight_nan", GRPO, ["reward.functions=[{name: numeric_match, weight: .nan}]"],
     "reward.functions[0].weight", "a finite number, got nan"),
    ("save_freq_negative", GRPO, ["trainer.save_freq=-1"], "trainer.save_freq",
     ">= 0 (0 = no periodic checkpoints), got -1"),
    ("eval_freq_negative", GRPO, ["trainer.eval_freq=-5"], "trainer.eval_freq", "(0 = no periodic evaluation)"),
    ("micro_batch_zero", GRPO, ["trainer.micro_batch_per_rank=0"], "trainer.micro_batch_per_rank", "got 0"),
    ("adam_beta2_one", GRPO, ["optim.adam_beta2=1.0"], "optim.adam_beta2", "in [0, 1)"),
    ("entropy_coef_negative", GRPO, ["algorithm.entropy_coef=-0.1"], "algorithm.entropy_coef", ">= 0 and finite"),
    ("kl_target_zero", GRPO, ["algorithm.kl.controller=adaptive", "algorithm.kl.target=0"],
     "algorithm.kl.target", "> 0 and finite or null, got 0.0"),
    ("correction_threshold_below_one", GRPO, ["algorithm.rollout_correction.threshold=0.5"],
     "algorithm.rollout_correction.threshold", ">= 1 and finite"),
    ("dual_clip_not_above_one", GRPO, ["algorithm.dual_clip=1.0"], "algorithm.dual_clip", "> 1 and finite"),
    ("engines_zero", GRPO, ["rollout.engines=0"], "rollout.engines", "expected >= 1, got 0"),
    ("nodes_zero", GRPO, ["cluster.nodes=0"], "cluster.nodes", "expected >= 1, got 0"),
    ("rollout_gpus_negative", GRPO, ["cluster.placement.rollout_gpus=-1"], "cluster.placement.rollout_gpus",
     "expected >= 0"),
    ("samples_per_step_zero", SFT, ["trainer.samples_per_step=0"], "trainer.samples_per_step", "got 0"),
    ("data_max_length_zero", SFT, ["data.max_length=0"], "data.max_length", "got 0"),
    ("preference_beta_inf", DPO, ["preference.beta=.inf"], "preference.beta", "got inf"),
    ("shape_heads_zero", merge(GRPO, {"model": {"shape_preset": None, "shape": {
        "num_layers": 4, "hidden_size": 128, "num_attention_heads": 0, "num_kv_heads": 2, "ffn_hidden_size": 256,
        "vocab_size": 1000, "max_position_embeddings": 2048}}, "parallel": {"tp": 1}, "rollout": {"engine_tp": 1}}),
     [], "model.shape.num_attention_heads", "expected >= 1, got 0"),
]


@pytest.mark.parametrize("base,overrides,key,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_value_is_refused_by_name(tmp_path, base, overrides, key, fragment):
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, base), overrides=overrides, env={})
    issues = e.value.issues
    match = [i for i in issues if i.key == key]
    assert match, f"expected an error on {key}, got {[str(i) for i in issues]}"
    assert any(fragment in i.message for i in match), [str(i) for i in match]
    assert all(i.location.startswith("--set " if overrides else str(tmp_path / "recipe.yaml")) for i in match), \
        [str(i) for i in match]  # named where it was written: the --set or the recipe's file:line


def test_good_values_still_load(tmp_path):
    (tmp_path / "ckpt").mkdir()
    r = load_recipe(write(tmp_path, REMOTE), env={}, overrides=[
        f"trainer.resume={tmp_path / 'ckpt'}", "trainer.save_freq=0", "trainer.eval_freq=0",
        "reward.remote.retries=0", "rollout.kv_cache_bytes=268435456", "rollout.top_k=0",
        "algorithm.kl.placement=reward", "algorithm.kl.coef=0.01", "optim.min_lr=1e-6", "optim.clip_grad=0"])
    assert r.trainer.resume == str(tmp_path / "ckpt") and r.reward.remote.retries == 0
    for resume in ("auto", "never"):
        assert load_recipe(write(tmp_path, GRPO), overrides=[f"trainer.resume={resume}"], env={})
    # CISPO's paper default clip_ratio_low = 1 (no lower bound) with clip_ratio_high 0.28 is meant
    a = load_recipe(write(tmp_path, GRPO), overrides=["algorithm.policy_loss=cispo"], env={}).algorithm
    assert (a.clip_ratio_low, a.clip_ratio_high) == (1.0, 0.28)
    moe = load_recipe(write(tmp_path, GRPO), env={}, overrides=[
        "model.shape_preset=qwen3-30b-a3b", "parallel.ep=2", "parallel.sp=true"])
    assert moe.parallel.ep == 2


def test_shape_read_from_config_json_names_the_file(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "num_hidden_layers": 4, "hidden_size": 128, "num_attention_heads": 0,
        "num_key_value_heads": 2, "intermediate_size": 256, "vocab_size": 1000, "max_position_embeddings": 2048}))
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, merge(GRPO, {"model": {"path": str(model), "shape_preset": None}})), env={})
    [issue] = [i for i in e.value.issues if i.key == "model.shape.num_attention_heads"]
    assert "got 0" in issue.message and str(model / "config.json") in issue.message


def shipped_recipes():
    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)):
        rel = os.path.relpath(path, os.path.join(ROOT, "configs"))
        if rel.startswith(("base", "tools")) or os.path.basename(path) == "base.yaml":
            continue  # partial recipes (inherited through defaults:) and tool declarations
        out.append(path)
    return out


@pytest.mark.parametrize("path", shipped_recipes(), ids=os.path.basename)
def test_shipped_recipes_still_validate(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    load_recipe(path)


def test_shipped_recipes_are_all_found():
    names = {os.path.basename(p) for p in shipped_recipes()}
    assert {"grpo_70b.yaml", "ppo_8b.yaml", "dpo_70b.yaml", "sft_8b.yaml", "grpo_cpu.yaml", "sft_cpu.yaml"} <= names


def test_many_errors_are_capped_in_the_message(tmp_path):
    bad = ["trainer.save_freq=-1", "trainer.eval_freq=-1", "trainer.micro_batch_per_rank=0", "optim.lr=.nan",
           "optim.weight_decay=-1", "optim.adam_beta1=2", "optim.adam_beta2=2", "optim.adam_eps=0",
           "optim.clip_grad=-1", "optim.warmup_steps=-1", "rollout.top_p=0", "rollout.top_k=-5",
           "rollout.temperature=.inf", "rollout.eval_n=0", "rollout.max_prompt_length=0",
           "rollout.gpu_memory_utilization=0", "rollout.kv_cache_bytes=0", "rollout.weight_sync.bucket_mb=0",
           "rollout.weight_sync.timeout_s=0", "algorithm.gamma=2", "algorithm.lam=-1", "algorithm.ppo_epochs=0",
           "algorithm.kl.horizon=0", "logging.samples_every=-1", "cluster.cpu_threads_per_rank=0"]
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, GRPO), overrides=bad, env={})
    issues, text = e.value.issues, str(e.value)
    assert len(issues) >= len(bad)                       # every issue is kept on the error ...
    listed = [line for line in text.splitlines() if line.startswith("  - ")]
    assert len(listed) == MAX_RENDERED_ISSUES            # ... the message lists the first 20
    assert text.startswith(f"{len(issues)} problem(s)")
    assert text.endswith(f"  ... and {len(issues) - MAX_RENDERED_ISSUES} more")
    few = errors_text(tmp_path, ["trainer.save_freq=-1"])
    assert "more" not in few and few.count("  - ") == 1


def errors_text(tmp_path, overrides):
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, GRPO), overrides=overrides, env={})
    return str(e.value)


# ---- megarl plan refuses zero lengths and heads by name ------------------------------------------
def test_plan_refuses_zero_heads_and_lengths_by_name(tmp_path):
    r = load_recipe(write(tmp_path, GRPO), env={})
    r.model.shape = dataclasses.replace(r.model.shape, num_attention_heads=0)   # never edit the shared preset
    with pytest.raises(ConfigError) as e:
        render_plan(r)
    assert [i.key for i in e.value.issues] == ["model.shape.num_attention_heads"]
    r = load_recipe(write(tmp_path, GRPO), env={})
    r.rollout.max_prompt_length = r.rollout.max_response_length = 0
    with pytest.raises(ConfigError) as e:
        render_plan(r)
    assert {i.key for i in e.value.issues} == {"rollout.max_prompt_length", "rollout.max_response_length"}


def test_cli_plan_names_zero_values_instead_of_a_traceback(tmp_path, capsys):
    recipe = write(tmp_path, GRPO)
    assert cli(["plan", recipe, "--set", "rollout.max_response_length=0"]) == 1
    assert "rollout.max_response_length: expected >= 1, got 0" in capsys.readouterr().err
    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForSequenceClassification"], "num_hidden_layers": 4, "hidden_size": 128,
        "num_attention_heads": 0, "intermediate_size": 256, "vocab_size": 1000, "max_position_embeddings": 2048}))
    assert cli(["plan", write(tmp_path, merge(GRPO, {"reward": {"reward_model": {"path": str(rm)}}}))]) == 1
    err = capsys.readouterr().err
    assert "reward.reward_model.path: num_attention_heads in" in err and "got 0" in err


ALIAS_BOMB = ("a: &a [" + ",".join(['"lol"'] * 9) + "]\n" + "".join(
    f"{c}: &{c} [" + ",".join([f"*{p}"] * 9) + "]\n" for p, c in zip("abcdef", "bcdefg")) + "stage: sft\n").encode()


@pytest.mark.parametrize("name, content, fragment", [
    ("latin1.yaml", b"stage: sft\nmodel: {path: caf\xe9}\n", "not UTF-8 text (byte 0xe9 at offset 28)"),
    ("binary.yaml", bytes(range(256)), "not UTF-8 text (byte 0x80 at offset 128)"),
    ("complex_key.yaml", b"stage: sft\n? [a, b]\n: 1\n", "key ['a', 'b'] is not a name"),
    ("defaults_int.yaml", b"defaults: 5\nstage: sft\n", "defaults: expected a recipe file name or a list of them"),
    # 393 bytes of nested aliases expanding to ~4.8 million values: refused at once, not walked
    ("alias_bomb.yaml", ALIAS_BOMB, "expands to more than 100,000 values"),
])
def test_file_level_recipe_errors_are_one_line_messages(tmp_path, capsys, name, content, fragment):
    path = tmp_path / name
    path.write_bytes(content)
    assert cli(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_output_dir_that_is_a_file_or_under_one_is_refused(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    recipe = write(tmp_path, SFT)
    assert cli(["validate", recipe, "--set", f"trainer.output_dir={blocker}"]) == 1
    assert f"trainer.output_dir: {blocker} is a file, not a directory" in capsys.readouterr().err
    assert cli(["validate", recipe, "--set", f"trainer.output_dir={blocker}/run"]) == 1
    assert f"{blocker} is a file, so {blocker}/run cannot be created" in capsys.readouterr().err
