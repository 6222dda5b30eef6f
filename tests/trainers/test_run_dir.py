"""Run directories are owned (issue 18): `megarl train` refuses an output_dir holding another run
unless told to resume or overwrite it, and resumes only from checkpoints that match the manifest
written when they were saved (a damaged newest one is named and the one before it used)."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from megarl.checkpoint.manifest import MANIFEST, CheckpointCorrupt, problem, write_manifest
from megarl.cli import main as cli
from megarl.trainers import runner
from megarl.trainers.run_dir import PREVIOUS, RESOLVED

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def recipe_file(tmp_path, name="recipe", **trainer) -> str:
    """A tiny sft recipe whose model path holds nothing: `megarl train` claims the output directory,
    then stops at the model (exit 1) before any training."""
    data = {"defaults": [os.path.join(ROOT, "configs/tiny/base.yaml")], "stage": "sft",
            "model": {"path": str(tmp_path / "no_model"), "shape_preset": "tiny-qwen2"},
            "data": {"train": str(tmp_path / "train.jsonl")},
            "trainer": {"steps": 4, "samples_per_step": 8, "output_dir": str(tmp_path / "run"), **trainer}}
    (tmp_path / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    (tmp_path / "no_model").mkdir(exist_ok=True)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def train(recipe: str, *sets: str) -> int:
    return cli(["train", recipe, *(a for s in sets for a in ("--set", s))])


def resolved(tmp_path) -> dict:
    return yaml.safe_load((tmp_path / "run" / RESOLVED).read_text())


def a_previous_run(tmp_path) -> str:
    """A run directory as a first `megarl train` leaves it, plus a file megarl never writes."""
    recipe = recipe_file(tmp_path)
    assert train(recipe) == 1                                  # claimed, then: no model there
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000002").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "notes.txt").write_text("mine")
    return recipe


def test_a_different_recipe_is_refused_naming_the_keys_and_nothing_is_written(tmp_path, capsys):
    recipe = a_previous_run(tmp_path)
    before = (tmp_path / "run" / RESOLVED).read_text()
    capsys.readouterr()
    assert train(recipe, "optim.lr=0.5", "data.seed=7") == 1
    err = capsys.readouterr().err
    assert "holds another run" in err and "optim.lr: " in err and "-> 0.5" in err and "data.seed: 1234 -> 7" in err
    assert "trainer.existing_run=resume" in err and "trainer.existing_run=overwrite" in err
    assert (tmp_path / "run" / RESOLVED).read_text() == before
    assert not (tmp_path / "run" / "init").exists() and not (tmp_path / "run" / PREVIOUS).exists()


def test_the_same_run_resumes_whatever_changes_between_invocations(tmp_path, capsys):
    recipe = a_previous_run(tmp_path)
    capsys.readouterr()
    assert train(recipe, "trainer.resume=never", "trainer.max_steps_this_run=1", "parallel.tp=2") == 1
    out = capsys.readouterr()
    assert "holds another run" not in out.err and "same run: resuming" in out.out
    assert "error: " in out.err and "no_model" in out.err   # it went on to the model
    assert resolved(tmp_path)["trainer"]["max_steps_this_run"] == 1


def test_many_differences_are_counted(tmp_path, capsys):
    recipe = a_previous_run(tmp_path)
    capsys.readouterr()
    changed = ["optim.lr=0.5", "optim.min_lr=0.1", "optim.warmup_steps=3", "data.seed=7", "trainer.seed=9",
               "trainer.steps=5", "optim.clip_grad=2.0"]
    assert train(recipe, *changed) == 1
    err = capsys.readouterr().err
    assert "... and 2 more" in err and len([line for line in err.splitlines() if " -> " in line]) == 5


def test_existing_run_resume_continues_with_the_new_recipe(tmp_path):
    recipe = a_previous_run(tmp_path)
    assert train(recipe, "optim.lr=0.5", "trainer.existing_run=resume") == 1   # then: no model
    assert resolved(tmp_path)["optim"]["lr"] == 0.5
    assert yaml.safe_load((tmp_path / "run" / PREVIOUS).read_text())["optim"]["lr"] != 0.5
    assert (tmp_path / "run" / "checkpoints" / "step_000002").is_dir()


def test_existing_run_overwrite_removes_only_megarl_outputs(tmp_path):
    recipe = a_previous_run(tmp_path)
    (tmp_path / "run" / "hf.partial").mkdir()
    assert train(recipe, "optim.lr=0.5", "trainer.existing_run=overwrite") == 1
    assert sorted(os.listdir(tmp_path / "run")) == ["notes.txt", RESOLVED]
    assert resolved(tmp_path)["optim"]["lr"] == 0.5


def test_megarl_outputs_without_a_recipe_are_refused_but_foreign_files_are_fine(tmp_path, capsys):
    recipe = recipe_file(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert train(recipe) == 1 and (tmp_path / "run" / RESOLVED).is_file()   # claimed; then no model
    os.remove(tmp_path / "run" / RESOLVED)
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    capsys.readouterr()
    assert train(recipe) == 1
    assert "megarl outputs without a recipe.resolved.yaml: metrics.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "run" / RESOLVED).exists()


# ---- verified checkpoints -----------------------------------------------------------------------
def fake_recipe(tmp_path, **trainer):
    from types import SimpleNamespace

    return SimpleNamespace(trainer=SimpleNamespace(**{"output_dir": str(tmp_path), "resume": "auto", **trainer}))


def checkpoint(root, step: int, manifest: bool = True) -> str:
    path = os.path.join(root, f"step_{step:06d}")
    os.makedirs(os.path.join(path, "extra"))
    with open(os.path.join(path, "__0_0.distcp"), "wb") as f:
        f.write(os.urandom(3 << 20))                       # more than one checksum chunk
    with open(os.path.join(path, "extra", "rank0.pt"), "wb") as f:
        f.write(b"state" * 10)
    if manifest:
        write_manifest(path)
    return path


def truncate(path: str, keep: int = 100) -> None:
    with open(path, "r+b") as f:
        f.truncate(keep)


def test_manifest_round_trip_names_missing_truncated_and_changed_files(tmp_path):
    ckpt = checkpoint(tmp_path, 1)
    files = json.load(open(os.path.join(ckpt, MANIFEST)))["files"]
    assert sorted(files) == ["__0_0.distcp", "extra/rank0.pt"] and files["extra/rank0.pt"]["size"] == 50
    assert problem(ckpt) is None
    with open(os.path.join(ckpt, "extra", "rank0.pt"), "r+b") as f:
        f.write(b"X")                                      # same size, other bytes
    assert problem(ckpt, checksums=False) is None
    assert "extra/rank0.pt has CRC-32" in problem(ckpt)
    truncate(os.path.join(ckpt, "__0_0.distcp"))
    assert problem(ckpt) == f"__0_0.distcp is 100 bytes, the manifest says {3 << 20}"
    os.remove(os.path.join(ckpt, "__0_0.distcp"))
    assert problem(ckpt) == "__0_0.distcp is missing"
    open(os.path.join(ckpt, MANIFEST), "w").write("{")
    assert problem(ckpt).startswith(f"its {MANIFEST} cannot be read")


def test_auto_resume_names_a_damaged_newest_checkpoint_and_takes_the_one_before(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    older, newest = checkpoint(root, 2), checkpoint(root, 4)
    truncate(os.path.join(newest, "__0_0.distcp"))
    assert runner.resume_checkpoint(fake_recipe(tmp_path), "sft") == older
    out = capsys.readouterr().out
    assert f"[sft] warning: skipping checkpoint {newest}: __0_0.distcp is 100 bytes" in out
    truncate(os.path.join(older, "extra", "rank0.pt"), 3)
    assert runner.resume_checkpoint(fake_recipe(tmp_path), "sft") is None      # none intact: start fresh


def test_auto_resume_checks_the_critic_checkpoint_of_the_same_step(tmp_path, capsys):
    older, _ = checkpoint(tmp_path / "checkpoints", 2), checkpoint(tmp_path / "checkpoints", 4)
    checkpoint(tmp_path / "critic_checkpoints", 2)
    critic = checkpoint(tmp_path / "critic_checkpoints", 4)
    os.remove(os.path.join(critic, "extra", "rank0.pt"))
    assert runner.resume_checkpoint(fake_recipe(tmp_path), "rl", ("critic_checkpoints",)) == older
    assert f"skipping checkpoint {critic}: extra/rank0.pt is missing" in capsys.readouterr().out


def test_an_explicit_damaged_checkpoint_is_refused_naming_the_file(tmp_path):
    ckpt = checkpoint(tmp_path / "elsewhere", 3)
    assert runner.resume_checkpoint(fake_recipe(tmp_path, resume=ckpt)) == ckpt
    truncate(os.path.join(ckpt, "extra", "rank0.pt"), 3)
    with pytest.raises(CheckpointCorrupt, match=r"trainer.resume=.*step_000003: extra/rank0.pt is 3 bytes"):
        runner.check_resume_path(fake_recipe(tmp_path, resume=ckpt))   # before any worker starts
    with pytest.raises(CheckpointCorrupt, match="extra/rank0.pt is 3 bytes"):
        runner.resume_checkpoint(fake_recipe(tmp_path, resume=ckpt))


def test_a_checkpoint_without_manifest_is_accepted_with_a_warning(tmp_path, capsys):
    legacy = checkpoint(tmp_path / "checkpoints", 5, manifest=False)
    assert runner.resume_checkpoint(fake_recipe(tmp_path), "sft") == legacy
    assert runner.resume_checkpoint(fake_recipe(tmp_path, resume=legacy), "sft") == legacy
    out = capsys.readouterr().out
    assert out.count(f"[sft] warning: checkpoint {legacy} has no {MANIFEST}") == 2 and "unverified" in out
