import pytest

from megarl.runtime.local_group import run_local_group


@pytest.mark.dist
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_vocab_parallel_logprobs_and_entropy(world, temperature):
    for r in run_local_group("tests.models.logprob_checks:check", world, args=(temperature,), timeout=300):
        assert r["lp"] < 1e-5 and r["ent"] < 1e-5 and r["grad"] < 1e-5, r  # fp32, logits of magnitude ~10
        assert r["input_untouched"]
