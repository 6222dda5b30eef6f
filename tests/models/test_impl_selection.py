"""Transformer implementation selection: TE on CUDA, local on CPU, FP8 only with TE."""

import pytest

from megarl.models.impl import select_transformer_impl, transformer_engine_available
from megarl.runtime.device import CPU, CUDA


def test_selection_matrix():
    assert select_transformer_impl("auto", CPU) == "local"
    assert select_transformer_impl("auto", CUDA, te_available=True) == "transformer_engine"
    assert select_transformer_impl("auto", CUDA, te_available=False) == "local"
    assert select_transformer_impl("local", CUDA, te_available=True) == "local"
    te = select_transformer_impl("transformer_engine", CUDA, fp8="hybrid", te_available=True)
    assert te == "transformer_engine"


def test_refusals_say_why():
    with pytest.raises(RuntimeError, match="needs CUDA and an importable Transformer Engine"):
        select_transformer_impl("transformer_engine", CPU)
    with pytest.raises(ValueError, match="fp8='hybrid' needs model.transformer_impl=transformer_engine"):
        select_transformer_impl("auto", CPU, fp8="hybrid")
    with pytest.raises(ValueError, match="must be one of"):
        select_transformer_impl("apex", CPU)


def test_te_is_not_importable_on_this_cpu_machine():
    assert transformer_engine_available() is False


def test_an_auto_choice_is_explained():
    from types import SimpleNamespace

    from megarl.models.hf_config import BuildOptions
    from megarl.models.impl import explain_transformer_impl, transformer_engine_import_error

    assert transformer_engine_import_error() == "not installed"
    assert "auto: no CUDA device" in explain_transformer_impl("auto", "local", CPU)
    gpu_without_te = explain_transformer_impl("auto", "local", CUDA, "import failed: libcudnn.so.9 not found")
    assert "Transformer Engine import failed: libcudnn.so.9" in gpu_without_te and "megarl[gpu]" in gpu_without_te
    assert explain_transformer_impl("auto", "transformer_engine", CUDA).startswith("transformer_engine (auto")
    model = SimpleNamespace(transformer_impl="auto", fp8=None, fp8_recipe="delayed", recompute="none")
    why = BuildOptions.from_recipe(model, CPU).why
    assert why == "local (auto: no CUDA device; Transformer Engine layers need one)"


def test_kernel_fusions_only_where_their_kernels_exist():
    from megarl.models.impl import UNFUSED_KERNELS, kernel_fusions

    assert kernel_fusions("local", cuda=False) == UNFUSED_KERNELS
    te = kernel_fusions("transformer_engine", cuda=True, installed=lambda name: False)
    assert te == dict(bias_dropout_fusion=True, masked_softmax_fusion=True, apply_rope_fusion=True,
                      gradient_accumulation_fusion=False, persist_layer_norm=False)
    local = kernel_fusions("local", cuda=True, installed=lambda name: name == "fused_weight_gradient_mlp_cuda")
    assert not local["apply_rope_fusion"] and not local["masked_softmax_fusion"]
    assert local["gradient_accumulation_fusion"]
