"""The sandboxed Python tool: runaway code is stopped and says why, and each escape a hostile
program tried in review (issue 18) is closed: it runs unprivileged, cannot write outside its /tmp,
cannot read the project or /etc, cannot see or signal other processes, leaves nothing running,
cannot exceed the total memory or the process cap, cannot flood the caller with output, and has no
network. Where a layer is missing the sandbox refuses to start unless told, and then says so."""

import os
import socket
import subprocess
import threading
import time
import tracemalloc
from textwrap import dedent

import pytest

from megarl.rollout.tool_parser import ToolCall
from megarl.rollout.tool_spec import ToolSpec, ToolSpecError, load_tool_specs
from megarl.rollout.tools import ToolExecutor
from megarl.rollout.tools import sandbox as sandbox_mod
from megarl.rollout.tools.sandbox import LAYERS, PythonSandbox, SandboxUnavailable, missing_layers
from tests.conftest import processes_with

pytestmark = pytest.mark.skipif(bool(missing_layers()), reason=f"sandbox layers missing here: {missing_layers()}")
PROJECT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def box():
    return PythonSandbox(timeout_s=5, memory_mb=256, max_processes=16)


def test_runs_code_with_every_layer(box):
    assert box.layers == list(LAYERS)
    out = box("import os\nprint(sum(range(10)), os.getcwd(), os.getuid() != 0, os.getpid())")
    assert out == "45 /tmp True 2"  # pid 2: the sandbox's init is pid 1 of its own namespace


def test_infinite_loop_is_killed(box):
    assert box("while True:\n    pass") == "Error: timed out after 5s (killed)"


def test_unbounded_allocation_is_stopped(box):
    out = box("x = []\nwhile True:\n    x.append(bytearray(10**7))")
    assert out.startswith("Error: memory limit of 256 MB exceeded")


def test_network_is_unreachable(box):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    out = box(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')")
    server.close()
    assert out.startswith("Error:") and "Network is unreachable" in out and not accepted


def test_cannot_write_outside_its_tmp(box, tmp_path):
    target = tmp_path / "escaped.txt"
    code = dedent(f"""
        for p in [{str(target)!r}, '/escaped.txt', '/usr/escaped.txt']:
            try:
                open(p, 'w').write('x'); print('wrote', p)
            except OSError as e:
                print('refused', p, e.errno)
        open('/tmp/ok.txt', 'w').write('y'); print(open('/tmp/ok.txt').read())""")
    out = box(code)
    assert "wrote" not in out and out.count("refused") == 3 and out.endswith("y")
    assert not target.exists() and not os.path.exists("/escaped.txt")


def test_cannot_read_the_project_etc_or_root(box):
    paths = [os.path.join(PROJECT, "README.md"), "/etc/passwd", "/etc/hostname", "/root/.bashrc"]
    code = dedent(f"""
        import os
        for p in {paths!r}:
            try:
                open(p).read(); print('read', p)
            except OSError:
                pass
        print(sorted(os.listdir('/')))""")
    out = box(code)
    assert "read " not in out
    assert "etc" not in out and "work" not in out and "home" not in out


def test_cannot_see_or_signal_other_processes(box):
    victim = subprocess.Popen(["sleep", "30"])
    try:
        code = (f"import os, signal\ntry:\n    os.kill({victim.pid}, signal.SIGKILL); print('killed')\n"
                "except ProcessLookupError:\n    print('no such process')\n"
                "print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))")
        out = box(code)
        assert out.split("\n")[0] == "no such process" and out.split("\n")[1] == "[1, 2]"
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_nothing_outlives_the_call(box):
    marker = "31.41592"
    code = dedent(f"""
        import os, subprocess
        subprocess.Popen(['sleep', '{marker}'])
        if os.fork() == 0:  # double fork into a new session: the classic daemon escape
            os.setsid()
            if os.fork() == 0:
                os.execvp('sleep', ['sleep', '{marker}'])
            os._exit(0)
        print('started')""")
    assert box(code) == "started"
    time.sleep(0.2)
    assert processes_with(marker) == []


def test_total_memory_is_capped_across_processes(box):
    # four processes of 100 MB each stay under the 256 MB per-process address-space limit, but not
    # under the 256 MB total
    code = ("import subprocess, sys\nchild = 'x = bytearray(100 * 2**20); import time; time.sleep(3)'\n"
            "procs = [subprocess.Popen([sys.executable, '-c', child]) for _ in range(4)]\n"
            "print([p.wait() for p in procs])")
    out = box(code)
    assert out.startswith("Error: memory limit of 256 MB exceeded")


def test_process_count_is_capped(box):
    code = dedent("""
        import subprocess
        procs = []
        try:
            for _ in range(100):
                procs.append(subprocess.Popen(['sleep', '5']))
        except OSError as e:
            print('refused', e.errno)
        print(len(procs))""")
    lines = box(code).split("\n")
    assert lines[0] == "refused 11" and int(lines[1]) < 16  # EAGAIN at the cap


def test_output_flood_is_stopped_without_holding_it(box):
    tracemalloc.start()
    t0 = time.monotonic()
    out = box("import sys\nblock = 'x' * 2**20\nwhile True:\n    sys.stdout.write(block)")
    elapsed = time.monotonic() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert out.startswith("Error: output limit of 65536 bytes exceeded (stopped)")
    assert elapsed < 4 and peak < 4 << 20


def test_missing_layer_is_refused_unless_allowed(monkeypatch):
    monkeypatch.setattr(sandbox_mod, "missing_layers", lambda: {"network": "no network namespaces (test)"})
    with pytest.raises(SandboxUnavailable, match=r"network layer unavailable.*allow_missing_layers: \['network'\]"):
        PythonSandbox()
    weaker = PythonSandbox(allow_missing_layers=["network"])
    assert "network" not in weaker.layers
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    out = weaker(f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {server.getsockname()[1]}))\n"
                 "print('connected')")
    server.close()
    # the result tells the truth: no network isolation here
    assert out == "connected\n[sandbox: no network isolation on this machine (allowed by the tool's options)]"


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="memory_mb: expected a positive number"):
        PythonSandbox(memory_mb=0)
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \['netwrok'\]"):
        PythonSandbox(allow_missing_layers=["netwrok"])


def test_python_tool_through_the_executor():
    ex = ToolExecutor(load_tool_specs("configs/tools/python.yaml"))
    assert ex.execute(ToolCall("python", {"code": "print(6 * 7)"})).text == "42"
    result = ex.execute(ToolCall("python", {"code": "raise ValueError('bad')"}))
    assert result.ok and result.text.startswith("Error: exit code 1") and "ValueError: bad" in result.text


def test_tool_options_are_checked_at_load(tmp_path):
    spec = ToolSpec("python", "run", {"type": "object", "properties": {"code": {"type": "string"}}},
                    "megarl.rollout.tools.sandbox:PythonSandbox", 5.0, {"memroy_mb": 100})
    with pytest.raises(ValueError, match=r"tool 'python': options \['memroy_mb'\] do not fit"):
        ToolExecutor([spec])
    bad = tmp_path / "tools.yaml"
    bad.write_text("tools:\n  - name: python\n    description: d\n    callable: m:f\n"
                   "    parameters: {type: object, properties: {code: {type: string}}}\n    options: {code: x}\n")
    with pytest.raises(ToolSpecError, match=r"tools\[0\]\.options: \['code'\] are also model-visible"):
        load_tool_specs(str(bad))
