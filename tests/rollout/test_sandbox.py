"""The sandboxed Python tool stops runaway code and reports why; it never crashes the rollout."""

import socket
import threading

from megarl.rollout.tool_parser import ToolCall
from megarl.rollout.tool_spec import load_tool_specs
from megarl.rollout.tools import ToolExecutor
from megarl.rollout.tools.sandbox import run_python


def test_runs_code_in_a_temporary_directory():
    out = run_python("import os\nprint(sum(range(10)), os.getcwd())")
    assert out.startswith("45 ") and "megarl-sandbox-" in out


def test_infinite_loop_is_killed():
    assert run_python("while True:\n    pass", timeout_s=1.0) == "Error: timed out after 1s (killed)"


def test_unbounded_allocation_is_stopped():
    out = run_python("x = []\nwhile True:\n    x.append(bytearray(10**7))", memory_mb=200, timeout_s=10)
    assert out.startswith("Error: memory limit of 200 MB exceeded")


def test_network_is_unreachable():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
    out = run_python(code, timeout_s=5)
    server.close()
    assert out.startswith("Error:") and "connected" not in out.split("\n")[-1] and not accepted


def test_python_tool_through_the_executor():
    ex = ToolExecutor(load_tool_specs("configs/tools/python.yaml"))
    assert ex.execute(ToolCall("python", {"code": "print(6 * 7)"})).text == "42"
    result = ex.execute(ToolCall("python", {"code": "raise ValueError('bad')"}))
    assert result.ok and result.text.startswith("Error: exit code 1") and "ValueError: bad" in result.text
