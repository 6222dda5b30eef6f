"""Built-in tools."""

from __future__ import annotations

import ast
import operator
import re

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
        ast.USub: operator.neg, ast.UAdd: operator.pos}
MAX_EXPONENT = 64
MAX_MAGNITUDE = 10**18
# Everything an arithmetic expression can contain. Checked before parsing: Python's tokenizer warns
# (SyntaxWarning "invalid decimal literal", straight to stderr) on a number followed by a keyword
# such as "1if" or "3in", and no keyword can be spelled with these characters.
_ARITHMETIC_CHARS = re.compile(r"[0-9eE_.+\-*/%() \t\n]*")


def calculator(expression: str) -> str:
    """Evaluate + - * / // % ** and parentheses on numbers; anything else is refused (no names, calls
    or attributes: this is not Python eval)."""

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
                raise ValueError(f"exponent {right} is too large")
            value = _OPS[type(node.op)](left, right)
            if abs(value) > MAX_MAGNITUDE:
                raise ValueError("result is too large")
            return value
        raise ValueError(f"unsupported expression element: {type(node).__name__}")

    bad = re.sub(_ARITHMETIC_CHARS, "", expression)
    if bad:
        raise ValueError(f"unsupported characters {''.join(sorted(set(bad)))!r}: only numbers, + - * / // % ** "
                         "and parentheses are allowed")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {e.msg}") from None
    value = ev(tree)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)
