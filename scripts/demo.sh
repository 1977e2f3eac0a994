#!/usr/bin/env bash
# Set up, compress SmolLM2 with GQSA (4-bit, 50 % group sparsity) into a GGUF file, and chat with
# it through the patched llama.cpp. An existing smollm2-w4s50.gguf is reused: delete it to
# convert again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
VENV=${GQSA_VENV:-.venv}
OUT=smollm2-w4s50.gguf

if [ -f "$OUT" ]; then
    echo "==> $OUT exists, not converting again (delete it to reconvert)"
else
    # the converter's defaults: one-shot GQSA, then E2E-OQP (one epoch over 384 x 512 calibration
    # tokens, distilled from the float model), about 25-75 min on 2 cores; checkpoints let an
    # interrupted demo continue
    echo "==> converting SmolLM2 to $OUT (GQSA w4s50; about 25-75 min on 2 cores, rerun to resume if interrupted)"
    "$VENV/bin/python" convert.py --gqsa w4s50 -o "$OUT" --checkpoint-dir "$OUT.checkpoints" --resume
    rm -rf "$OUT.checkpoints"
fi
echo "==> chatting with $OUT"
"$VENV/bin/gqsa-gguf" chat "$OUT" --prompt "${PROMPT:-Explain in two sentences why the sky is blue.}"
