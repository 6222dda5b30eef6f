"""HF <-> megatron conversion: parity with HF transformers' own forward (not only round trips),
at TP=1, TP=2, PP=2 and (MoE) EP=2 and TP=2+SP+EP=2; bit-identical HF -> megatron -> HF; clear
refusals of mismatched, unknown and pickled checkpoints."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from megarl.checkpoint.hf_map import CheckpointMismatch, hf_to_megatron
from megarl.checkpoint.stream import ReadOnDemandSafetensors
from megarl.runtime.local_group import LocalGroupError, run_local_group
from tests.conftest import TINY_ARCHS

PARITY_TOL = 1e-4  # fp32, max abs over all logits; observed <= 6e-7
DENSE = ("qwen2", "llama", "mistral", "qwen3", "qwen2_tied")
MOE = ("qwen3_moe", "mixtral")


@pytest.fixture(scope="session")
def tokens():
    return torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def hf_logits(tiny_hf_models, tokens):
    from transformers import AutoModelForCausalLM

    out = {}
    for arch, path in tiny_hf_models.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            out[arch] = model(tokens).logits
    return out


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_round_trip_is_bit_identical(converted, arch):
    c = converted[arch]
    a = load_file(os.path.join(c["hf"], "model.safetensors"))
    b = load_file(os.path.join(c["back"], "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    for side in ("config.json", "tokenizer.json"):
        assert os.path.isfile(os.path.join(c["back"], side))
    assert c["summary"]["arch"] == arch.removesuffix("_tied")
    assert ("lm_head.weight" in a) != arch.endswith("_tied")


LAYOUTS = [
    ("tp1", {}, TINY_ARCHS, 1),
    ("tp2", {"tp": 2}, DENSE, 2),
    ("tp2_sp", {"tp": 2, "sp": True}, MOE, 2),
    ("pp2", {"pp": 2}, TINY_ARCHS, 2),
    ("ep2", {"ep": 2}, MOE, 2),
    ("tp2_sp_ep2_etp1", {"tp": 2, "sp": True, "ep": 2, "etp": 1}, MOE, 2),
]


@pytest.mark.dist
@pytest.mark.parametrize("tag,layout,archs,world", LAYOUTS, ids=[t[0] for t in LAYOUTS])
def test_logits_match_hf_transformers(converted, hf_logits, tokens, tag, layout, archs, world):
    ranks = run_local_group("tests.models.parity:megatron_logits", world,
                            args=([converted[a]["ckpt"] for a in archs], layout, tokens), timeout=600)
    for i, arch in enumerate(archs):
        got = [r[i] for r in ranks if r[i] is not None]
        assert got, "no rank returned logits"
        for logits in got:
            diff = (logits - hf_logits[arch]).abs().max().item()
            assert diff <= PARITY_TOL, f"{arch} at {tag}: max |logits - HF| = {diff:.3g}"


def test_logits_comparison_is_sensitive(hf_logits):
    """Two different random models differ far beyond the tolerance (the check can fail)."""
    assert (hf_logits["qwen2"] - hf_logits["llama"]).abs().max() > 100 * PARITY_TOL


# ---- refusals -------------------------------------------------------------------------------------
def _names_and_cfg(path):
    reader = ReadOnDemandSafetensors(path)
    with open(os.path.join(path, "config.json")) as f:
        return reader, json.load(f)


def test_config_with_fewer_layers_than_the_checkpoint_is_refused(tiny_hf_models):
    reader, cfg = _names_and_cfg(tiny_hf_models["llama"])
    cfg["num_hidden_layers"] = 3
    with pytest.raises(CheckpointMismatch, match=r"unknown \['model.layers.3"):
        next(hf_to_megatron("llama", cfg, reader.keys(), reader.get))


def test_missing_and_unknown_tensors_are_named(tiny_hf_models):
    reader, cfg = _names_and_cfg(tiny_hf_models["qwen3_moe"])
    names = [n for n in reader.keys() if "experts.3." not in n] + ["model.layers.0.mlp.shared_expert.weight"]
    with pytest.raises(CheckpointMismatch) as e:
        next(hf_to_megatron("qwen3_moe", cfg, names, reader.get))
    assert "missing ['model.layers.0.mlp.experts.3.down_proj.weight'" in str(e.value)
    assert "unknown ['model.layers.0.mlp.shared_expert.weight']" in str(e.value)


def test_pickle_checkpoints_are_refused(tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle checkpoints are refused"):
        ReadOnDemandSafetensors(str(tmp_path))


def test_shape_mismatch_names_the_tensor(tiny_hf_models, tmp_path):
    src = tiny_hf_models["qwen2"]
    bad = tmp_path / "bad"
    bad.mkdir()
    tensors = load_file(os.path.join(src, "model.safetensors"))
    tensors["model.layers.1.mlp.down_proj.weight"] = tensors["model.layers.1.mlp.down_proj.weight"][:, :200].clone()
    save_file(tensors, str(bad / "model.safetensors"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (bad / name).write_bytes(open(os.path.join(src, name), "rb").read())
    with pytest.raises(LocalGroupError, match=r"decoder.layers.1.mlp.linear_fc2.weight: checkpoint gives shape "
                                              r"\(128, 200\)"):
        run_local_group("megarl.checkpoint.hf:convert_hf_to_megatron", 1, args=(str(bad), str(tmp_path / "o")))


def test_unsupported_architecture_is_refused():
    from megarl.config.parallel import ParallelConfig
    from megarl.models.hf_config import megatron_config_from_hf

    with pytest.raises(NotImplementedError, match="model_type 'gpt2' is not supported"):
        megatron_config_from_hf({"model_type": "gpt2"}, ParallelConfig())


@pytest.fixture(scope="module")
def critic(tiny_hf_models, tmp_path_factory):
    """A tiny Qwen2ForTokenClassification (num_labels=1): the HF form of a critic."""
    from tests.conftest import make_scalar_head_model

    model, hf_dir, ckpt = make_scalar_head_model(tiny_hf_models["qwen2"], tmp_path_factory.mktemp("critic"),
                                                 "Qwen2ForTokenClassification", seed=0)
    return {"hf": hf_dir, "ckpt": ckpt, "model": model}


@pytest.mark.dist
@pytest.mark.parametrize("layout,world", [({}, 1), ({"tp": 2, "sp": True}, 2), ({"pp": 2}, 2)],
                         ids=["tp1", "tp2_sp", "pp2"])
def test_scalar_head_matches_hf_token_classification(critic, tokens, layout, world):
    with torch.no_grad():
        ref = critic["model"](tokens).logits  # [b, s, 1]
    ranks = run_local_group("tests.models.parity:megatron_logits", world, args=([critic["ckpt"]], layout, tokens),
                            timeout=300)
    got = [r[0] for r in ranks if r[0] is not None]
    assert got and all(g.shape == ref.shape for g in got)
    assert max((g - ref).abs().max().item() for g in got) <= PARITY_TOL
