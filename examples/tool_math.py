"""Synthetic tool-calling arithmetic task for the tiny model: the right tool call and the final
answer are both checkable.

    python examples/tool_math.py OUT_DIR [--sft 2000] [--rl 500] [--seed 0]

writes OUT_DIR/sft.jsonl (full conversations: question -> calculator call -> result -> answer) and
OUT_DIR/rl.jsonl (prompt messages + tools + ground truth for the reward functions).
"""

from __future__ import annotations

import argparse
import json
import os
import random

SYSTEM = "You are a careful assistant. Use the calculator tool for arithmetic."
CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                   "required": ["expression"]}}}
TEMPLATES = ["What is {e}?", "Compute {e}.", "Please calculate {e}.", "{e} = ?"]


def problem(rng: random.Random) -> tuple[str, str, int]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice(["+", "-", "*"])
    expression = f"{a} {op} {b}"
    return rng.choice(TEMPLATES).format(e=expression), expression, eval(expression)


def sft_row(rng: random.Random) -> dict:
    question, expression, answer = problem(rng)
    return {"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": question},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}]},
        {"role": "tool", "content": str(answer)},
        {"role": "assistant", "content": f"The answer is {answer}."},
    ], "tools": [CALCULATOR]}


def rl_row(rng: random.Random) -> dict:
    question, expression, answer = problem(rng)
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
            "tools": [CALCULATOR], "ground_truth": str(answer), "expression": expression}


def write(path: str, rows) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--sft", type=int, default=2000)
    p.add_argument("--rl", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rng = random.Random(args.seed)
    write(os.path.join(args.out, "sft.jsonl"), (sft_row(rng) for _ in range(args.sft)))
    write(os.path.join(args.out, "rl.jsonl"), (rl_row(rng) for _ in range(args.rl)))
    print(json.dumps({"sft": args.sft, "rl": args.rl, "dir": args.out}))


if __name__ == "__main__":
    main()
