#!/usr/bin/env python
"""Megatron dist checkpoint (written by convert_hf_to_megatron or training) -> HF safetensors.

    python tools/convert_megatron_to_hf.py CKPT_DIR OUT_DIR
"""
import sys

from megarl.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "megatron-to-hf", *sys.argv[1:]]))
