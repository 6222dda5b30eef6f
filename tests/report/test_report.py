"""`megarl report` on fabricated runs of every stage: the figures each stage gets and what they plot,
the runs table, every other metric listed, the trajectory viewer's data with failure kinds, runs
compared with their recipe differences, and runs still being written (a half-written last line,
missing sinks, no recipe yet)."""

import html
import json
import os
import re
import subprocess
import sys

import pytest

from megarl.report import write_report
from megarl.report.runs import RunNotFound, load_run
from megarl.report.trajectories import failure_kinds
from tests.report.fabricate import fabricate_run, sample_records

FIGURES = {"grpo": {"reward", "kl", "policy", "advantages", "responses", "timing", "throughput"},
           "ppo": {"reward", "kl", "policy", "advantages", "responses", "timing", "throughput"},
           "sft": {"loss"}, "dpo": {"loss", "optimiser"}, "rm": {"loss", "optimiser"}, "kto": {"loss", "optimiser"}}
"""The figures a run of each stage gets from the fabricated metrics (async/ has no metrics there)."""


def figures_on_page(index: str) -> dict[str, set[str]]:
    """{figure slug: the metrics it plots} from the page's <img> tags."""
    page = open(index).read()
    tags = re.findall(r'<img class="figure" id="figure-([a-z]+)" alt="[^"]*" title="([^"]*)"', page)
    return {slug: set(html.unescape(title).split(", ")) for slug, title in tags}


def embedded_trajectories(index: str) -> list[dict]:
    page = open(index).read()
    return json.loads(re.search(r'<script type="application/json" id="trajectory-data">(.*?)</script>', page, re.S)[1])


@pytest.mark.parametrize("stage", ["grpo", "ppo", "sft", "dpo", "rm", "kto"])
def test_each_stage_gets_its_figures_and_lists_every_other_metric(tmp_path, stage):
    run = fabricate_run(str(tmp_path / stage), stage)
    report = write_report([run])
    assert report.index == os.path.join(run, "report", "index.html")
    figures = figures_on_page(report.index)
    assert set(figures) == FIGURES[stage]
    assert sorted(os.listdir(os.path.join(run, "report", "figures"))) == sorted(f"{s}.png" for s in FIGURES[stage])
    for path in report.figures:
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    page = open(report.index).read()
    plotted = set().union(*figures.values())
    logged = {k for row in load_run(run).metrics for k in row if k != "step"}
    listed = set(re.findall(r"<tr><td><code>([^<]+)</code></td><td>", page.split('id="other-metrics"')[-1]))
    assert logged <= plotted | listed, logged - plotted - listed        # nothing logged is left out
    assert "loss" in plotted if stage in ("sft", "dpo", "rm", "kto") else "reward/mean" in plotted
    assert 'src="data:image/png;base64,' in page and "http://" not in page and "https://" not in page
    assert report.notes == []


def test_rl_figures_plot_components_eval_kl_and_the_timing_stack(tmp_path):
    run = fabricate_run(str(tmp_path / "grpo"), "grpo")
    figures = figures_on_page(write_report([run]).index)
    assert {"reward/mean", "reward/task", "reward/format", "eval/mean", "eval/task"} <= figures["reward"]
    assert {"actor/approx_kl", "mismatch/k3_kl"} <= figures["kl"]
    assert {"timing/rollout_s", "timing/update_s", "timing/sync_s", "timing/step_s"} <= figures["timing"]
    assert {"sync/seconds", "sync/bytes", "throughput/samples_per_s"} <= figures["throughput"]
    assert "eval/seconds" not in figures["reward"] and "reward/failed_frac" in figures["responses"]
    page = open(os.path.join(run, "report", "index.html")).read()
    assert "<code>flops/update</code>" in page and "<code>timing/engine_generate_s</code>" in page


def test_trajectory_viewer_data_carries_segments_turns_and_failure_kinds(tmp_path):
    run = fabricate_run(str(tmp_path / "grpo"), "grpo", steps=20, samples_every=10)
    entries = embedded_trajectories(write_report([run]).index)
    assert len(entries) == 8 and {e["step"] for e in entries} == {10, 20}
    assert [e["failures"] for e in entries[:4]] == [[], ["tool_error"], ["parse_failure"], ["truncation"]]
    first = entries[0]
    assert [s["trained"] for s in first["segments"]] == [True, False, True]
    assert first["components"] == {"task": 1.0, "format": 0.2} and first["events"][1]["role"] == "tool"


def test_failure_kinds_of_records_with_and_without_counts():
    """Counts when the record has them (SampleWriter), else read from the turns; max_turns and reward
    errors are their own kinds; an old record (text only) has none."""
    assert failure_kinds({"events": [{"role": "tool", "ok": False}], "finish": "answer"}) == ["tool_error"]
    assert failure_kinds({"tool_errors": 2, "parse_failures": 1, "finish": "max_total_tokens"}) == [
        "tool_error", "parse_failure", "truncation"]
    assert failure_kinds({"finish": "max_turns", "errors": ["timeout"]}) == ["max_turns", "reward_error"]
    assert failure_kinds({"response": "x", "finish": "answer"}) == []


def test_a_run_still_being_written_reports_without_failing(tmp_path):
    """A half-written last line in metrics.jsonl and samples.jsonl is left out and noted; the complete
    rows before it are all shown."""
    run = fabricate_run(str(tmp_path / "grpo"), "grpo", steps=20)
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('{"step": 21, "reward/mean": 0.')
    with open(os.path.join(run, "samples.jsonl"), "a") as f:
        f.write('{"step": 30, "prompt": "hal')
    report = write_report([run])
    name = load_run(run).name
    assert report.notes == [f"{name}: metrics.jsonl: line 22 is half written (the run is still writing it); left out",
                            f"{name}: samples.jsonl: line 9 is half written (the run is still writing it); left out"]
    page = open(report.index).read()
    assert "half written" in page
    assert re.search(r'<td class="num">20</td>', page)          # the last complete step
    assert len(embedded_trajectories(report.index)) == 8


def test_a_corrupt_line_inside_a_file_is_left_out_and_named(tmp_path):
    run = fabricate_run(str(tmp_path / "sft"), "sft", steps=5)
    lines = open(os.path.join(run, "metrics.jsonl")).read().splitlines()
    lines[2] = "garbage"
    open(os.path.join(run, "metrics.jsonl"), "w").write("\n".join(lines) + "\n")
    loaded = load_run(run)
    assert [r["step"] for r in loaded.metrics] == [1, 2, 4, 5]
    assert loaded.notes == ["metrics.jsonl: line 3 is not a JSON object; left out"]


def test_missing_optional_sinks_and_recipe(tmp_path):
    """No samples.jsonl, no tensorboard/wandb, no recipe: the page says so; the stage is guessed."""
    run = fabricate_run(str(tmp_path / "grpo"), "grpo", samples_every=0, sinks=())
    os.remove(os.path.join(run, "recipe.resolved.yaml"))
    report = write_report([run])
    page = open(report.index).read()
    assert "No sampled trajectories" in page and "jsonl only" in page
    assert any("'grpo' guessed from the metric names" in n for n in report.notes)
    assert set(figures_on_page(report.index)) == FIGURES["grpo"]


def test_a_report_written_again_keeps_only_its_own_figures(tmp_path):
    """Runs compared into one directory, then a single run there: the first report's extra figures go."""
    grpo, sft = fabricate_run(str(tmp_path / "grpo"), "grpo"), fabricate_run(str(tmp_path / "sft"), "sft")
    out = str(tmp_path / "out")
    write_report([grpo, sft], out)
    assert "timing.png" in os.listdir(os.path.join(out, "figures"))
    report = write_report([sft], out)
    assert os.listdir(os.path.join(out, "figures")) == ["loss.png"] and report.figures == [
        os.path.join(out, "figures", "loss.png")]


def test_a_run_that_has_not_logged_yet(tmp_path):
    empty = tmp_path / "starting"
    empty.mkdir()
    report = write_report([str(empty)])
    assert report.figures == [] and "No metrics logged yet" in open(report.index).read()
    assert any("no metrics.jsonl yet" in n for n in report.notes)


def test_a_resumed_run_shows_the_redone_steps_once_with_their_later_values(tmp_path):
    run = fabricate_run(str(tmp_path / "sft"), "sft", steps=6)
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 5, "loss": 9.0}) + "\n" + json.dumps({"step": 6, "loss": 8.0}) + "\n")
    loaded = load_run(run)
    assert [r["step"] for r in loaded.metrics] == [1, 2, 3, 4, 5, 6]
    assert loaded.series("loss")[1][-2:] == [9.0, 8.0]
    assert loaded.notes == ["metrics.jsonl: 2 step(s) logged more than once (steps 5-6: a resumed run redoes the "
                            "steps after its last checkpoint); the later values are shown"]


def test_runs_compared_overlay_and_show_recipe_differences(tmp_path):
    a = fabricate_run(str(tmp_path / "a" / "grpo"), "grpo", recipe={"algorithm": {"kl_coef": 0.0, "clip": 0.2}})
    b = fabricate_run(str(tmp_path / "b" / "grpo"), "grpo", recipe={"algorithm": {"kl_coef": 0.05, "clip": 0.2}},
                      seed=1.0)
    pair = write_report([a, b], str(tmp_path / "pair"))
    table = recipe_table(pair.index)
    assert re.search(r"<code>algorithm.kl_coef</code></td><td><code>0.0</code></td><td><code>0.05</code>", table)
    assert "algorithm.clip" not in table and "<code>stage</code>" not in table   # the same in both
    assert len({e["run"] for e in embedded_trajectories(pair.index)}) == 2
    assert {"a/grpo", "b/grpo"} <= set(re.findall(r"<tr><td>([^<]+)</td><td>grpo</td>", open(pair.index).read()))

    sft = fabricate_run(str(tmp_path / "sft"), "sft")   # runs of different stages compare too
    out = str(tmp_path / "compare")
    report = write_report([a, b, sft], out)
    assert report.index == os.path.join(out, "index.html")
    assert set(figures_on_page(report.index)) == FIGURES["grpo"] | FIGURES["sft"]
    table = recipe_table(report.index)
    assert re.search(r"<code>stage</code></td><td><code>grpo</code></td><td><code>grpo</code></td><td><code>sft</code>",
                     table)
    assert re.search(r"<code>algorithm.clip</code></td><td><code>0.2</code></td><td><code>0.2</code></td>"
                     r"<td><code>\(absent\)</code>", table)


def recipe_table(index: str) -> str:
    return html.unescape(open(index).read()).split('id="recipe-differences"')[1].split("</table>")[0]


def test_cli_writes_the_report_and_refuses_a_missing_directory(tmp_path):
    run = fabricate_run(str(tmp_path / "grpo"), "grpo", steps=10)
    cli = [sys.executable, "-m", "megarl.cli", "report"]
    proc = subprocess.run([*cli, run], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"report: {os.path.join(run, 'report', 'index.html')}" in proc.stdout
    proc = subprocess.run([*cli, str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "nope: not a directory" in proc.stderr
    with pytest.raises(RunNotFound):
        load_run(str(tmp_path / "nope"))


def test_the_report_imports_no_torch(tmp_path):
    run = fabricate_run(str(tmp_path / "grpo"), "grpo", steps=5)
    code = (f"import sys; from megarl.cli import main; code = main(['report', {run!r}]); "
            "print(code, sorted(m for m in ('torch', 'ray', 'vllm', 'megatron') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.splitlines()[-1] == "0 []", proc.stdout + proc.stderr


def test_sample_records_fabricated_like_the_writer():
    """The fabricated records have the fields metrics.SampleWriter writes (the test data stays honest)."""
    import inspect

    from megarl import metrics

    source = inspect.getsource(metrics.SampleWriter.maybe_write)
    for field in sample_records([1])[0]:
        assert f'"{field}"' in source, field


class LetterTokenizer:
    """Token i is the letter chr(97 + i)."""

    def decode(self, ids):
        return "".join(chr(97 + i) for i in ids)


def test_the_sample_writer_splits_responses_into_trained_and_masked_runs(tmp_path):
    from types import SimpleNamespace

    from megarl.metrics import SampleWriter, trained_segments
    from megarl.report.trajectories import viewer_entries
    from megarl.rollout.agent import Trajectory

    tok = LetterTokenizer()
    assert trained_segments([0, 1, 2, 3, 4], [1, 1, 0, 0, 1], tok) == [
        {"text": "ab", "trained": True, "tokens": 2}, {"text": "cd", "trained": False, "tokens": 2},
        {"text": "e", "trained": True, "tokens": 1}]
    assert trained_segments([], [], tok) == []
    t = Trajectory([7, 8], response_ids=[0, 1, 2, 3], loss_mask=[1, 0, 0, 1], turns=2, tool_calls=1, tool_errors=1,
                   finish="answer", events=[{"role": "assistant", "text": "a", "calls": [], "parse_errors": []},
                                            {"role": "tool", "name": "calculator", "text": "bc", "ok": False}])
    r = SimpleNamespace(scalar=0.5, components={"task": 0.5}, values={"numeric_match": 0.5}, errors=[])
    writer = SampleWriter(str(tmp_path), every=2)
    writer.maybe_write(1, [t], [r], tok)       # not a sampling step
    writer.maybe_write(2, [t], [r], tok)
    [record] = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
    assert record["response"] == "abcd" and [s["text"] for s in record["segments"]] == ["a", "bc", "d"]
    [entry] = viewer_entries("run", [record], [])
    assert entry["failures"] == ["tool_error"] and entry["reward"] == 0.5 and entry["step"] == 2
