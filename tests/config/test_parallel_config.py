import pytest

from megarl.config import ConfigError, ParallelConfig


def keys(cfg, **kw):
    return [i.key for i in cfg.issues(**kw)]


def test_derived_sizes():
    p = ParallelConfig(tp=2, pp=2, cp=2).resolve(16)
    assert (p.dp, p.model_parallel_size, p.expert_tp) == (2, 8, 2)
    moe = ParallelConfig(tp=2, sp=True, ep=4, etp=1).resolve(8, num_experts=8)
    assert moe.dp == 4 and moe.expert_dp == 2


def test_dp_needs_world_size():
    with pytest.raises(RuntimeError, match="resolve"):
        _ = ParallelConfig().dp


def test_world_not_divisible_names_the_product():
    with pytest.raises(ConfigError,
                       match=r"parallel.tp: world size 6 is not divisible by tp·pp·cp = 2·2·1 = 4"):
        ParallelConfig(tp=2, pp=2).resolve(6)


@pytest.mark.parametrize("cfg,key", [
    (ParallelConfig(tp=0), "parallel.tp"),
    (ParallelConfig(pp=-1), "parallel.pp"),
    (ParallelConfig(vpp=2), "parallel.vpp"),
    (ParallelConfig(sp=True), "parallel.sp"),
    (ParallelConfig(etp=0), "parallel.etp"),
])
def test_each_rule_names_its_key(cfg, key):
    assert key in keys(cfg)


def test_moe_rules():
    assert keys(ParallelConfig(tp=2), num_experts=4) == ["parallel.sp"]
    assert keys(ParallelConfig(ep=3), num_experts=4) == ["parallel.ep"]
    assert keys(ParallelConfig(ep=2, pp=2).resolve(4, num_experts=4)) == []
    with pytest.raises(ConfigError, match="etp·ep·pp"):
        ParallelConfig(ep=4, pp=2).resolve(4, num_experts=8)


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as e:
        ParallelConfig(pp=0, vpp=2, sp=True).resolve(8)
    assert {i.key for i in e.value.issues} == {"parallel.pp", "parallel.vpp", "parallel.sp"}
    assert "3 problem(s)" in str(e.value)
