"""Shared test configuration. Heavy resources (megatron process groups, engines, Ray) are created
per test session and shared; every distributed test runs real gloo ranks via run_local_group."""

import os

# Deterministic, quiet, offline defaults for every test process (spawned ranks inherit them).
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PYTHONWARNINGS", "ignore")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _pytest_process_stays_clean():
    """megatron code runs in spawned ranks (run_local_group), never in the pytest process: the CPU
    compatibility layer rewrites torch process-wide and would leak into unrelated tests."""
    yield
    import sys

    compat = sys.modules.get("megarl.runtime.cpu_compat")
    assert compat is None or compat._applied is None, "a test installed the megatron CPU layer in pytest"


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """Single-rank run of the tiny dense and MoE GPTs (tests/dist/scenarios.py): the initial weights
    as dist checkpoints in a work dir, first-step loss and full gradients, loss trajectory."""
    from megarl.runtime.local_group import run_local_group

    workdir = str(tmp_path_factory.mktemp("parallel_ref"))
    [ref] = run_local_group("tests.dist.scenarios:reference_run", 1, args=(workdir,), timeout=300)
    return workdir, ref


TINY_ARCHS = ("qwen2", "llama", "mistral", "qwen3", "qwen3_moe", "mixtral", "qwen2_tied")


@pytest.fixture(scope="session")
def tiny_hf_models(tmp_path_factory):
    """{arch: dir} of tiny random-init HF models sharing one locally trained tokenizer."""
    from megarl.models.tiny_hf import make_tiny_model

    root = tmp_path_factory.mktemp("tiny_hf")
    dirs = {}
    for i, arch in enumerate(TINY_ARCHS):
        dirs[arch] = str(root / arch)
        tied = arch.endswith("_tied")  # Qwen2-0.5B style: output layer = input embedding
        make_tiny_model(dirs[arch], arch=arch.removesuffix("_tied"), seed=i, tie=tied,
                        tokenizer_dir=dirs["qwen2"] if i else None)
    return dirs


@pytest.fixture(scope="session")
def converted(tiny_hf_models, tmp_path_factory):
    """Each tiny model converted HF -> megatron dist checkpoint -> HF (in one world-1 group)."""
    from megarl.runtime.local_group import run_local_group

    root = tmp_path_factory.mktemp("converted")
    jobs = [(tiny_hf_models[a], str(root / a / "mcore"), str(root / a / "hf_back")) for a in TINY_ARCHS]
    [summaries] = run_local_group("tests.models.parity:convert_round_trip", 1, args=(jobs,), timeout=600)
    return {a: {"hf": j[0], "ckpt": j[1], "back": j[2], "summary": s}
            for a, j, s in zip(TINY_ARCHS, jobs, summaries)}


def make_scalar_head_model(src: str, out, class_name: str, seed: int):
    """A tiny HF *ForTokenClassification / *ForSequenceClassification (num_labels=1) built from the
    causal LM config in `src`, saved with its tokenizer to out/hf and converted to out/mcore.
    Returns (HF model in eval mode, hf dir, megatron checkpoint dir)."""
    import shutil

    import torch
    import transformers
    from transformers import AutoConfig

    from megarl.runtime.local_group import run_local_group

    cfg = AutoConfig.from_pretrained(src, num_labels=1)
    cfg.architectures = [class_name]
    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(cfg).eval()
    model.save_pretrained(out / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), out / "hf" / name)
    run_local_group("megarl.checkpoint.hf:convert_hf_to_megatron", 1, args=(str(out / "hf"), str(out / "mcore")),
                    timeout=300)
    return model, str(out / "hf"), str(out / "mcore")


def processes_with(marker: str) -> list[int]:
    """PIDs of every process on the machine whose command line contains `marker` (vanished ones skipped)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found
