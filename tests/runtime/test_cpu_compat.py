"""The megatron-core CPU compatibility layer: each patch is applied on this CPU-only machine, does
what it claims, and (for the silent ones) is shown to be necessary."""

import subprocess
import sys

import pytest

from megarl.runtime import cpu_compat
from megarl.runtime.local_group import LocalGroupError, run_local_group


@pytest.fixture(scope="session")
def compat_report():
    [report] = run_local_group("tests.runtime.compat_checks:run_checks", 1, timeout=300)
    return report


def test_every_patch_has_a_check_and_documentation():
    from tests.runtime.compat_checks import CHECKS

    names = [p.name for p in cpu_compat.PATCHES]
    assert len(names) == len(set(names)) == 16
    assert set(CHECKS) == set(names)
    for p in cpu_compat.PATCHES:
        assert p.upstream and p.error, p.name


def test_all_patches_apply_on_a_cpu_only_machine(compat_report):
    assert compat_report["applied"] == [p.name for p in cpu_compat.PATCHES]


@pytest.mark.parametrize("name", [p.name for p in cpu_compat.PATCHES])
def test_patch_behaviour(compat_report, name):
    error = compat_report["results"][name]
    assert error is None, f"{name}:\n{error}"


def test_megatron_import_needs_the_layer():
    """Without the layer `import megatron.core` fails on a triton-less machine: the stub is needed."""
    proc = subprocess.run([sys.executable, "-c", "import megatron.core"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "triton" in proc.stderr


def test_unknown_skip_name_is_refused():
    proc = subprocess.run(
        [sys.executable, "-c", "from megarl.runtime import cpu_compat; cpu_compat.install()"],
        capture_output=True, text=True, timeout=120,
        env={**__import__("os").environ, cpu_compat.SKIP_ENV: "no_such_patch"})
    assert proc.returncode != 0 and "no_such_patch" in proc.stderr and "unbatched_p2p_on_gloo" in proc.stderr


@pytest.mark.dist
def test_without_unbatched_p2p_vpp_is_silently_wrong(reference):
    """The interleaved schedule at pp=2 on gloo computes a different loss with batched p2p: the
    patch fixes a real, silent error (if megatron fixes it upstream, this test says so)."""
    ref_dir, ref = reference
    [got, _] = run_local_group("tests.dist.scenarios:layout_run", 2,
                               args=(ref_dir, {"pp": 2, "vpp": 2}, False, "vpp_batched"),
                               env={cpu_compat.SKIP_ENV: "unbatched_p2p_on_gloo"}, timeout=300)
    assert abs(got["loss0"] - ref["dense"]["loss0"]) > 1e-4


@pytest.mark.dist
def test_without_unshare_adam_step_resume_diverges(tmp_path):
    """torch AdamW's shared `step` after a distributed-optimizer load corrupts bias correction:
    the step after a resume no longer matches the uninterrupted run."""
    [res, _] = run_local_group("tests.dist.scenarios:checkpoint_reshard_run", 2,
                               args=(str(tmp_path), {"tp": 2}, [{"tp": 2}]),
                               env={cpu_compat.SKIP_ENV: "unshare_adam_step"}, timeout=300)
    ref_after = res["reference"][2]
    after = res["loaded"][0]["values"][2]
    assert abs(after - ref_after) > 1e-5


def test_optimizer_check_fails_without_unshare_adam_step():
    with pytest.raises(LocalGroupError, match="10: every param needs its own Adam step"):
        run_local_group("tests.runtime.compat_checks:_optimizer_checkpoint_patches", 1,
                        env={cpu_compat.SKIP_ENV: "unshare_adam_step"}, timeout=300)
