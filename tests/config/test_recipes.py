"""Recipe loading and validation: every rule is broken once and the error must name its key."""

import glob
import json
import os

import pytest
import yaml

from megarl.cli import main as cli
from megarl.config import ConfigError
from megarl.config.loader import load_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GRPO = {
    "stage": "grpo",
    "model": {"path": "nowhere/llama", "shape_preset": "llama3-8b"},
    "parallel": {"tp": 2},
    "data": {"train": "train.jsonl"},
    "rollout": {"engines": 2, "engine_tp": 2, "n": 4, "max_prompt_length": 512, "max_response_length": 512},
    "reward": {"functions": [{"name": "numeric_match"}]},
    "trainer": {"steps": 10, "prompts_per_step": 16, "samples_per_minibatch": 32, "micro_batch_per_rank": 2},
    "cluster": {"nodes": 1, "gpus_per_node": 4},
}
DPO = {
    "stage": "dpo",
    "model": {"path": "nowhere/llama", "shape_preset": "llama3-8b"},
    "data": {"train": "prefs.jsonl"},
    "trainer": {"steps": 10, "samples_per_step": 16, "micro_batch_per_rank": 2},
    "cluster": {"nodes": 1, "gpus_per_node": 8},
}


def merge(base, patch):
    out = dict(base)
    for k, v in patch.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write(tmp_path, data, name="recipe.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data, sort_keys=False) if isinstance(data, dict) else data)
    return str(p)


def errors(tmp_path, data, overrides=(), env=None):
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, data), overrides=overrides, env=env or {})
    return e.value.issues


def keys(issues):
    return [i.key for i in issues]


def assert_error(tmp_path, data, key, fragment, overrides=()):
    issues = errors(tmp_path, data, overrides)
    match = [i for i in issues if i.key == key]
    assert match, f"expected an error on {key}, got {[str(i) for i in issues]}"
    assert any(fragment in i.message for i in match), [str(i) for i in match]


# ---- valid recipes and derived sizes -----------------------------------------------------------
def test_valid_grpo_and_derived_sizes(tmp_path):
    r = load_recipe(write(tmp_path, GRPO))
    d = r.derived
    assert (d.train_world_size, d.rollout_gpus, d.dp) == (4, 4, 2)
    assert (d.samples_per_step, d.samples_per_minibatch, d.minibatches_per_step) == (64, 32, 2)
    assert d.grad_accumulation == 32 // (2 * 2)
    assert r.parallel.world_size == 4 and r.model.architecture == "llama"
    assert r.algorithm.advantage_estimator == "grpo" and r.data.kind == "prompts"


def test_valid_dpo_fills_stage_defaults(tmp_path):
    r = load_recipe(write(tmp_path, DPO))
    assert r.preference.loss_type == "sigmoid" and r.derived.needs_reference
    assert r.derived.grad_accumulation == 16 // (2 * 8)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))
                                    + glob.glob(os.path.join(ROOT, "configs", "tiny", "*_cpu.yaml"))))
def test_shipped_recipes_validate(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert cli(["validate", path]) == 0


def test_shipped_recipes_cover_the_stages():
    names = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)}
    assert {"grpo_70b.yaml", "ppo_8b.yaml", "dpo_70b.yaml", "sft_8b.yaml"} <= names
    assert {f"{s}_cpu.yaml" for s in ("sft", "grpo", "ppo", "dpo", "kto", "rm")} <= names


# ---- loading: locations, typos, types, inheritance, overrides, env --------------------------------
def test_unknown_key_suggests_nearest_and_names_file_line(tmp_path):
    text = yaml.safe_dump(GRPO, sort_keys=False).replace("  n: 4", "  n: 4\n  temprature: 0.7")
    [issue] = errors(tmp_path, text)
    assert issue.key == "rollout.temprature" and "did you mean 'temperature'" in issue.message
    line = text.splitlines().index("  temprature: 0.7") + 1
    assert issue.location.endswith(f"recipe.yaml:{line}")


def test_wrong_types_and_literals(tmp_path):
    issues = errors(tmp_path, merge(GRPO, {"rollout": {"n": "four", "engine": "sglang"},
                                           "model": {"trust_remote_code": "yes"}}))
    msgs = {i.key: i.message for i in issues}
    assert "expected int" in msgs["rollout.n"]
    assert "one of 'vllm'" in msgs["rollout.engine"]
    assert "expected bool" in msgs["model.trust_remote_code"]


def test_missing_stage_and_duplicate_keys(tmp_path):
    assert keys(errors(tmp_path, {"model": {"path": "x"}})) == ["stage"]
    issues = errors(tmp_path, "stage: sft\nstage: dpo\n")
    assert any(i.key == "stage" and "duplicate" in i.message for i in issues)


def test_derived_keys_are_refused(tmp_path):
    assert_error(tmp_path, merge(GRPO, {"parallel": {"dp": 2}}), "parallel.dp", "derived")
    assert_error(tmp_path, merge(GRPO, {"parallel": {"world_size": 4}}), "parallel.world_size", "derived")


def test_defaults_inheritance_and_child_wins(tmp_path):
    (tmp_path / "base").mkdir()
    write(tmp_path, {"rollout": {"temperature": 0.5, "top_p": 0.9}, "optim": {"lr": 3.0e-6}}, "base/rl.yaml")
    child = merge(GRPO, {"defaults": ["base/rl.yaml"], "rollout": {"temperature": 0.7}})
    r = load_recipe(write(tmp_path, child))
    assert r.rollout.temperature == 0.7 and r.rollout.top_p == 0.9 and r.optim.lr == 3.0e-6


def test_defaults_cycle_and_missing_base(tmp_path):
    write(tmp_path, {"defaults": ["b.yaml"], "stage": "sft"}, "a.yaml")
    write(tmp_path, {"defaults": ["a.yaml"]}, "b.yaml")
    with pytest.raises(ConfigError, match="inheritance cycle"):
        load_recipe(str(tmp_path / "a.yaml"))
    with pytest.raises(ConfigError, match="file not found"):
        load_recipe(write(tmp_path, merge(GRPO, {"defaults": ["nope.yaml"]})))


def test_set_overrides_are_typed(tmp_path):
    r = load_recipe(write(tmp_path, GRPO), overrides=["rollout.n=8", "rollout.temperature=0.6",
                                                      "trainer.prompts_per_step=8"])
    assert r.rollout.n == 8 and r.rollout.temperature == 0.6 and r.derived.samples_per_step == 64
    issues = errors(tmp_path, GRPO, overrides=["rollout.n=many"])
    assert issues[0].key == "rollout.n" and issues[0].location == "--set rollout.n=many"
    assert keys(errors(tmp_path, GRPO, overrides=["rollout.n"])) == ["rollout.n"]


def test_env_interpolation_only_where_written(tmp_path):
    data = merge(GRPO, {"model": {"path": "${env:MODEL_ROOT}/llama"}, "data": {"train": "${env:DATA:-d.jsonl}"}})
    r = load_recipe(write(tmp_path, data), env={"MODEL_ROOT": "/models"})
    assert r.model.path == "/models/llama" and r.data.train == "d.jsonl"
    issues = errors(tmp_path, data)
    assert keys(issues) == ["model.path"] and "MODEL_ROOT is not set" in issues[0].message


def test_all_errors_reported_together(tmp_path):
    bad = merge(GRPO, {"rollout": {"n": 1, "temperature": 0}, "parallel": {"tp": 3}})
    got = set(keys(errors(tmp_path, bad)))
    assert {"rollout.n", "rollout.temperature", "parallel.tp"} <= got


# ---- cross-field rules (issue list) -----------------------------------------------------------
def test_ppo_needs_reward_and_critic(tmp_path):
    ppo = merge(GRPO, {"stage": "ppo", "rollout": {"n": 1}, "reward": None})
    ppo.pop("reward")
    issues = errors(tmp_path, ppo)
    assert {"reward", "critic"} <= set(keys(issues))
    assert_error(tmp_path, merge(ppo, {"critic": {"path": "c"}, "reward": {"functions": [{"name": "numeric_match"}]},
                                       "algorithm": {"advantage_estimator": "grpo"}}),
                 "algorithm.advantage_estimator", "gae")


def test_grpo_needs_group_of_samples(tmp_path):
    assert_error(tmp_path, merge(GRPO, {"rollout": {"n": 1}}), "rollout.n", "n > 1")
    assert_error(tmp_path, merge(GRPO, {"algorithm": {"advantage_estimator": "gae"}}),
                 "algorithm.advantage_estimator", "critic")


def test_preference_stages_need_preference_data(tmp_path):
    assert_error(tmp_path, merge(DPO, {"data": {"kind": "prompts"}}), "data.kind", "preference dataset")
    assert_error(tmp_path, merge(DPO, {"stage": "kto", "data": {"kind": "preference"}}), "data.kind", "'kto'")


def test_groups_a_stage_does_not_use_are_refused(tmp_path):
    assert_error(tmp_path, merge(DPO, {"rollout": {"n": 2}}), "rollout", "not used by stage dpo")
    assert_error(tmp_path, merge(GRPO, {"preference": {"beta": 0.1}}), "preference", "not used")


def test_rollout_modes_are_refused_where_they_cannot_work(tmp_path):
    separate = {"cluster": {"placement": {"mode": "separate", "rollout_gpus": 4}, "nodes": 2}}
    for mode in ("one_step_off", "async"):   # colocated GPUs take turns: nothing to overlap
        assert_error(tmp_path, merge(GRPO, {"trainer": {"rollout_mode": mode}}), "trainer.rollout_mode",
                     "colocated GPUs take turns")
        assert load_recipe(write(tmp_path, merge(GRPO, {**separate, "trainer": {"rollout_mode": mode}})))
    async_ = merge(GRPO, {**separate, "trainer": {"rollout_mode": "async"}})
    assert_error(tmp_path, merge(async_, {"trainer": {"max_staleness": 0}}), "trainer.max_staleness", "0 is")
    dapo = load_recipe(write(tmp_path, merge(async_, {"algorithm": {"dynamic_sampling": True}})))
    assert dapo.algorithm.dynamic_sampling and dapo.trainer.rollout_mode == "async"
    assert_error(tmp_path, merge(GRPO, {"trainer": {"max_staleness": 3}}), "trainer.max_staleness",
                 "only used by rollout_mode async")
    assert_error(tmp_path, merge(DPO, {"trainer": {"rollout_mode": "one_step_off"}}), "trainer.rollout_mode",
                 "only RL stages generate rollouts")


def test_preference_reference_rules(tmp_path):
    assert load_recipe(write(tmp_path, DPO)).preference.reference == "model"
    simpo = load_recipe(write(tmp_path, merge(DPO, {"preference": {"loss_type": "simpo"}})))
    assert simpo.preference.reference == "none" and not simpo.derived.needs_reference
    rm = merge(DPO, {"stage": "rm"})
    assert load_recipe(write(tmp_path, rm)).preference.reference == "none"
    assert_error(tmp_path, merge(rm, {"preference": {"reference": "precomputed"}}), "preference.reference",
                 "without a reference")
    assert_error(tmp_path, merge(DPO, {"preference": {"margin": True}}), "preference.margin", "reward-model")
    assert_error(tmp_path, merge(DPO, {"parallel": {"cp": 2}}), "parallel.cp", "use cp: 1")


def test_reward_model_path_must_hold_a_scalar_head_model(tmp_path):
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    ppo = merge(GRPO, {"reward": {"reward_model": {"path": str(lm)}}})
    assert_error(tmp_path, ppo, "reward.reward_model.path", "train one with stage rm")
    (lm / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForSequenceClassification"]}))
    assert load_recipe(write(tmp_path, ppo)).reward.reward_model.path == str(lm)


def test_label_smoothing_only_with_sigmoid(tmp_path):
    assert_error(tmp_path, merge(DPO, {"preference": {"loss_type": "hinge", "label_smoothing": 0.1}}),
                 "preference.label_smoothing", "sigmoid")
    load_recipe(write(tmp_path, merge(DPO, {"preference": {"loss_type": "sigmoid", "label_smoothing": 0.1}})))


def test_orpo_simpo_run_without_reference(tmp_path):
    for loss in ("orpo", "simpo"):
        assert_error(tmp_path, merge(DPO, {"preference": {"loss_type": loss, "reference": "model"}}),
                     "preference.reference", "reference-free")
        r = load_recipe(write(tmp_path, merge(DPO, {"preference": {"loss_type": loss}})))
        assert not r.derived.needs_reference


def test_unknown_reward_function_suggests_nearest(tmp_path):
    assert_error(tmp_path, merge(GRPO, {"reward": {"functions": [{"name": "numeric_mach"}]}}),
                 "reward.functions[0].name", "did you mean 'numeric_match'")


# ---- options the schema accepts but no code runs yet: refused by name, with file:line -------------
def not_implemented(tmp_path, data, key):
    [issue] = [i for i in errors(tmp_path, data) if i.key == key]
    assert "not implemented yet" in issue.message, str(issue)
    assert issue.location.startswith(str(tmp_path / "recipe.yaml") + ":"), str(issue)
    return issue


def test_lora_is_refused_until_implemented(tmp_path):
    issue = not_implemented(tmp_path, merge(GRPO, {"model": {"finetuning": "lora", "lora_rank": 8}}),
                            "model.finetuning")
    assert "use finetuning: full" in issue.message
    issue = not_implemented(tmp_path, merge(GRPO, {"model": {"lora_rank": 8}}), "model.lora_rank")
    assert "would do nothing" in issue.message  # with full finetuning it is a silent no-op
    not_implemented(tmp_path, merge(GRPO, {"reward": {"reward_model": {"path": "rm", "type": "lora"}}}),
                    "reward.reward_model.type")
    ppo = merge(GRPO, {"stage": "ppo", "rollout": {"n": 1}, "algorithm": {"advantage_estimator": "gae"},
                       "critic": {"path": "c", "finetuning": "lora"}})
    not_implemented(tmp_path, ppo, "critic.finetuning")


def test_remax_is_refused_until_implemented(tmp_path):
    issue = not_implemented(tmp_path, merge(GRPO, {"algorithm": {"advantage_estimator": "remax"}}),
                            "algorithm.advantage_estimator")
    assert "greedy baseline" in issue.message


def test_kl_in_the_reward_needs_a_coefficient(tmp_path):
    assert_error(tmp_path, merge(GRPO, {"algorithm": {"kl": {"placement": "reward"}}}),
                 "algorithm.kl.placement", "kl.coef 0")
    load_recipe(write(tmp_path, merge(GRPO, {"algorithm": {"kl": {"placement": "reward", "coef": 0.01}}})))


def test_model_tokenizer_must_be_an_existing_directory(tmp_path):
    missing = str(tmp_path / "no_tokenizer")
    issues = errors(tmp_path, merge(GRPO, {"model": {"tokenizer": missing}}))
    [issue] = [i for i in issues if i.key == "model.tokenizer"]
    assert missing in issue.message and issue.location.startswith(str(tmp_path / "recipe.yaml") + ":")
    (tmp_path / "tok").mkdir()
    r = load_recipe(write(tmp_path, merge(GRPO, {"model": {"tokenizer": str(tmp_path / "tok")}})))
    assert r.model.tokenizer == str(tmp_path / "tok") and r.model.trust_remote_code is False


def test_layout_must_match_gpus(tmp_path):
    assert_error(tmp_path, merge(GRPO, {"parallel": {"tp": 2, "pp": 3}}), "parallel.tp", "4 training GPUs")
    sep = merge(GRPO, {"cluster": {"gpus_per_node": 8, "placement": {"mode": "separate", "rollout_gpus": 4}},
                       "parallel": {"tp": 8}})
    assert_error(tmp_path, sep, "parallel.tp", "4 training GPUs")


def test_heads_kv_heads_layers_experts(tmp_path):
    custom = {"num_layers": 6, "hidden_size": 96, "num_attention_heads": 6, "num_kv_heads": 3,
              "ffn_hidden_size": 256, "vocab_size": 100, "max_position_embeddings": 4096}
    base = merge(GRPO, {"model": {"shape_preset": None, "shape": custom}, "rollout": {"engine_tp": 1}})
    assert_error(tmp_path, merge(base, {"parallel": {"tp": 4}}), "parallel.tp", "6 attention heads")
    issues = errors(tmp_path, merge(base, {"parallel": {"tp": 2}}))
    assert any(i.key == "parallel.tp" and "3 kv heads" in i.message for i in issues)
    assert_error(tmp_path, merge(base, {"parallel": {"tp": 1, "pp": 4}}), "parallel.pp", "6 layers")
    assert_error(tmp_path, merge(base, {"parallel": {"tp": 1, "pp": 2, "vpp": 2}}), "parallel.pp", "pp·vpp = 4")
    moe = merge(base, {"model": {"shape": {**custom, "num_experts": 6, "moe_topk": 2}}})
    assert_error(tmp_path, merge(moe, {"parallel": {"tp": 1, "ep": 4}}), "parallel.ep", "6 experts")


def test_moe_with_tp_needs_sequence_parallel(tmp_path):
    data = merge(GRPO, {"model": {"shape_preset": "qwen3-30b-a3b"}, "parallel": {"tp": 2, "ep": 2}})
    assert_error(tmp_path, data, "parallel.sp", "sequence parallel")
    load_recipe(write(tmp_path, merge(data, {"parallel": {"sp": True}})))


def test_batches_must_divide(tmp_path):
    assert_error(tmp_path, merge(GRPO, {"trainer": {"samples_per_minibatch": 24}}),
                 "trainer.samples_per_minibatch", "do not split into mini-batches")
    assert_error(tmp_path, merge(GRPO, {"trainer": {"samples_per_minibatch": 16, "micro_batch_per_rank": 3}}),
                 "trainer.samples_per_minibatch", "micro_batch_per_rank 3 × dp 2")
    assert_error(tmp_path, merge(DPO, {"trainer": {"samples_per_step": 12}}), "trainer.samples_per_step",
                 "micro_batch_per_rank 2 × dp 8")


def test_lengths_fit_the_context(tmp_path):
    assert_error(tmp_path, merge(GRPO, {"rollout": {"max_prompt_length": 4096, "max_response_length": 8192}}),
                 "rollout.max_response_length", "exceeds the model context (8192)")
    assert_error(tmp_path, merge(DPO, {"data": {"max_length": 10000}}), "data.max_length", "context")


def test_rollout_engines_fit_the_rollout_gpus(tmp_path):
    assert_error(tmp_path, merge(GRPO, {"rollout": {"engines": 4}}), "rollout.engines", "= 8 GPUs")
    sep = merge(GRPO, {"cluster": {"gpus_per_node": 8, "placement": {"mode": "separate", "rollout_gpus": 2}}})
    assert_error(tmp_path, sep, "rollout.engines", "rollout has 2")
    assert_error(tmp_path, merge(GRPO, {"rollout": {"engine_tp": 3, "engines": 1}}), "rollout.engine_tp",
                 "not divisible")


def test_fp8_only_with_transformer_engine(tmp_path):
    assert_error(tmp_path, merge(GRPO, {"model": {"fp8": "hybrid", "transformer_impl": "local"}}),
                 "model.fp8", "Transformer Engine")
    assert_error(tmp_path, merge(GRPO, {"model": {"fp8": "hybrid"}, "cluster": {"device": "cpu"}}),
                 "model.fp8", "cpu")
    load_recipe(write(tmp_path, merge(GRPO, {"model": {"fp8": "hybrid", "transformer_impl": "transformer_engine"}})))


def test_weight_sync_options(tmp_path):
    assert_error(tmp_path, merge(GRPO, {"rollout": {"quantization": "fp8"}, "cluster": {"device": "cpu"}}),
                 "rollout.quantization", "need GPUs")
    assert_error(tmp_path, merge(GRPO, {"rollout": {"weight_sync": {"bucket_mb": 0}}}),
                 "rollout.weight_sync.bucket_mb", "expected >= 1")
    assert_error(tmp_path, merge(GRPO, {"rollout": {"weight_sync": {"logprob_tolerance": 0}}}),
                 "rollout.weight_sync.logprob_tolerance", "expected > 0")
    r = load_recipe(write(tmp_path, merge(GRPO, {"rollout": {"quantization": "fp8", "weight_sync": {
        "bucket_mb": 256, "verify_logprobs": True}}})))
    assert r.rollout.weight_sync.bucket_mb == 256 and r.rollout.weight_sync.verify_logprobs
    assert r.rollout.quantization == "fp8"
    from megarl.sync.choice import resolve_transport

    assert resolve_transport(r) == "broadcast"         # auto: FP8 needs whole tensors


def test_weight_sync_transport_auto_is_settled_by_the_run_and_impossible_choices_refused(tmp_path, monkeypatch):
    from megarl.sync.choice import resolve_transport, transport_for

    monkeypatch.delenv("MEGARL_DEVICE", raising=False)
    # auto depends on the device the run gets: validation (torch-free) leaves it to the driver
    assert load_recipe(write(tmp_path, GRPO)).rollout.weight_sync.transport == "auto"
    assert transport_for(cpu=True, nodes=1, quantization=None) == "shared_memory"
    assert transport_for(cpu=False, nodes=1, quantization=None) == "broadcast"   # NCCL by default on GPUs
    assert transport_for(cpu=True, nodes=2, quantization=None) == "broadcast"
    assert transport_for(cpu=True, nodes=1, quantization="fp8") == "broadcast"
    cpu = merge(GRPO, {"cluster": {"device": "cpu"}})
    assert resolve_transport(load_recipe(write(tmp_path, cpu))) == "shared_memory"
    monkeypatch.setenv("MEGARL_DEVICE", "cpu")
    assert resolve_transport(load_recipe(write(tmp_path, GRPO))) == "shared_memory"
    monkeypatch.delenv("MEGARL_DEVICE")
    two_nodes = merge(cpu, {"cluster": {"nodes": 2, "gpus_per_node": 2}})
    assert resolve_transport(load_recipe(write(tmp_path, two_nodes))) == "broadcast"
    assert resolve_transport(load_recipe(write(tmp_path, merge(cpu, {"rollout": {"weight_sync": {
        "transport": "broadcast"}}})))) == "broadcast"
    assert_error(tmp_path, merge(two_nodes, {"rollout": {"weight_sync": {"transport": "shared_memory"}}}),
                 "rollout.weight_sync.transport", "cluster.nodes is 2")
    ipc = merge(GRPO, {"cluster": {"device": "cuda"}, "rollout": {"weight_sync": {"transport": "shared_memory"}}})
    assert resolve_transport(load_recipe(write(tmp_path, ipc))) == "shared_memory"   # opt-in


def test_dapo_options(tmp_path):
    assert_error(tmp_path, merge(GRPO, {"algorithm": {"overlong": {"mode": "shaping", "buffer": 0}}}),
                 "algorithm.overlong.buffer", "0 < buffer")
    r = load_recipe(write(tmp_path, merge(GRPO, {"algorithm": {"dynamic_sampling": True, "overlong": {
        "mode": "shaping", "buffer": 128}}})))
    assert r.algorithm.overlong.buffer == 128 and r.algorithm.dynamic_sampling_max_rounds == 3


def test_shape_must_be_known(tmp_path):
    data = merge(GRPO, {"model": {"shape_preset": None}})
    assert_error(tmp_path, data, "model.path", "no config.json")
    assert_error(tmp_path, merge(GRPO, {"model": {"shape_preset": "llama3-7b"}}), "model.shape_preset",
                 "did you mean")


def test_shape_read_from_local_hf_config(tmp_path):
    import json

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "num_hidden_layers": 4, "hidden_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 256, "vocab_size": 1000,
        "max_position_embeddings": 2048}))
    r = load_recipe(write(tmp_path, merge(GRPO, {"model": {"path": str(model), "shape_preset": None}})))
    assert r.model.architecture == "qwen2" and r.model.shape.num_layers == 4
    assert r.derived.shape_source.endswith("config.json")


# ---- CLI ----------------------------------------------------------------------------------------
def test_cli_validate_exit_codes(tmp_path, capsys):
    assert cli(["validate", write(tmp_path, GRPO)]) == 0
    assert capsys.readouterr().out.startswith("OK ")
    assert cli(["validate", write(tmp_path, merge(GRPO, {"rollout": {"n": 1}})), "--set", "parallel.tp=3"]) == 1
    err = capsys.readouterr().err
    assert "rollout.n" in err and "parallel.tp" in err


def test_plan_gives_each_phase_of_a_colocated_gpu_handoff(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    # colocated on GPUs the trainers and the engines take turns (trainers/rl/gangs.MemoryHandOff):
    # each phase must fit, not the sum of every role
    assert cli(["plan", "configs/grpo_70b.yaml", "--set", "rollout.gpu_memory_utilization=0.9"]) == 2
    out = capsys.readouterr().out
    assert "8 nodes × 8 GPUs" in out and "70.55B parameters" in out
    assert "every GPU, training (colocated): actor + reference + rollout (asleep) = 52.0 GiB  fits" in out
    assert "every GPU, weight sync (colocated): actor + reference + rollout (weights) = 68.4 GiB  fits" in out
    assert ("every GPU, rollout (colocated): rollout + actor (offloaded) + reference (offloaded) = 84.0 GiB  "
            "DOES NOT FIT") in out
    assert "rollout.gpu_memory_utilization <= 0.85" in out
    assert "nodes 0-7: 0:A+R+E 1:A+R+E 2:A+R+E" in out  # the placement map the run uses
    assert "how each number is computed" in out and "Korthikanti" in out
    # verifying each sync wakes the engine's KV cache beside the resident trainers
    assert cli(["plan", "configs/grpo_70b.yaml", "--set", "rollout.gpu_memory_utilization=0.6",
                "--set", "rollout.weight_sync.verify_logprobs=true"]) == 2
    assert "actor + reference + rollout (weights + KV) = 100.0 GiB  DOES NOT FIT" in capsys.readouterr().out
    assert cli(["plan", "configs/grpo_70b.yaml"]) == 0     # the shipped recipe fits every phase
    assert "rollout + actor (offloaded) + reference (offloaded) = 36.0 GiB  fits" in capsys.readouterr().out


def test_plan_adds_up_every_role_resident_when_nothing_is_handed_over(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert cli(["plan", "configs/grpo_70b.yaml", "--set", "rollout.gpu_memory_utilization=0.6",
                "--set", "cluster.device=cpu"]) == 2
    out = capsys.readouterr().out
    for role in ("actor", "reference", "rollout"):  # each alone fits; together they do not
        assert any(line.strip().startswith(role) and line.rstrip().split()[7] == "yes"
                   for line in out.splitlines()), role
    assert "every GPU (colocated): actor + reference + rollout = 100.0 GiB  DOES NOT FIT" in out
    assert "rollout.gpu_memory_utilization <= 0.35" in out
    assert "colocated on CPU nothing is handed over" in out


def test_plan_separate_pools_and_the_reward_model(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert cli(["plan", "configs/ppo_8b.yaml", "--set", "parallel.tp=2"]) == 2
    out = capsys.readouterr().out
    assert "training GPUs (separate): actor + reference + critic + reward_model = 107.8 GiB  DOES NOT FIT" in out
    assert "rollout GPUs (separate): rollout = 52.0 GiB  fits" in out
    assert "shape assumed = the actor's" in out and "node 1: 0:A+R+C+M 1:A+R+C+M 2:A+R+C+M 3:A+R+C+M 4:E" in out
    # the reward model runs with the training layout: its own GPUs must hold that many ranks
    assert cli(["plan", "configs/ppo_8b.yaml", "--set", "cluster.placement.reward_model_gpus=4"]) == 1
    assert "reward_model_gpus: the reward model runs with the training layout (8 ranks)" in capsys.readouterr().err
    cli(["plan", "configs/ppo_8b.yaml", "--set", "parallel.tp=2", "--set", "cluster.placement.reward_model_gpus=6"])
    out = capsys.readouterr().out
    assert "reward-model GPUs (separate): reward_model = " in out
    assert "reward_model  ranks 0-5 on node 1, dev 2-7" in out
    assert cli(["plan", "configs/ppo_8b.yaml"]) == 0   # the shipped recipe: tp 4 fits all four roles
    assert "actor + reference + critic + reward_model = 69.1 GiB  fits" in capsys.readouterr().out


def test_plan_counts_one_runtime_overhead_per_process(monkeypatch):
    from megarl.config.plan import OVERHEAD_GIB, gpu_pools, memory_table

    monkeypatch.chdir(ROOT)
    dpo = load_recipe("configs/dpo_70b.yaml")
    [(_, members, gib)] = gpu_pools(dpo, memory_table(dpo)[0])
    assert [m.role for m in members] == ["actor", "reference"]  # the reference lives in the actor's process
    assert gib == pytest.approx(sum(m.total for m in members) - OVERHEAD_GIB)
    grpo = load_recipe("configs/grpo_70b.yaml", ["cluster.device=cpu"])
    [(_, members, gib)] = gpu_pools(grpo, memory_table(grpo)[0])
    assert gib == pytest.approx(sum(m.total for m in members))  # RL roles are separate processes
    phases = gpu_pools(load_recipe("configs/grpo_70b.yaml"), memory_table(grpo)[0])   # on GPUs: the hand-off
    rollout = dict((name, members) for name, members, _ in phases)["every GPU, rollout"]
    assert [m.total for m in rollout if m.role.endswith("(offloaded)")] == [OVERHEAD_GIB] * 2


def test_plan_flags_a_role_that_does_not_fit(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code = cli(["plan", "configs/grpo_70b.yaml", "--set", "parallel.pp=1", "--set", "parallel.tp=8",
                "--gpu-type", "a100-40gb"])
    out = capsys.readouterr().out
    assert code == 2 and " NO " in out


def test_train_writes_resolved_recipe_and_names_a_missing_model(tmp_path, capsys):
    data = merge(DPO, {"trainer": {"output_dir": str(tmp_path / "run")}})
    assert cli(["train", write(tmp_path, data)]) == 1
    resolved = yaml.safe_load((tmp_path / "run" / "recipe.resolved.yaml").read_text())
    assert resolved["derived"]["samples_per_step"] == 16 and resolved["stage"] == "dpo"
    assert resolved["preference"]["reference"] == "model"  # auto, resolved once at load
    err = capsys.readouterr().err
    assert "'nowhere/llama'" in err and "looks like a Hugging Face hub id" in err   # org/name, not on disk
    data = merge(DPO, {"model": {"path": str(tmp_path / "empty")}, "trainer": {"output_dir": str(tmp_path / "run2")}})
    (tmp_path / "empty").mkdir()
    assert cli(["train", write(tmp_path, data)]) == 1
    assert "neither an HF model" in capsys.readouterr().err


def test_every_stage_has_a_trainer():
    import typing

    from megarl.config.recipe import Stage
    from megarl.trainers import TRAINERS

    assert set(TRAINERS) == set(typing.get_args(Stage))


def test_error_in_an_inherited_value_points_at_the_base_file(tmp_path):
    write(tmp_path, {"rollout": {"top_p": 1.5}}, "base.yaml")
    [issue] = errors(tmp_path, merge(GRPO, {"defaults": ["base.yaml"]}))
    assert issue.key == "rollout.top_p" and issue.location.endswith("base.yaml:2")


# ---- per-loss defaults and options -----------------------------------------------------------------
def test_policy_loss_paper_defaults_fill_unset_keys_once_at_load(tmp_path, monkeypatch):
    want = {"ppo": (0.2, 0.2, "token-mean"), "gspo": (3e-4, 4e-4, "seq-mean-token-mean"),
            "cispo": (1.0, 0.28, "token-mean")}
    for loss, expected in want.items():
        a = load_recipe(write(tmp_path, merge(GRPO, {"algorithm": {"policy_loss": loss}}))).algorithm
        assert (a.clip_ratio_low, a.clip_ratio_high, a.loss_agg_mode) == expected, loss
    explicit = {"policy_loss": "gspo", "clip_ratio_high": 0.01, "loss_agg_mode": "token-mean"}
    a = load_recipe(write(tmp_path, merge(GRPO, {"algorithm": explicit}))).algorithm
    assert (a.clip_ratio_low, a.clip_ratio_high, a.loss_agg_mode) == (3e-4, 0.01, "token-mean")
    monkeypatch.chdir(ROOT)  # the shipped recipes behave as before: base/grpo.yaml's clip-higher, ppo's 0.2
    a = load_recipe("configs/tiny/grpo_cpu.yaml").algorithm
    assert (a.clip_ratio_low, a.clip_ratio_high, a.loss_agg_mode) == (0.2, 0.28, "token-mean")
    a = load_recipe("configs/tiny/ppo_cpu.yaml").algorithm
    assert (a.clip_ratio_low, a.clip_ratio_high, a.loss_agg_mode) == (0.2, 0.2, "token-mean")


def test_dual_clip_only_with_the_ppo_loss(tmp_path):
    assert_error(tmp_path, merge(GRPO, {"algorithm": {"policy_loss": "gspo", "dual_clip": 3.0}}),
                 "algorithm.dual_clip", "only the ppo loss")
    assert load_recipe(write(tmp_path, merge(GRPO, {"algorithm": {"dual_clip": 3.0}}))).algorithm.dual_clip == 3.0


def test_preference_options_refused_for_losses_that_do_not_use_them(tmp_path):
    for loss in ("hinge", "ipo", "orpo", "simpo"):
        data = merge(DPO, {"preference": {"loss_type": loss, "label_smoothing": 0.1}})
        issue = next(i for i in errors(tmp_path, data) if i.key == "preference.label_smoothing")
        assert f"loss_type {loss!r} does not use label_smoothing" in issue.message
        assert issue.location.startswith(str(tmp_path / "recipe.yaml") + ":")
    kto = merge(DPO, {"stage": "kto", "preference": {"loss_type": "kto", "label_smoothing": 0.1}})
    assert_error(tmp_path, kto, "preference.label_smoothing", "'kto' does not use")
    rm = merge(DPO, {"stage": "rm", "preference": {"label_smoothing": 0.1}})
    assert_error(tmp_path, rm, "preference.label_smoothing", "Bradley-Terry")
    assert_error(tmp_path, merge(DPO, {"preference": {"simpo_gamma": 1.0}}), "preference.simpo_gamma",
                 "loss_type 'sigmoid' does not use simpo_gamma")
    harmless = merge(DPO, {"preference": {"loss_type": "hinge", "label_smoothing": 0.0}})
    assert load_recipe(write(tmp_path, harmless)).preference.label_smoothing == 0.0


def test_preference_options_default_per_loss(tmp_path):
    def pref(**p):
        return load_recipe(write(tmp_path, merge(DPO, {"preference": p}))).preference

    assert (pref().label_smoothing, pref().simpo_gamma) == (0.0, None)
    assert pref(loss_type="robust").label_smoothing == 0.1  # robust DPO's flip rate, not 0 (= plain DPO)
    assert pref(loss_type="robust", label_smoothing=0.2).label_smoothing == 0.2
    assert pref(loss_type="simpo").simpo_gamma == 0.5 and pref(loss_type="simpo", simpo_gamma=1.0).simpo_gamma == 1.0
    assert pref(loss_type="hinge").label_smoothing == 0.0
    assert pref().beta == 0.1 and pref(loss_type="simpo").beta == 2.0   # SimPO's β, not DPO's
    assert pref(loss_type="simpo", beta=2.5).beta == 2.5
    rm = merge(DPO, {"stage": "rm", "preference": {"beta": 0.3}})
    assert_error(tmp_path, rm, "preference.beta", "does not use beta")


def test_eval_temperature_is_a_non_negative_number(tmp_path):
    assert load_recipe(write(tmp_path, GRPO)).rollout.eval_temperature is None
    assert load_recipe(write(tmp_path, merge(GRPO, {"rollout": {"eval_temperature": 0}}))).rollout.eval_temperature == 0
    assert_error(tmp_path, merge(GRPO, {"rollout": {"eval_temperature": -1}}), "rollout.eval_temperature", ">= 0")
    assert_error(tmp_path, merge(GRPO, {"rollout": {"eval_n": 0}}), "rollout.eval_n", ">= 1")


def test_cpu_threads_per_rank_is_positive_or_unset(tmp_path):
    assert load_recipe(write(tmp_path, GRPO)).cluster.cpu_threads_per_rank is None
    one = merge(GRPO, {"cluster": {"cpu_threads_per_rank": 1}})
    assert load_recipe(write(tmp_path, one)).cluster.cpu_threads_per_rank == 1
    assert_error(tmp_path, merge(GRPO, {"cluster": {"cpu_threads_per_rank": 0}}), "cluster.cpu_threads_per_rank",
                 ">= 1")
