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
