#!/usr/bin/env python
"""HF safetensors -> megatron dist checkpoint (loadable at any TP/PP/EP).

    python tools/convert_hf_to_megatron.py HF_DIR OUT_DIR
"""
import sys

from megarl.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "hf-to-megatron", *sys.argv[1:]]))
