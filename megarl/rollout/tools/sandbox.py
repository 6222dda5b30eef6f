"""A Python code runner for tool calls: model-written code runs inside layers that each stop one
kind of escape, and the sandbox refuses to run when a layer is missing unless the tool's options
allow running without it (`allow_missing_layers`); a result produced without a layer says so.

    user       an unprivileged uid that owns nothing (root callers), or a user namespace
    mount      a private root: system and Python prefix read-only, a size-capped /tmp the only
               writable place; the project, /etc, /root and /home are not there
    pid        its own pid namespace: it cannot see or signal other processes, and nothing it
               starts (Popen, double fork) outlives the call
    network    an empty network namespace
    memory     a cgroup cap on the total memory of everything it starts
    processes  a cgroup cap on how many processes it can have
Always: a wall-clock timeout, CPU time, address space, file size and open-file rlimits, and output
read as a stream and capped (the program is stopped when it prints more; the driver never holds
more than the cap).

Declared in a tools YAML (`options` are the constructor's arguments, not visible to the model):

    callable: megarl.rollout.tools.sandbox:PythonSandbox
    options: {memory_mb: 512, max_processes: 32}
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from megarl.rollout.tools.cgroup import ToolCgroup, cgroup_problem

LAYERS = ("user", "mount", "pid", "network", "memory", "processes")
OUTPUT_CHARS = 4000          # what the model sees of the output
INIT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_init.py")
EXIT_SETUP_FAILED = 121      # sandbox_init.EXIT_SETUP_FAILED
UID_BASE = 1_500_000_000     # unnamed uids: they own no file and no process on the host
_uids = itertools.count()


class SandboxUnavailable(RuntimeError):
    """A layer the tool needs cannot be set up on this machine."""


def _python() -> str:
    """The base interpreter: a virtual environment's python is a link into the project directory,
    which the sandbox does not mount."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _readonly_paths() -> list[str]:
    prefixes = {sys.base_prefix, os.path.realpath(sys.base_prefix)}
    return ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", *sorted(prefixes)]


def _namespace_works(flags: list[str]) -> bool:
    unshare = shutil.which("unshare")
    if not unshare:
        return False
    return subprocess.run([unshare, *flags, "true"], capture_output=True).returncode == 0


def _userns_flags() -> list[str]:
    """`unshare` flags for the user namespace a non-root process needs before any other (none as root)."""
    return [] if os.geteuid() == 0 else ["--user", "--map-root-user"]


@functools.lru_cache(maxsize=1)
def missing_layers() -> dict[str, str]:
    """layer -> why it cannot be had on this machine (cached: the machine does not change)."""
    userns = _userns_flags()
    missing = {}
    if userns and not _namespace_works(userns):
        missing["user"] = "not root, and user namespaces are not allowed"
    for layer, flags in (("mount", ["--mount"]), ("pid", ["--pid", "--fork"]), ("network", ["--net"])):
        if not _namespace_works(userns + flags):
            missing[layer] = f"cannot create a {layer} namespace (unshare {' '.join(userns + flags)} failed)"
    for layer, controller in (("memory", "memory"), ("processes", "pids")):
        problem = cgroup_problem(controller)
        if problem:
            missing[layer] = problem
    return missing


class PythonSandbox:
    """The `python` tool: `sandbox(code)` runs `code` and returns what the model sees (its output,
    or why it stopped). Construction checks the layers once and runs a smoke program, so a machine
    that cannot sandbox fails at setup, not on every tool call."""

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 512, max_processes: int = 32,
                 output_bytes: int = 65536, tmp_mb: int = 64, allow_missing_layers: list[str] = ()):
        for name, value in (("timeout_s", timeout_s), ("memory_mb", memory_mb), ("max_processes", max_processes),
                            ("output_bytes", output_bytes), ("tmp_mb", tmp_mb)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"python sandbox option {name}: expected a positive number, got {value!r}")
        unknown = sorted(set(allow_missing_layers) - set(LAYERS))
        if unknown:
            raise ValueError(f"python sandbox option allow_missing_layers: unknown layer(s) {unknown}; "
                             f"layers are {', '.join(LAYERS)}")
        self.timeout_s, self.memory_mb, self.max_processes = float(timeout_s), int(memory_mb), int(max_processes)
        self.output_bytes, self.tmp_mb = int(output_bytes), int(tmp_mb)
        missing = missing_layers()
        refused = {k: v for k, v in missing.items() if k not in allow_missing_layers}
        if refused:
            raise SandboxUnavailable(
                "python tool sandbox: " + "; ".join(f"{k} layer unavailable: {v}" for k, v in refused.items())
                + f". Run as root on Linux, or accept the weaker sandbox with options: "
                f"{{allow_missing_layers: {sorted(refused)}}} in the tool's YAML")
        self.layers = [layer for layer in LAYERS if layer not in missing]
        smoke = self("print('ok')")
        if smoke.split("\n")[0] != "ok":
            raise SandboxUnavailable(f"python tool sandbox: a trivial program failed: {smoke}")

    def __call__(self, code: str) -> str:
        with tempfile.TemporaryDirectory(prefix="megarl-sandbox-") as host_dir:
            script = os.path.join(host_dir, "main.py")
            with open(script, "w") as f:
                f.write(code)
            cgroup = ToolCgroup(self.memory_mb << 20 if "memory" in self.layers else None,
                                self.max_processes if "processes" in self.layers else None)
            try:
                return self._run(host_dir, script, cgroup)
            finally:
                cgroup.kill_all()
                cgroup.remove()

    def _config(self, host_dir: str, script: str, cgroup: ToolCgroup, report_fd: int) -> dict:
        # as root the program runs as an unnamed uid of its own; otherwise as this user (mapped to root
        # inside its user namespace)
        uid = UID_BASE + (os.getpid() % 100_000) * 1000 + next(_uids) % 1000 if not _userns_flags() else None
        workdir = "/tmp" if "mount" in self.layers else os.path.join(host_dir, "work")
        if workdir != "/tmp":  # no private root: the program works in a host directory it owns
            os.makedirs(workdir)
            os.chmod(host_dir, 0o755)
            os.chmod(script, 0o644)
            shutil.copy(script, os.path.join(workdir, "main.py"))
            if uid is not None:
                os.chown(workdir, uid, uid)
        rlimits = {"RLIMIT_AS": self.memory_mb << 20, "RLIMIT_CPU": int(self.timeout_s) + 1,
                   "RLIMIT_FSIZE": min(self.tmp_mb, 16) << 20, "RLIMIT_NOFILE": 64, "RLIMIT_CORE": 0}
        if uid is not None:  # counted per uid, and this uid is this call's alone
            rlimits["RLIMIT_NPROC"] = self.max_processes
        return {"layers": self.layers, "root": os.path.join(host_dir, "root"), "script": script,
                "readonly": _readonly_paths(), "tmp_mb": self.tmp_mb, "python": _python(), "uid": uid,
                "workdir": workdir, "rlimits": rlimits, "report_fd": report_fd,
                "cgroup_procs": cgroup.procs_files}

    def _command(self, cfg: dict) -> list[str]:
        flags = _userns_flags()
        flags += ["--mount"] if "mount" in self.layers else []
        flags += ["--pid", "--fork", "--kill-child"] if "pid" in self.layers else []
        flags += ["--net"] if "network" in self.layers else []
        init = [_python(), "-I", "-S", INIT, json.dumps(cfg)]
        return [shutil.which("unshare"), *flags, *init] if flags else init

    def _run(self, host_dir: str, script: str, cgroup: ToolCgroup) -> str:
        report_r, report_w = os.pipe()
        cfg = self._config(host_dir, script, cgroup, report_w)
        proc = subprocess.Popen(self._command(cfg), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, pass_fds=(report_w,), start_new_session=True,
                                env={"PATH": "/usr/bin:/bin"})
        os.close(report_w)
        try:
            out, err, stopped = _collect(proc, self.timeout_s, self.output_bytes)
        finally:
            _kill(proc)
            cgroup.kill_all()
            with os.fdopen(report_r) as f:
                report = f.read()
        return self._describe(proc.returncode, out, err, stopped, report, cgroup)

    def _describe(self, code: int, out: str, err: str, stopped: str | None, report: str,
                  cgroup: ToolCgroup) -> str:
        if stopped == "timeout":
            return f"Error: timed out after {self.timeout_s:g}s (killed)"
        if stopped == "output":
            return f"Error: output limit of {self.output_bytes} bytes exceeded (stopped)\n{_cap((out + err).strip())}"
        setup = json.loads(report.splitlines()[0]) if report.strip() else {}
        if "error" in setup or code == EXIT_SETUP_FAILED and not setup:
            raise RuntimeError(f"python tool sandbox could not start: {setup.get('error') or err.strip()}")
        signum = -code if code < 0 else code - 128 if code > 128 else 0
        if cgroup.oom_killed() or "MemoryError" in err:
            return f"Error: memory limit of {self.memory_mb} MB exceeded\n{_cap(err.strip())}".rstrip()
        if signum == signal.SIGXCPU:
            return "Error: CPU time limit exceeded (killed)"
        if code != 0:
            return f"Error: exit code {code}\n{_cap((out + err).strip())}"
        return _cap(out.strip() or "(no output)") + self._weaker_note()

    def _weaker_note(self) -> str:
        missing = [layer for layer in LAYERS if layer not in self.layers]
        if not missing:
            return ""
        return f"\n[sandbox: no {', '.join(missing)} isolation on this machine (allowed by the tool's options)]"


def _collect(proc: subprocess.Popen, timeout_s: float, cap: int) -> tuple[str, str, str | None]:
    """stdout, stderr and why reading stopped early ("timeout", "output" or None), reading both
    pipes as they fill so that at most `cap` bytes are ever held."""
    deadline = time.monotonic() + timeout_s
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        sel.register(fd, selectors.EVENT_READ)
    stopped, total = None, 0
    while sel.get_map():
        left = deadline - time.monotonic()
        if left <= 0:
            stopped = "timeout"
            break
        ready = sel.select(min(left, 0.1))
        if not ready and proc.poll() is not None:
            break  # exited and nothing more to read (a pipe may be held open by a stray process)
        for key, _ in ready:
            chunk = os.read(key.fd, 65536)
            if not chunk:
                sel.unregister(key.fd)
                continue
            bufs[key.fd] += chunk[:max(0, cap - total)]
            total += len(chunk)
        if total > cap:
            stopped = "output"
            break
    sel.close()
    if stopped is None:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stopped = "timeout"
    out, err = (bytes(b).decode("utf-8", "replace") for b in bufs.values())
    return out, err, stopped


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()


def _cap(text: str) -> str:
    if len(text) <= OUTPUT_CHARS:
        return text
    return text[:OUTPUT_CHARS] + f"\n[output cut: {len(text)} characters, limit {OUTPUT_CHARS}]"
