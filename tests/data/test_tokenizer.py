"""`model.tokenizer` and `model.trust_remote_code` reach every tokenizer load and engine start
outside the trainers: load_tokenizer, `megarl data check` and the rollout engine's vLLM arguments."""

import json
import os
import shutil
import sys
import types

import pytest

from megarl.cli import main as cli
from megarl.config.recipe import ModelConfig
from megarl.data.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def other_tokenizer(tiny_hf_models, tmp_path_factory):
    """The tiny model's tokenizer copied elsewhere with another pad token."""
    src, out = tiny_hf_models["qwen2"], tmp_path_factory.mktemp("other_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(os.path.join(src, name), out / name)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["pad_token"] = "<|im_start|>"
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return str(out)


@pytest.fixture
def from_pretrained_calls(monkeypatch):
    """Every AutoTokenizer.from_pretrained call as (directory, trust_remote_code); loads still happen."""
    from transformers import AutoTokenizer

    calls, real = [], AutoTokenizer.from_pretrained

    def recording(directory, **kwargs):
        calls.append((directory, kwargs.get("trust_remote_code")))
        return real(directory, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", recording)
    return calls


def test_model_tokenizer_wins_over_the_model_directory(tiny_hf_models, other_tokenizer):
    model_dir = tiny_hf_models["qwen2"]
    assert load_tokenizer(ModelConfig(path=model_dir), model_dir).pad_token == "<|endoftext|>"
    tok = load_tokenizer(ModelConfig(path=model_dir, tokenizer=other_tokenizer), model_dir)
    assert tok.pad_token == "<|im_start|>" and tok.pad_token_id == 1


def test_trust_remote_code_is_passed_and_off_by_default(tiny_hf_models, from_pretrained_calls):
    model_dir = tiny_hf_models["qwen2"]
    load_tokenizer(ModelConfig(path=model_dir), model_dir)
    load_tokenizer(ModelConfig(path=model_dir, trust_remote_code=True), model_dir)
    assert from_pretrained_calls == [(model_dir, False), (model_dir, True)]


def test_data_check_loads_the_recipes_tokenizer(tmp_path, tiny_hf_models, other_tokenizer, from_pretrained_calls,
                                                monkeypatch):
    monkeypatch.chdir(ROOT)
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "1+1?"}], "ground_truth": "2"}) + "\n")
    recipe = ["--recipe", "configs/tiny/grpo_cpu.yaml", "--set", f"model.path={tiny_hf_models['qwen2']}",
              "--set", "model.trust_remote_code=true"]
    assert cli(["data", "check", str(data), *recipe, "--set", f"model.tokenizer={other_tokenizer}"]) == 0
    assert cli(["data", "check", str(data), *recipe]) == 0  # no model.tokenizer: the model's own
    assert cli(["data", "check", str(data), *recipe, "--tokenizer", other_tokenizer]) == 0
    assert from_pretrained_calls == [(other_tokenizer, True), (tiny_hf_models["qwen2"], True), (other_tokenizer, True)]


def test_rollout_engine_hands_tokenizer_and_trust_remote_code_to_vllm(monkeypatch):
    from megarl.rollout.engine import EngineConfig, RolloutEngine

    seen = {}

    class RecordingLLM:
        def __init__(self, **kwargs):
            seen.clear()
            seen.update(kwargs)

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=RecordingLLM))
    monkeypatch.setitem(sys.modules, "megarl.rollout.vllm_compat",
                        types.SimpleNamespace(keep_freed_memory=lambda: False))
    RolloutEngine(EngineConfig("model_dir", tokenizer="tokenizer_dir", trust_remote_code=True))
    assert (seen["model"], seen["tokenizer"], seen["trust_remote_code"]) == ("model_dir", "tokenizer_dir", True)
    RolloutEngine(EngineConfig("model_dir"))
    assert (seen["tokenizer"], seen["trust_remote_code"]) == (None, False)  # vLLM reads model_dir's own


def convert_round_trip(model_dir: str, ckpt: str, export: str, tokenizer_dir: str) -> None:
    """Runs in a world-1 group: HF -> megatron with another tokenizer, then back to HF."""
    from megarl.checkpoint.hf import convert_hf_to_megatron, convert_megatron_to_hf

    convert_hf_to_megatron(model_dir, ckpt, tokenizer_dir)
    convert_megatron_to_hf(ckpt, export)


def test_converted_checkpoint_and_export_carry_the_recipes_tokenizer(tiny_hf_models, other_tokenizer, tmp_path):
    from megarl.checkpoint.hf import copy_side_files
    from megarl.runtime.local_group import run_local_group

    model_dir = tiny_hf_models["qwen2"]
    ckpt, export = str(tmp_path / "mcore"), str(tmp_path / "hf_out")
    run_local_group("tests.data.test_tokenizer:convert_round_trip", 1, args=(model_dir, ckpt, export, other_tokenizer),
                    timeout=300)
    for directory in (os.path.join(ckpt, "hf"), export):
        assert load_tokenizer(ModelConfig(), directory).pad_token == "<|im_start|>", directory
    assert json.load(open(os.path.join(export, "config.json")))["model_type"] == "qwen2"
    assert json.load(open(os.path.join(ckpt, "megarl_checkpoint.json")))["tokenizer"] == other_tokenizer
    plain = tmp_path / "plain"
    copy_side_files(model_dir, str(plain))  # no tokenizer_dir: the model's own
    assert load_tokenizer(ModelConfig(), str(plain)).pad_token == "<|endoftext|>"
