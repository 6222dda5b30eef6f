"""Every parallel layout computes what one rank computes.

A tiny Llama-shaped GPT (and a 4-expert top-2 MoE variant) is trained for 3 Adam steps by a
single rank; each layout below loads the same initial weights into 2 gloo ranks and must reproduce
the first step's loss and *every* gradient element (compared unsharded, name by name) and the loss
after each optimizer step (megatron DDP + distributed optimizer throughout).
"""

import pytest

from megarl.runtime.local_group import run_local_group

pytestmark = pytest.mark.dist

LAYOUTS = {
    "tp2": ({"tp": 2}, False),
    "tp2_sp": ({"tp": 2, "sp": True}, False),
    "pp2": ({"pp": 2}, False),
    "pp2_vpp2": ({"pp": 2, "vpp": 2}, False),
    "cp2": ({"cp": 2}, False),
    "dp2_distopt": ({}, False),
    "ep2_moe": ({"ep": 2}, True),
    "tp2_sp_ep2_etp1_moe": ({"tp": 2, "sp": True, "ep": 2, "etp": 1}, True),
}
LOSS_TOL = 1e-5     # fp32; observed <= 2.4e-7
GRAD_TOL = 1e-6     # fp32, absolute, per element; observed <= 1.2e-8


@pytest.mark.parametrize("tag", list(LAYOUTS))
def test_layout_matches_single_rank(reference, tag):
    workdir, ref = reference
    parallel, moe = LAYOUTS[tag]
    ranks = run_local_group("tests.dist.scenarios:layout_run", 2, args=(workdir, parallel, moe, tag),
                            timeout=300)
    expected = ref["moe" if moe else "dense"]
    got = ranks[0]
    layout = got["layout"]
    for key in ("tp", "pp", "vpp", "cp", "ep", "sp"):  # the run really used the layout
        assert layout[key] == parallel.get(key, False if key == "sp" else 1), (key, layout)
    assert layout["dp"] == 2 // (layout["tp"] * layout["pp"] * layout["cp"])
    assert ranks[0]["losses"] == ranks[1]["losses"], "ranks disagree on the loss"
    assert abs(got["loss0"] - expected["loss0"]) <= LOSS_TOL
    assert got["grads"].keys() == expected["grads"].keys()
    for name, g in expected["grads"].items():
        diff = (got["grads"][name] - g).abs().max().item()
        assert diff <= GRAD_TOL, f"{tag}: gradient of {name} differs by {diff:.3g}"
    for step, (a, b) in enumerate(zip(got["losses"], expected["losses"])):
        assert abs(a - b) <= LOSS_TOL, f"{tag}: loss after {step} optimizer steps {a} != {b}"


def test_reference_trains_and_differs_between_models(reference):
    """Guards the comparison itself: gradients are non-trivial and MoE differs from dense."""
    _, ref = reference
    dense, moe = ref["dense"], ref["moe"]
    assert all(g.abs().max() > 0 for g in dense["grads"].values())
    assert abs(dense["loss0"] - moe["loss0"]) > 1e-4


def test_checkpoint_reshards_across_layouts(tmp_path):
    """Model + distributed-optimizer state saved at TP=2 reloads at TP=2, PP=2 and DP=2 (TP=1):
    the eval loss is identical and so is the next training step (so Adam's moments and step
    count were resharded, not just the weights)."""
    load_layouts = [{"tp": 2}, {"pp": 2}, {}]
    [res, _] = run_local_group("tests.dist.scenarios:checkpoint_reshard_run", 2,
                               args=(str(tmp_path), {"tp": 2}, load_layouts), timeout=300)
    ref_eval, ref_step3, ref_after = res["reference"]
    assert len(res["loaded"]) == len(load_layouts)
    for entry in res["loaded"]:
        ev, step3, after = entry["values"]
        where = entry["layout"]
        assert abs(entry["fresh_eval"] - ref_eval) > 1e-4, f"{where}: a fresh model already matched"
        assert abs(ev - ref_eval) <= 1e-6, f"{where}: eval after load {ev} != {ref_eval}"
        assert abs(step3 - ref_step3) <= 1e-6, f"{where}: next-step loss {step3} != {ref_step3}"
        assert abs(after - ref_after) <= 1e-5, f"{where}: eval after the next step {after} != {ref_after}"


def test_nonfinite_gradients_or_weights_on_one_rank_stop_every_rank(tmp_path):
    """fp32 megatron applies NaN gradients silently (it checks only under a loss scaler): the ranks
    agree first, so a NaN on one rank leaves every weight untouched, and a poisoned model is never
    saved."""
    results = run_local_group("tests.dist.scenarios:nonfinite_guard_run", 2, args=(str(tmp_path),), timeout=300)
    for r in results:
        assert "non-finite gradients in the test update on 1 rank(s)" in r["update"], r
        assert r["weights_unchanged"] and r["finite_step"] > 0, r
        assert "non-finite weights on 1 rank(s)" in r["save"], r
        assert r["on_disk"] == [], r
