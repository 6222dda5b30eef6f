"""The conversion cache (checkpoint/convert_cache.py): a starting model is converted once per
content, found again from any path and any run, converted again when its content changes, and
two runs converting it at once keep one result."""

from __future__ import annotations

import os

from megarl.checkpoint.convert_cache import HASHES_FILE, cache_root, converted
from megarl.checkpoint.hf import MARKER


def model_dir(path, weights: bytes = b"w" * 1000):
    os.makedirs(path, exist_ok=True)
    (path / "config.json").write_text('{"model_type": "qwen2"}')
    (path / "model.safetensors").write_bytes(weights)
    return path


class Converter:
    def __init__(self):
        self.made: list[str] = []

    def __call__(self, out: str) -> None:
        os.makedirs(out)
        with open(os.path.join(out, MARKER), "w") as f:
            f.write("{}")
        self.made.append(out)


def test_the_same_content_is_converted_once_from_any_path_and_again_when_it_changes(tmp_path):
    root, convert, lines = tmp_path / "cache", Converter(), []
    a = converted(str(root), [str(model_dir(tmp_path / "a"))], convert, lines.append)
    b = converted(str(root), [str(model_dir(tmp_path / "copy_of_a")), None], convert, lines.append)
    assert a == b and len(convert.made) == 1 and os.path.isfile(os.path.join(a, MARKER))
    assert "using the checkpoint converted before" in lines[-1]
    changed = converted(str(root), [str(model_dir(tmp_path / "c", b"v" * 1000))], convert, lines.append)
    assert changed != a and len(convert.made) == 2
    with_tokenizer = converted(str(root), [str(tmp_path / "a"), str(model_dir(tmp_path / "tok"))], convert,
                               lines.append)
    assert with_tokenizer not in (a, changed) and len(convert.made) == 3
    assert not [p for p in os.listdir(root) if ".partial-" in p]


def test_file_hashes_are_remembered_by_path_size_and_mtime(tmp_path):
    """A model's weights are read once: with the same size and mtime a file is taken as unchanged
    (as make and rsync do), so its content is not hashed again."""
    root, convert = tmp_path / "cache", Converter()
    src = model_dir(tmp_path / "m")
    first = converted(str(root), [str(src)], convert, print)
    assert (root / HASHES_FILE).is_file()
    weights = src / "model.safetensors"
    st = os.stat(weights)
    weights.write_bytes(b"x" * 1000)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert converted(str(root), [str(src)], convert, print) == first and len(convert.made) == 1
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1))   # touched: hashed again, a new key
    assert converted(str(root), [str(src)], convert, print) != first


def test_two_runs_converting_at_once_keep_the_first_result(tmp_path):
    root, src = tmp_path / "cache", model_dir(tmp_path / "m")
    inner = Converter()

    def slow(out: str) -> None:       # while this run converts, another one finishes the same conversion
        Converter()(out)
        converted(str(root), [str(src)], inner, print)

    target = converted(str(root), [str(src)], slow, print)
    assert inner.made and os.path.basename(inner.made[0]).startswith(os.path.basename(target) + ".partial-")
    assert sorted(os.listdir(root)) == sorted([os.path.basename(target), HASHES_FILE])


def test_the_cache_sits_beside_the_run_directories_unless_the_environment_names_one(tmp_path, monkeypatch):
    monkeypatch.delenv("MEGARL_CACHE_DIR", raising=False)
    assert cache_root(str(tmp_path / "runs" / "grpo")) == str(tmp_path / "runs" / ".megarl_cache")
    monkeypatch.setenv("MEGARL_CACHE_DIR", str(tmp_path / "shared"))
    assert cache_root(str(tmp_path / "runs" / "grpo")) == str(tmp_path / "shared")
