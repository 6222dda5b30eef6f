#!/usr/bin/env python
"""Tiny random-init HF model + locally trained tool-calling tokenizer (no model hub needed).

    python tools/make_tiny_model.py OUT_DIR [--arch qwen2|llama|mistral|qwen3|qwen3_moe|mixtral] [--seed N]
"""
import sys

from megarl.cli import main

if __name__ == "__main__":
    sys.exit(main(["make-tiny", *sys.argv[1:]]))
