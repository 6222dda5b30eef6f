"""FP8 weight-sync quantization: names, checkpoint format, and the CPU fake-quant check against modelopt."""

import importlib.util
import math

import pytest
import torch

from megarl.sync import fp8

HAS_MODELOPT = importlib.util.find_spec("modelopt") is not None
requires_modelopt = pytest.mark.skipif(not HAS_MODELOPT, reason="nvidia-modelopt not installed")

LINEAR_NAMES = [
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.11.self_attn.o_proj.weight",
    "model.layers.0.mlp.gate_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.0.mlp.experts.3.gate_proj.weight",
    "model.layers.0.mlp.experts.3.up_proj.weight",
    "model.layers.0.mlp.experts.127.down_proj.weight",
    "model.layers.0.mlp.shared_expert.gate_proj.weight",
    "model.layers.0.block_sparse_moe.experts.3.w1.weight",
    "model.layers.0.block_sparse_moe.experts.3.w2.weight",
    "model.layers.31.block_sparse_moe.experts.7.w3.weight",
]
KEPT_NAMES = [
    "model.embed_tokens.weight",
    "lm_head.weight",
    "model.norm.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.0.self_attn.q_norm.weight",
    "model.layers.0.self_attn.q_proj.bias",  # biases stay in the engine dtype
    "model.layers.0.mlp.gate.weight",  # routers
    "model.layers.0.block_sparse_moe.gate.weight",
    "model.layers.0.mlp.shared_expert_gate.weight",
    "model.layers.0.mlp.gate_up_proj.weight",  # fused name: not one of the HF projections
    "model.layers.0.w1.weight",  # w1..w3 are linear weights only inside an experts list
]


def weights(shape=(96, 160), dtype=torch.bfloat16, seed=0, outliers=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 0.02
    if outliers:
        idx = torch.randperm(x.numel(), generator=g)[:outliers]
        x.view(-1)[idx] = 40.0 * torch.randn(outliers, generator=g)
    return x.to(dtype)


def roundtrip(x, name="model.layers.0.self_attn.q_proj.weight"):
    (_, w), (_, s) = fp8.quantize_fp8(name, x)
    return w, s, fp8.dequantize_fp8(w, s)


@pytest.mark.parametrize("name", LINEAR_NAMES)
def test_linear_weights_are_fp8(name):
    assert fp8.is_fp8_linear(name)


@pytest.mark.parametrize("name", KEPT_NAMES)
def test_embeddings_norms_routers_lm_head_are_kept(name):
    assert not fp8.is_fp8_linear(name)
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    out = fp8.quantize_fp8(name, x)
    assert len(out) == 1 and out[0][0] == name and out[0][1] is x


@pytest.mark.parametrize("name", ["model.layers.2.self_attn.o_proj.weight",
                                  "model.layers.0.block_sparse_moe.experts.3.w2.weight"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantize_output_format(name, dtype):
    x = weights((48, 80), dtype=dtype)
    out = fp8.quantize_fp8(name, x)
    assert [n for n, _ in out] == [name, name[: -len(".weight")] + ".weight_scale"]
    (_, w), (_, s) = out
    assert w.dtype == torch.float8_e4m3fn and w.shape == x.shape and w.is_contiguous()
    assert s.dtype == torch.float32 and s.shape == () and s.device == x.device
    assert s.item() == pytest.approx(x.float().abs().max().item() / 448.0, rel=1e-6)
    assert w.float().abs().max().item() == 448.0  # the largest weight uses the full e4m3 range


def test_scale_name():
    out = fp8.quantize_fp8("model.layers.0.mlp.experts.3.gate_proj.weight", weights((8, 8)))
    assert out[1][0] == "model.layers.0.mlp.experts.3.gate_proj.weight_scale"


def test_all_zero_weight_has_finite_nonzero_scale():
    x = torch.zeros(16, 32, dtype=torch.bfloat16)
    w, s, deq = roundtrip(x)
    assert torch.isfinite(s) and s.item() > 0
    assert s.item() == pytest.approx(1 / 448)  # modelopt's zero-amax rule: amax -> 1
    assert not torch.isnan(w.float()).any() and (w.float() == 0).all()
    assert (deq == 0).all()
    assert fp8.fp8_quant_error(x)["rel_err_vs_original"] == 0.0


def test_non_finite_or_malformed_linear_weight_is_refused():
    x = weights((8, 8), dtype=torch.float32)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        fp8.quantize_fp8("a.q_proj.weight", x)
    x[1, 2] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        fp8.quantize_fp8("a.q_proj.weight", x)
    with pytest.raises(ValueError, match="2-D"):
        fp8.quantize_fp8("a.q_proj.weight", torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="2-D"):
        fp8.quantize_fp8("a.q_proj.weight", torch.zeros(4, 4, dtype=torch.float8_e4m3fn))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_relative_error_of_normal_weights(dtype):
    x = weights((256, 512), dtype=dtype, seed=1)
    _, _, deq = roundtrip(x)
    rel = ((deq - x.float()).norm() / x.float().norm()).item()
    assert 0 < rel < 0.035  # e4m3 keeps 3 mantissa bits: ~2.6% RMS for a Gaussian
    assert fp8.fp8_quant_error(x)["rel_err_vs_original"] == pytest.approx(rel)


def test_outliers_survive_and_set_the_scale():
    x = weights((128, 256), dtype=torch.float32, seed=2, outliers=5)
    w, s, deq = roundtrip(x)
    big = x.abs() > 1.0
    assert big.sum() >= 4
    torch.testing.assert_close(deq[big], x[big], rtol=2**-4, atol=0)  # within e4m3 rounding
    assert deq.abs().max().item() == pytest.approx(x.abs().max().item(), rel=1e-6)


def assert_matches_fake_quant(x):
    """dequantize(quantize(x)) == modelopt fake-quant, up to float32 rounding.

    The only allowed exception: an element whose exact scaled value x*448/amax lies on the midpoint
    between two e4m3 numbers (the reference multiplies by 448/amax, the export divides by amax/448,
    so float32 rounding can break the tie either way); there the two are adjacent e4m3 values.
    """
    w, s, deq = roundtrip(x)
    ref = fp8.fake_quant_reference(x)
    assert ref.dtype == torch.float32 and ref.shape == x.shape
    ok = torch.isclose(deq, ref, rtol=1e-6, atol=0)
    bad = ~ok
    if bad.any():
        amax = x.double().abs().max()
        exact = x.double()[bad] * 448.0 / amax
        mine, theirs = deq.double()[bad] / s.double(), ref.double()[bad] / s.double()
        midpoint = (mine + theirs) / 2
        assert ((exact - midpoint).abs() <= 1e-6 * exact.abs()).all(), "mismatch away from a rounding tie"
        assert ((mine - theirs).abs() <= exact.abs() / 4).all()  # neighbours: at most one e4m3 step (2**-3 rel)
    return bad.float().mean().item()


@requires_modelopt
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("outliers", [0, 7])
def test_roundtrip_equals_modelopt_fake_quant(dtype, outliers):
    for seed in range(3):
        x = weights((256, 384), dtype=dtype, seed=10 + seed, outliers=outliers)
        frac = assert_matches_fake_quant(x)
        assert frac < (1e-4 if dtype == torch.float32 else 1e-2)


@requires_modelopt
def test_fake_quant_check_on_special_tensors():
    zero = torch.zeros(8, 16)
    assert (fp8.fake_quant_reference(zero) == 0).all()
    assert_matches_fake_quant(zero)
    one_outlier = torch.full((8, 16), 1e-3)
    one_outlier[3, 5] = -1e4
    assert assert_matches_fake_quant(one_outlier) == 0.0
    tiny = weights((8, 16), dtype=torch.float32) * 1e-30  # subnormal float32 range, amax below modelopt's eps
    assert_matches_fake_quant(tiny)


@requires_modelopt
def test_quant_error_report():
    x = weights((64, 128), dtype=torch.float32, outliers=3)
    err = fp8.fp8_quant_error(x)
    assert set(err) == {"max_abs_vs_fake_quant", "mismatch_frac_vs_fake_quant", "rel_err_vs_original"}
    assert err["max_abs_vs_fake_quant"] <= 1e-6 * x.abs().max().item()  # float32 rounding of the scale only
    assert err["mismatch_frac_vs_fake_quant"] == 0.0 and 0 < err["rel_err_vs_original"] < 0.035


@requires_modelopt
def test_backend_is_modelopt_when_importable():
    assert fp8.fp8_backend() == "modelopt"
    fp8.quantize_fp8("model.layers.0.self_attn.q_proj.weight", weights((8, 8)))
    assert fp8.last_backend() == "modelopt"


def test_torch_fallback_is_bit_identical(monkeypatch):
    x = weights((64, 96), seed=3, outliers=2)
    w_ref, s_ref = (t for _, t in fp8.quantize_fp8("a.down_proj.weight", x))
    ref_backend = fp8.last_backend()
    monkeypatch.setattr(fp8, "_load_modelopt", lambda: None)
    assert fp8.fp8_backend() == "torch"
    w, s = (t for _, t in fp8.quantize_fp8("a.down_proj.weight", x))
    assert fp8.last_backend() == "torch"
    assert torch.equal(w.view(torch.uint8), w_ref.view(torch.uint8)) and torch.equal(s, s_ref)
    with pytest.raises(ModuleNotFoundError):
        fp8.fake_quant_reference(x)
    assert math.isnan(fp8.fp8_quant_error(x)["max_abs_vs_fake_quant"])
    assert ref_backend == ("modelopt" if HAS_MODELOPT else "torch")
