#!/usr/bin/env python3
"""Compress a Hugging Face LLM with GQSA into a GGUF: `python convert.py MODEL --gqsa w4s50 -o model.gguf`.

A thin wrapper: the same as `gqsa-gguf convert ...` (see gqsa_gguf/cli.py; `--help` lists the options).
"""

import sys

from gqsa_gguf.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
