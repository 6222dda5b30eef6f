"""Benchmark: `megarl data check` on a 100k-row generated tool-calling SFT dataset, with the
tokenizer (so lengths are checked exactly). Goal: under 30 s on the 2-core CPU machine.

    python bench/data_check.py [--rows 100000]

Last stdout line: {"rows": N, "seconds": S, ...}
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    from examples.tool_math import sft_row, write
    from megarl.data.checks import CheckContext, check_dataset
    from megarl.models.tiny_hf import make_tiny_model

    work = tempfile.mkdtemp(prefix="megarl-bench-data-")
    make_tiny_model(os.path.join(work, "tok"), arch="qwen2")
    rng = random.Random(0)
    rows = [sft_row(rng) for _ in range(args.rows)]
    for i in range(0, args.rows, 1000):  # 0.1 % bad rows, so the report has something to say
        rows[i]["messages"][3] = {"role": "user", "content": "oops"}
    path = os.path.join(work, "sft.jsonl")
    write(path, rows)
    from transformers import AutoTokenizer

    ctx = CheckContext(tokenizer=AutoTokenizer.from_pretrained(os.path.join(work, "tok")), max_length=1024,
                       tools={"calculator"})
    t0 = time.perf_counter()
    report = check_dataset(path, "sft", ctx)
    seconds = time.perf_counter() - t0
    print(report.render(max_rows=3))
    print(json.dumps({"rows": report.total, "seconds": round(seconds, 2), "rejected": report.rejected,
                      "rows_per_s": round(report.total / seconds)}))


if __name__ == "__main__":
    main()
