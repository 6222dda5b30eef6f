"""Bad input never gives a traceback (issue 18, item 6): a line that is not a row is a rejected row
with its line number and a one-line reason, and reading goes on; a file that cannot be read at all
is one clear error naming the path; rows with nothing to learn from are rejected by name."""

import json
import os

import pytest

from megarl.cli import main as cli
from megarl.data.checks import CheckContext, check_dataset
from megarl.data.readers import BadRow, DatasetError, read_rows
from megarl.reward.functions import required_metadata

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOOD = {"messages": [{"role": "user", "content": "2+2?"}], "ground_truth": "4"}
MIXED_LINES = [json.dumps(GOOD).encode(),   # 1 good
               b'{"prompt": "half a row',      # 2 not JSON
               b'{"prompt": "caf\xe9"}',       # 3 latin-1, not UTF-8
               b"null",                        # 4 not an object
               b"[1, 2]",                      # 5 not an object
               json.dumps({"prompt": "3+3?", "ground_truth": "6"}).encode()]  # 6 good
EXPECTED = {"bad_json": [2], "bad_encoding": [3], "not_an_object": [4, 5]}


@pytest.fixture
def mixed(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(MIXED_LINES) + b"\n")
    return str(path)


def write(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def rows_by_kind(report) -> dict[str, list[int]]:
    return {k: [r for r, _ in hits] for k, hits in report.problems.items()}


@pytest.fixture(scope="module")
def tokenizer(tiny_hf_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_hf_models["qwen2"])


def test_reading_goes_on_past_bad_lines(mixed):
    rows = list(read_rows(mixed))
    assert [n for n, _ in rows] == [1, 2, 3, 4, 5, 6]
    assert [n for n, r in rows if isinstance(r, dict)] == [1, 6]
    bad = {n: r for n, r in rows if isinstance(r, BadRow)}
    assert {n: r.kind for n, r in bad.items()} == {2: "bad_json", 3: "bad_encoding", 4: "not_an_object",
                                                   5: "not_an_object"}
    assert bad[2].detail.startswith("not valid JSON (Unterminated string")
    assert bad[3].detail == "not UTF-8 (byte 0xe9 at byte 16 of the line)" and "caf\ufffd" in bad[3].text
    assert bad[4].detail.startswith("a JSON null, expected a JSON object")
    assert bad[5].detail.startswith("a JSON list, expected a JSON object") and bad[5].text == "[1, 2]"
    assert all("\n" not in r.detail for r in bad.values())


def test_blank_lines_keep_line_numbers_and_a_bom_is_read(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "q"}\r\n\n  \n{"prompt": "r"}\n')
    assert list(read_rows(str(path))) == [(1, {"prompt": "q"}), (4, {"prompt": "r"})]


def test_check_reports_every_bad_line_and_checks_to_the_end(mixed):
    report = check_dataset(mixed, "grpo", CheckContext())
    assert report.total == 6 and report.rejected == 4
    assert rows_by_kind(report) == EXPECTED
    text = report.render()
    assert text.splitlines()[0].endswith("6 rows, stage grpo: 2 ok, 4 rejected")
    assert "not_an_object: 2 (rows 4, 5)" in text and "e.g. row 2: not valid JSON" in text


def test_cli_data_check_on_bad_lines(mixed, tmp_path, capsys):
    out = tmp_path / "rejected.jsonl"
    code = cli(["data", "check", mixed, "--stage", "grpo", "--rejected-out", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 1 and "2 ok, 4 rejected" in captured.out and "Traceback" not in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["problems"] == {"bad_json": 1, "bad_encoding": 1,
                                                                            "not_an_object": 2}
    rejected = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["row"], r["problems"][0]["kind"], r["data"]) for r in rejected] == [
        (2, "bad_json", '{"prompt": "half a row'), (3, "bad_encoding", '{"prompt": "caf\ufffd"}'),
        (4, "not_an_object", "null"), (5, "not_an_object", "[1, 2]")]


@pytest.mark.parametrize("make, message", [
    (lambda d: d, "is a directory"),
    (lambda d: d / "missing.jsonl", "no such file"),
    (lambda d: d / "garbage.parquet", "not a readable parquet file"),
])
def test_an_unreadable_dataset_is_one_clear_error(tmp_path, capsys, make, message):
    (tmp_path / "garbage.parquet").write_bytes(b"this is not parquet\x00\x01" * 10)
    path = str(make(tmp_path))
    with pytest.raises(DatasetError) as e:
        list(read_rows(path))
    assert str(e.value).startswith(f"{path}: {message}") and "\n" not in str(e.value)
    assert cli(["data", "check", path, "--stage", "sft"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"error: {e.value}" and captured.out == ""


def test_an_empty_dataset_fails_the_check(tmp_path, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    assert cli(["data", "check", str(path), "--stage", "sft"]) == 1
    assert "has no rows" in capsys.readouterr().err


def test_identical_chosen_and_rejected_are_rejected(tmp_path):
    rows = [{"prompt": "q", "chosen": "good", "rejected": "bad"},
            {"prompt": "q", "chosen": "same", "rejected": "same"},
            {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
             "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    report = check_dataset(write(tmp_path, rows), "dpo", CheckContext())
    assert rows_by_kind(report) == {"identical_pair": [2, 3]}
    assert report.problems["identical_pair"][0][1] == "chosen equals rejected: nothing to learn"


def test_empty_prompts_are_rejected(tmp_path):
    prompts = [GOOD, {"messages": []}, {"prompt": ""}, {"messages": [{"role": "user", "content": "  \n"}]}]
    report = check_dataset(write(tmp_path, prompts), "grpo", CheckContext())
    assert rows_by_kind(report) == {"empty_prompt": [2, 3, 4]}
    assert report.problems["empty_prompt"][0][1] == "the prompt has no messages"
    assert report.problems["empty_prompt"][1][1] == "the prompt has no user content"
    prefs = [{"prompt": "", "chosen": "a", "rejected": "b"}]
    assert rows_by_kind(check_dataset(write(tmp_path, prefs, "p.jsonl"), "dpo", CheckContext())) == {
        "empty_prompt": [1]}
    kto = [{"prompt": " ", "completion": "a", "label": True}]
    assert rows_by_kind(check_dataset(write(tmp_path, kto, "k.jsonl"), "kto", CheckContext())) == {
        "empty_prompt": [1]}


def test_required_metadata_comes_from_the_reward_functions():
    assert required_metadata(["numeric_match", "tool_call_format", "exact_match"]) == {
        "ground_truth": ["numeric_match", "exact_match"]}
    assert required_metadata(["tool_call_format", "forbidden_patterns"]) == {}


def test_missing_ground_truth_is_rejected_when_a_reward_needs_it(tmp_path):
    prompts = [GOOD, {"prompt": "no answer given"}, {"prompt": "null answer", "ground_truth": None}]
    path = write(tmp_path, prompts)
    report = check_dataset(path, "grpo", CheckContext(required_metadata=required_metadata(["numeric_match"])))
    assert rows_by_kind(report) == {"missing_metadata": [2, 3]}
    assert report.problems["missing_metadata"][0][1] == "no 'ground_truth' in the row (needed by reward function " \
                                                        "numeric_match)"
    assert check_dataset(path, "grpo", CheckContext()).rejected == 0  # no reward function named: not required


def test_cli_with_a_recipe_requires_what_its_rewards_read(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # configs/tiny/grpo_cpu.yaml: numeric_match + tool_call_format
    path = write(tmp_path, [GOOD, {"prompt": "no answer given"}])
    code = cli(["data", "check", path, "--recipe", "configs/tiny/grpo_cpu.yaml",
                "--set", f"model.path={tmp_path / 'no_model'}"])
    out = capsys.readouterr().out
    assert code == 1 and "missing_metadata: 1 (rows 2)" in out
    assert "e.g. row 2: no 'ground_truth' in the row (needed by reward function numeric_match)" in out


ODD_ROWS = [  # shapes that once reached code expecting something else
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ["a", "b"]}]},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "tool_calls": 5}]},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": 5},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": ["x"]},
    {"messages": 7, "prompt": 7, "chosen": None, "rejected": {}, "completion": [], "label": None},
    {"messages": [None, 3], "conversations": [None], "prompt": [1]},
    {"prompt": {"role": "user"}, "chosen": [3], "rejected": "r", "completion": 1.5, "label": True},
    {},
]


@pytest.mark.parametrize("stage", ["sft", "grpo", "dpo", "kto"])
def test_odd_rows_are_rejected_not_raised(tmp_path, stage):
    report = check_dataset(write(tmp_path, ODD_ROWS), stage, CheckContext(tools={"calculator"}))
    assert report.total == len(ODD_ROWS) and report.rejected == len(ODD_ROWS), report.render()


def test_training_rejects_or_stops_on_bad_lines(mixed, tmp_path, tokenizer):
    from megarl.data.prompts import PromptDataset
    from megarl.data.sft import SFTDataset

    ds = PromptDataset(mixed, tokenizer, max_prompt_length=300, required_metadata={"ground_truth": ["numeric_match"]})
    assert [p.row for p in ds.prompts] == [1, 6] and rows_by_kind(ds.report) == EXPECTED
    with pytest.raises(DatasetError, match=r"(?s)4 rejected.*bad_json: 1 \(rows 2\)"):
        PromptDataset(mixed, tokenizer, max_prompt_length=300, on_bad_row="fail")
    no_truth = write(tmp_path, [GOOD, {"prompt": "q"}], "rl.jsonl")
    ds = PromptDataset(no_truth, tokenizer, 300, required_metadata={"ground_truth": ["numeric_match"]})
    assert [p.row for p in ds.prompts] == [1] and rows_by_kind(ds.report) == {"missing_metadata": [2]}

    sft = tmp_path / "sft.jsonl"
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    sft.write_bytes(json.dumps(good).encode() + b"\n{oops\n\xff\xfe\n" + json.dumps(good).encode() + b"\n")
    rejected = tmp_path / "rejected.jsonl"
    data = SFTDataset(str(sft), tokenizer, 256, rejected_path=str(rejected))
    assert data.rows == [1, 4] and rows_by_kind(data.report) == {"bad_json": [2], "bad_encoding": [3]}
    assert [json.loads(line)["row"] for line in rejected.read_text().splitlines()] == [2, 3]
    with pytest.raises(DatasetError, match="bad_encoding: 1 \\(rows 3\\)"):
        SFTDataset(str(sft), tokenizer, 256, on_bad_row="fail")


def test_a_lone_surrogate_is_a_rejected_row_not_a_tokenizer_crash(tmp_path):
    """Valid JSON ("\\ud800" unpaired) that is not Unicode text: rejected with the field named, so no
    tokenizer (data check with --tokenizer, or training) ever sees it."""
    path = tmp_path / "surrogate.jsonl"
    bad = {"messages": [{"role": "user", "content": "x \ud800 y"}], "ground_truth": "4"}
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(bad) + "\n")
    rows = list(read_rows(str(path)))
    assert isinstance(rows[1][1], BadRow) and rows[1][1].kind == "bad_encoding"
    assert rows[1][1].detail.startswith("messages[0].content holds a lone surrogate escape")
    assert not isinstance(rows[0][1], BadRow)
