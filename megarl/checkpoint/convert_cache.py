"""Starting checkpoints converted once, kept by the content they were converted from.

Every run used to convert its HF model into its own `<output_dir>/init`: a new run directory (a
sweep, a benchmark, a test) converted the same bytes again. The converted checkpoint is now kept
under a key made of the content of the source files (config, weights, tokenizer) and of the
converter's own code, so any run of the same model finds it, whatever the path, and a changed
model or converter gets a new one:

    <cache>/<key>/                 the converted checkpoint (checkpoint/hf.py's layout)
    <cache>/file_hashes.json       sha256 per (path, size, mtime): unchanged files are not read again

`<cache>` is $MEGARL_CACHE_DIR, else `.megarl_cache` beside the run directory (the runs of one
project share it, and it is as visible to the nodes of a cluster as the run directories are).
Two runs converting the same model at once each convert into a directory of their own; the first
to finish is kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable

from megarl.checkpoint.hf import MARKER

CACHE_ENV = "MEGARL_CACHE_DIR"
HASHES_FILE = "file_hashes.json"
KEY_FORMAT = 1     # bump when the key's recipe changes
CHUNK = 16 << 20


def cache_root(output_dir: str) -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.dirname(os.path.abspath(output_dir)), ".megarl_cache")


def converted(root: str, sources: list[str], convert: Callable[[str], None], log: Callable[[str], None]) -> str:
    """The checkpoint converted from `sources` (directories; None entries skipped): found under
    `root` by their content, or made now by `convert(directory)`."""
    key = content_key(root, [s for s in sources if s])
    target = os.path.join(root, key)
    if os.path.isfile(os.path.join(target, MARKER)):
        log(f"using the checkpoint converted before from the same content: {target}")
        return target
    log(f"converting to a megatron checkpoint in {target}")
    partial = f"{target}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        convert(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    try:
        os.rename(partial, target)
    except OSError:            # another run finished the same conversion first: keep that one
        if not os.path.isfile(os.path.join(target, MARKER)):
            raise
        shutil.rmtree(partial, ignore_errors=True)
    return target


def content_key(root: str, sources: list[str]) -> str:
    """sha256 over the converter's code and every regular file of `sources` (name and content)."""
    from megarl.checkpoint import hf, hf_map, stream

    digest = hashlib.sha256(f"megarl-convert-{KEY_FORMAT}".encode())
    for module in (hf, hf_map, stream):
        with open(module.__file__, "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    hashes = FileHashes(os.path.join(root, HASHES_FILE))
    for i, source in enumerate(sources):
        for name in sorted(os.listdir(source)):
            path = os.path.join(source, name)
            if os.path.isfile(path) and not name.startswith("."):
                digest.update(f"{i}/{name}\0{hashes.of(path)}\0".encode())
    hashes.save()
    return digest.hexdigest()[:32]


class FileHashes:
    """sha256 of files, remembered by (absolute path, size, mtime_ns): a model's weights are read
    once, not at every start."""

    def __init__(self, path: str):
        self.path, self.known, self.changed = path, {}, False
        try:
            with open(path) as f:
                self.known = json.load(f)
        except (OSError, ValueError):
            self.known = {}

    def of(self, path: str) -> str:
        st = os.stat(path)
        stamp = f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}"
        if stamp not in self.known:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(CHUNK):
                    h.update(block)
            self.known[stamp], self.changed = h.hexdigest(), True
        return self.known[stamp]

    def save(self) -> None:
        if not self.changed:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        partial = f"{self.path}.{os.getpid()}"
        with open(partial, "w") as f:
            json.dump(self.known, f)
        os.replace(partial, self.path)
