"""Synthetic tool-calling arithmetic task for the tiny model: the right tool call and the final
answer are both checkable.

    python examples/tool_math.py OUT_DIR [--sft 2000] [--rl 500] [--prefs 1000] [--seed 0]

writes OUT_DIR/sft.jsonl (full conversations: question -> calculator call -> result -> answer),
OUT_DIR/rl.jsonl (prompt messages + tools + ground truth for the reward functions) and, with
--prefs N, preference pairs (prefs_train/prefs_eval.jsonl: the tool-using, faithful, plainly
stated answer is chosen) and unpaired KTO rows (kto_train/kto_eval.jsonl) for the dpo, kto and rm stages.
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


def sft_row(rng: random.Random, use_tool: bool = True) -> dict:
    """One demonstration: the calculator call, its result and the answer; with `use_tool=False`
    the demonstrator answers (correctly) from mental arithmetic, which a tiny model cannot imitate."""
    question, expression, answer = problem(rng)
    prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return {"messages": prompt + _answer_turns(expression, answer, answer, use_tool), "tools": [CALCULATOR]}


def mixed_sft_rows(rng: random.Random, count: int, tool_share: float) -> list[dict]:
    """`count` demonstrations of which about `tool_share` call the calculator and the rest answer
    from mental arithmetic: the demo's SFT data. The student imitates both, so it skips the tool
    about as often as its teacher did and then mostly guesses wrong; GRPO must learn that calling
    the tool pays (the decision RL on tool use is about), besides copying numbers more reliably."""
    return [sft_row(rng, use_tool=rng.random() < tool_share) for _ in range(count)]


def rl_row(rng: random.Random) -> dict:
    question, expression, answer = problem(rng)
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
            "tools": [CALCULATOR], "ground_truth": str(answer), "expression": expression}


def _answer_turns(expression: str, answer: int, final: int, use_tool: bool = True) -> list[dict]:
    turns = [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}]},
        {"role": "tool", "content": str(answer)}] if use_tool else []
    return turns + [{"role": "assistant", "content": f"The answer is {final}."}]


def _wrong(rng: random.Random, answer: int) -> int:
    return answer + rng.choice([-1, 1]) * rng.randint(1, 20)


HEDGES = ["I think the answer might be {a}, but I am not completely sure about it.",
          "Well, the calculator says {a}. So it could be {a}, I guess, if I did it right.",
          "Hmm, let me see. It is probably {a}? I would double check that if I were you."]


def preference_row(rng: random.Random) -> dict:
    """Same prompt; chosen calls the calculator and states its result plainly. Rejected (one kind
    each, equally often): skips the tool and guesses a wrong number; calls it and then misreports
    the result; or calls it and hedges around the right result."""
    question, expression, answer = problem(rng)
    kind = rng.randrange(3)
    if kind == 0:
        rejected = _answer_turns(expression, answer, _wrong(rng, answer), use_tool=False)
    elif kind == 1:
        rejected = _answer_turns(expression, answer, _wrong(rng, answer))
    else:
        rejected = _answer_turns(expression, answer, answer)
        rejected[-1]["content"] = rng.choice(HEDGES).format(a=answer)
    return {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
            "chosen": _answer_turns(expression, answer, answer), "rejected": rejected, "tools": [CALCULATOR]}


def kto_row(rng: random.Random) -> dict:
    """Unpaired feedback: one completion of one prompt, desirable (label true) or not."""
    row = preference_row(rng)
    good = rng.random() < 0.5
    return {"prompt": row["prompt"], "completion": row["chosen" if good else "rejected"], "label": good,
            "tools": row["tools"]}


def write(path: str, rows) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--sft", type=int, default=2000)
    p.add_argument("--sft-tool-share", type=float, default=1.0,
                   help="share of SFT demonstrations that call the calculator (the rest answer directly)")
    p.add_argument("--rl", type=int, default=500)
    p.add_argument("--prefs", type=int, default=0, help="preference pairs (prefs_*.jsonl) and KTO rows")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rng = random.Random(args.seed)
    if args.sft:
        write(os.path.join(args.out, "sft.jsonl"), mixed_sft_rows(rng, args.sft, args.sft_tool_share))
    if args.rl:
        write(os.path.join(args.out, "rl.jsonl"), (rl_row(rng) for _ in range(args.rl)))
    if args.prefs:
        write(os.path.join(args.out, "prefs_train.jsonl"), (preference_row(rng) for _ in range(args.prefs)))
        write(os.path.join(args.out, "kto_train.jsonl"), (kto_row(rng) for _ in range(args.prefs)))
        held_out = random.Random(args.seed + 1)
        write(os.path.join(args.out, "prefs_eval.jsonl"), (preference_row(held_out) for _ in range(128)))
        write(os.path.join(args.out, "kto_eval.jsonl"), (kto_row(held_out) for _ in range(128)))
    print(json.dumps({"sft": args.sft, "rl": args.rl, "prefs": args.prefs, "dir": args.out}))


if __name__ == "__main__":
    main()
