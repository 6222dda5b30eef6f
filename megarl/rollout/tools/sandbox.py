"""A Python code runner for tool calls, in a separate process with limits.

- a temporary working directory, deleted afterwards
- wall-clock timeout: the whole process group is killed
- memory (RLIMIT_AS), CPU time, file size and open-file limits
- no network: an empty network namespace (`unshare -n`, where the kernel allows it); where it does
  not, the socket module is disabled inside the child (best effort) and the result says so
- output capped (the cut is stated in the result, never silent)
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile

OUTPUT_CHARS = 4000
_NETNS: bool | None = None

PRELUDE = """
import socket as _s
def _no_network(*a, **k):
    raise PermissionError("network access is disabled in the sandbox")
_s.socket = _no_network
_s.create_connection = _no_network
del _s
"""


def _network_namespace_available() -> bool:
    global _NETNS
    if _NETNS is None:
        unshare = shutil.which("unshare")
        _NETNS = bool(unshare) and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0
    return _NETNS


def _limits(memory_mb: int, cpu_s: int):
    def apply():
        os.setsid()
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    return apply


def _cap(text: str) -> str:
    if len(text) <= OUTPUT_CHARS:
        return text
    return text[:OUTPUT_CHARS] + f"\n[output cut: {len(text)} characters, limit {OUTPUT_CHARS}]"


def run_python(code: str, timeout_s: float = 5.0, memory_mb: int = 512) -> str:
    """Run `code` with the limits above; returns what the model sees (stdout, stderr, or why it stopped)."""
    with tempfile.TemporaryDirectory(prefix="megarl-sandbox-") as work:
        script = os.path.join(work, "main.py")
        isolated_net = _network_namespace_available()
        with open(script, "w") as f:
            f.write(("" if isolated_net else PRELUDE) + "\n" + code)
        cmd = [sys.executable, "-I", "-S", script]
        if isolated_net:
            cmd = [shutil.which("unshare"), "-n"] + cmd
        proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={"PATH": "/usr/bin:/bin", "HOME": work, "PYTHONHASHSEED": "0"},
                                preexec_fn=_limits(memory_mb, int(timeout_s) + 1))
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return f"Error: timed out after {timeout_s:g}s (killed)"
    if proc.returncode != 0:
        if "MemoryError" in err or proc.returncode == -signal.SIGKILL:
            return f"Error: memory limit of {memory_mb} MB exceeded\n{_cap(err.strip())}"
        if proc.returncode == -signal.SIGXCPU:
            return "Error: CPU time limit exceeded (killed)"
        return f"Error: exit code {proc.returncode}\n{_cap((out + err).strip())}"
    note = "" if isolated_net else "\n[note: no network namespace here; sockets disabled in-process]"
    return _cap(out.strip() or "(no output)") + note
