"""One cgroup per sandboxed tool call: a cap on the total memory and on the number of processes of
everything the call starts (an rlimit caps one process; twenty processes under one rlimit each are
twenty times the budget).

The cgroup is made under this process's own cgroup, in the v1 hierarchy of the controller when one
is mounted (this machine's kind: memory and pids are v1, the unified v2 mount has no controllers),
else in cgroup v2 when the controller is delegated to us there. Where neither works the layer is
reported unavailable, and the sandbox refuses to run unless the tool's options allow that.
"""

from __future__ import annotations

import itertools
import os
import signal
import time

CONTROLLERS = ("memory", "pids")
_names = itertools.count()


def _own_paths() -> dict[str, str]:
    """controller -> this process's cgroup path in that hierarchy ("" key: the v2 path)."""
    paths = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                paths[c] = path
    return paths


def _mounts() -> dict[str, tuple[str, str]]:
    """controller -> (mount point, mount root) of its v1 hierarchy; "" -> the v2 mount."""
    mounts = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fields, (fstype, _, options) = pre.split(), post.split()[:3]
            root, point = fields[3], fields[4]
            if fstype == "cgroup2":
                mounts.setdefault("", (point, root))
            elif fstype == "cgroup":
                for opt in options.split(","):
                    if opt in CONTROLLERS:
                        mounts[opt] = (point, root)
    return mounts


def _parent_dirs() -> dict[str, str]:
    """controller -> the directory under which our per-call cgroups are made."""
    own, mounts, dirs = _own_paths(), _mounts(), {}
    for c in CONTROLLERS:
        if c in mounts and c in own:
            point, root = mounts[c]
            rel = own[c][len(root):] if own[c].startswith(root) and root != "/" else own[c]
            dirs[c] = point + rel
        elif "" in mounts and "" in own:
            point, _ = mounts[""]
            base = point + own[""]
            if c in _read(os.path.join(base, "cgroup.controllers")).split():
                dirs[c] = base
    return dirs


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class ToolCgroup:
    """`memory` and/or `pids` cgroups for one call. Made by the caller; the sandbox's first process
    moves itself in (writes 0 to each `procs_files` entry) before it starts anything."""

    def __init__(self, memory_bytes: int | None, max_processes: int | None):
        parents = _parent_dirs()
        name = f"megarl-tool-{os.getpid()}-{next(_names)}"
        self.dirs: dict[str, str] = {}
        try:
            if memory_bytes is not None:
                self.dirs["memory"] = self._make(parents["memory"], name, "memory")
                self._limit_memory(memory_bytes)
            if max_processes is not None:
                path = self._make(parents["pids"], name, "pids")
                self.dirs["pids"] = path
                _write(os.path.join(path, "pids.max"), str(max_processes))
        except (KeyError, OSError):
            self.remove()
            raise

    def _make(self, parent: str, name: str, controller: str) -> str:
        if os.path.exists(os.path.join(parent, "cgroup.subtree_control")):  # v2: delegate the controller
            if controller not in _read(os.path.join(parent, "cgroup.subtree_control")).split():
                _write(os.path.join(parent, "cgroup.subtree_control"), f"+{controller}")
        # both controllers may share one v2 directory
        path = os.path.join(parent, name)
        os.makedirs(path, exist_ok=True)
        return path

    def _limit_memory(self, n: int) -> None:
        path = self.dirs["memory"]
        if os.path.exists(os.path.join(path, "memory.max")):  # v2
            _write(os.path.join(path, "memory.max"), str(n))
            if os.path.exists(os.path.join(path, "memory.swap.max")):
                _write(os.path.join(path, "memory.swap.max"), "0")
            return
        _write(os.path.join(path, "memory.limit_in_bytes"), str(n))
        try:  # without swap accounting this file is absent or refuses writes: nothing to swap into then
            _write(os.path.join(path, "memory.memsw.limit_in_bytes"), str(n))
        except OSError:
            pass

    @property
    def procs_files(self) -> list[str]:
        return sorted({os.path.join(p, "cgroup.procs") for p in self.dirs.values()})

    def oom_killed(self) -> bool:
        """Whether the memory cap killed a process of this call."""
        path = self.dirs.get("memory")
        if not path:
            return False
        for events in ("memory.events", "memory.oom_control"):  # v2, v1
            for line in _read(os.path.join(path, events)).splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and value.strip().isdigit() and int(value) > 0:
                    return True
        return False

    def kill_all(self) -> None:
        """SIGKILL whatever is still in the cgroup (a tool that ran without a pid namespace)."""
        for _ in range(50):
            pids = {int(p) for f in self.procs_files for p in _read(f).split()}
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)

    def remove(self) -> None:
        for path in sorted(set(self.dirs.values())):
            for _ in range(100):  # rmdir is refused (EBUSY) until the last killed process is gone
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)
        self.dirs = {}


def cgroup_problem(controller: str) -> str | None:
    """Why a per-call cgroup of `controller` cannot be made here (None: it can)."""
    try:
        probe = ToolCgroup(1 << 30 if controller == "memory" else None, 64 if controller == "pids" else None)
    except KeyError:
        return f"no {controller} cgroup controller is available to this process"
    except OSError as e:
        return f"cannot create a {controller} cgroup ({e})"
    probe.remove()
    return None
