"""The stage runner every stage shares: save/stop decisions, resume resolution, the metrics curve
across resumes, stop signals and exit codes."""

from __future__ import annotations

import json
import os
import signal
from types import SimpleNamespace

from megarl.trainers import runner


def fake_recipe(tmp_path, **trainer):
    t = {"steps": 10, "save_freq": 4, "max_steps_this_run": None, "output_dir": str(tmp_path), "resume": "auto",
         **trainer}
    return SimpleNamespace(trainer=SimpleNamespace(**t), model=SimpleNamespace(dtype="fp32"),
                           cluster=SimpleNamespace(device="cpu"))


def test_policy_saves_at_freq_and_last_step_and_stops_on_budget(tmp_path):
    policy = runner.StagePolicy(fake_recipe(tmp_path, max_steps_this_run=5), steps=10)
    decisions = [policy.after_step(s) for s in range(1, 6)]
    assert [d.save for d in decisions] == [False, False, False, True, True]
    assert [d.stop for d in decisions] == [False] * 4 + [True]
    assert policy.result(5, decisions[-1]) == runner.StageResult(False, 5, 10, False)
    last = runner.StagePolicy(fake_recipe(tmp_path, save_freq=0), steps=3)
    assert [last.after_step(s).save for s in (1, 2, 3)] == [False, False, True]
    assert last.result(3) == runner.StageResult(True, 3, 3)


def test_policy_stops_when_the_stop_file_appears_or_any_rank_saw_it(tmp_path):
    policy = runner.StagePolicy(fake_recipe(tmp_path), steps=10)
    assert not policy.after_step(1).stop
    open(tmp_path / runner.STOP_FILE, "w").close()
    d = policy.after_step(2)
    assert d.stop and d.save and d.signalled
    os.remove(tmp_path / runner.STOP_FILE)
    other_rank_saw_it = runner.StagePolicy(fake_recipe(tmp_path), steps=10, agree=lambda mine: True)
    assert other_rank_saw_it.after_step(1).signalled
    # a signal on the last step still finishes the run (nothing left to resume)
    assert not runner.StagePolicy(fake_recipe(tmp_path), 1, agree=lambda mine: True).after_step(1).stop


def test_resume_checkpoint_auto_never_and_path(tmp_path):
    assert runner.resume_checkpoint(fake_recipe(tmp_path)) is None
    for step in (2, 10):
        os.makedirs(tmp_path / "checkpoints" / f"step_{step:06d}")
    os.makedirs(tmp_path / "checkpoints" / "step_000012.partial")   # unfinished saves never count
    assert runner.resume_checkpoint(fake_recipe(tmp_path)).endswith("step_000010")
    assert runner.resume_checkpoint(fake_recipe(tmp_path, resume="never")) is None
    given = str(tmp_path / "checkpoints" / "step_000002")
    assert runner.resume_checkpoint(fake_recipe(tmp_path, resume=given)) == given


def test_metrics_keep_each_step_once_across_a_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in range(0, 7)) + '{"step": 7, "lo')
    runner.truncate_metrics(str(path), 4)       # resumed from step 4: steps 5, 6 and the torn line go
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 1, 2, 3, 4]
    runner.truncate_metrics(str(path), 0)       # a fresh run starts a fresh curve
    assert path.read_text() == ""
    runner.truncate_metrics(str(tmp_path / "absent.jsonl"), 3)   # nothing to cut


def test_run_stage_exit_codes_and_signal_file(tmp_path, monkeypatch):
    exported = []
    monkeypatch.setattr(runner, "export_final", lambda recipe, tag: exported.append(tag))
    r = fake_recipe(tmp_path)
    assert runner.run_stage(r, "t", lambda: runner.StageResult(True, 10, 10)) == 0 and exported == ["t"]
    assert runner.run_stage(r, "t", lambda: runner.StageResult(False, 4, 10)) == 0 and exported == ["t"]
    assert runner.run_stage(r, "t", lambda: None) == 0

    def signalled_body():
        os.kill(os.getpid(), signal.SIGUSR1)       # the handler drops the stop file
        assert runner.stop_file_present(str(tmp_path))
        return runner.StageResult(False, 3, 10, signal=True)

    try:
        assert runner.run_stage(r, "t", signalled_body) == runner.EXIT_CHECKPOINTED
    finally:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)
    assert exported == ["t"]


def test_a_hub_id_as_model_path_says_how_to_download_it(tmp_path, capsys):
    from megarl.cli import main as cli

    code = cli(["train", "configs/tiny/sft_cpu.yaml", "--set", "model.path=Qwen/Qwen2.5-0.5B-Instruct",
                "--set", f"trainer.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 1 and "looks like a Hugging Face hub id" in err, err
    assert "huggingface-cli download Qwen/Qwen2.5-0.5B-Instruct --local-dir" in err
