"""A checkpoint's manifest: every file's relative path, size and checksum, written just before the
checkpoint directory is renamed from `.partial` and checked before it is loaded, so a truncated or
damaged file is named instead of surfacing as an EOFError deep inside torch.load. No torch: the
RL driver and the launcher use it.

The checksum is zlib's CRC-32 streamed in 1 MiB chunks rather than a cryptographic hash: it runs
at disk speed and catches truncation and corruption; nobody forges checkpoints.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable

MANIFEST = "manifest.json"
CHUNK = 1 << 20


class CheckpointCorrupt(Exception):
    """A checkpoint that does not match its manifest (or names no checkpoint at all)."""


def crc32_of(path: str) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _files(ckpt_dir: str) -> list[str]:
    out = []
    for folder, _, names in os.walk(ckpt_dir):
        out += [os.path.relpath(os.path.join(folder, n), ckpt_dir) for n in names]
    return sorted(f for f in out if f != MANIFEST)


def write_manifest(ckpt_dir: str) -> None:
    """Record every file under `ckpt_dir` (call it once the directory is complete)."""
    files = {}
    for rel in _files(ckpt_dir):
        path = os.path.join(ckpt_dir, rel)
        files[rel] = {"size": os.path.getsize(path), "crc32": crc32_of(path)}
    with open(os.path.join(ckpt_dir, MANIFEST), "w") as f:
        json.dump({"format": 1, "checksum": "crc32", "files": files}, f, indent=1)


def has_manifest(ckpt_dir: str) -> bool:
    return os.path.isfile(os.path.join(ckpt_dir, MANIFEST))


def problem(ckpt_dir: str, checksums: bool = True) -> str | None:
    """Why `ckpt_dir` does not match its manifest (the first file that differs), or None. Sizes
    only with checksums=False: a cheap look that still catches truncated files."""
    if not os.path.isdir(ckpt_dir):
        return "the directory does not exist"
    try:
        with open(os.path.join(ckpt_dir, MANIFEST)) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its {MANIFEST} cannot be read ({type(e).__name__}: {e})"
    for rel, want in files.items():
        path = os.path.join(ckpt_dir, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        size = os.path.getsize(path)
        if size != want["size"]:
            return f"{rel} is {size} bytes, the manifest says {want['size']}"
        if checksums and crc32_of(path) != want["crc32"]:
            return f"{rel} has CRC-32 {crc32_of(path)}, the manifest says {want['crc32']}"
    return None


def usable(ckpt_dir: str, warn: Callable[[str], None], checksums: bool = True) -> str | None:
    """None when `ckpt_dir` may be loaded, else why not. A checkpoint without a manifest (written
    by an older megarl) is accepted with a warning that it cannot be verified."""
    if os.path.isdir(ckpt_dir) and not has_manifest(ckpt_dir):
        warn(f"checkpoint {ckpt_dir} has no {MANIFEST} (written by an older megarl): loading it unverified")
        return None
    return problem(ckpt_dir, checksums)
