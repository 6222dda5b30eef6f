"""The calculator tool: malformed expressions are ordinary tool errors, with nothing on stderr."""

import os
import subprocess
import sys
import warnings

import pytest

from megarl.rollout.tools.builtin import calculator

# "1if" / "3in" / "1or": a number followed by a keyword made Python's tokenizer print
# "SyntaxWarning: invalid decimal literal"; "2abc" / "1_000x" are the same mistake without a keyword
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MALFORMED = ("2abc", "1_000x", "1if 2 else 3", "3in 4", "1or 2", "2e", "0x1g")


def test_malformed_numbers_are_value_errors_without_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for expression in MALFORMED:
            with pytest.raises(ValueError):
                calculator(expression)
    assert [str(w.message) for w in caught] == []
    assert calculator("1_000 * 2") == "2000" and calculator("1e3 / 4") == "250"


def test_tool_errors_reach_the_model_and_nothing_reaches_stderr():
    code = ("from megarl.rollout.tool_parser import ToolCall\n"
            "from megarl.rollout.tool_spec import load_tool_specs\n"
            "from megarl.rollout.tools import ToolExecutor\n"
            "ex = ToolExecutor(load_tool_specs('configs/tools/calculator.yaml'))\n"
            f"for e in {MALFORMED!r}:\n"
            "    r = ex.execute(ToolCall('calculator', {'expression': e}))\n"
            "    print(r.ok, r.error, r.text)\n"
            "ex.close()\n")
    # -W default: every warning would be printed (a test runner may hide them in-process)
    out = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == len(MALFORMED)
    assert all(line.startswith("False tool_error Error: ValueError: ") for line in lines), lines
