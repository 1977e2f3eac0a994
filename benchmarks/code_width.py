"""Where the one-shot's bits go: pruning or rounding, and what narrower codes buy at the same bits.

The default one-shot (OBS pass, sensitivity allocation) on the default model, with the code width
changed for the measurement only (`format.QMAX` and `codec.QMAX`: 15 for gqsa4's 4-bit codes), then
PyTorch perplexity on held-out text. Rows (docs/DESIGN.md, "Where the one-shot's bits go"):

    w4 / w8 on W4S50's masks      4-bit (the format) and 8-bit codes on the same allocation
    w4 / w8 dense                 every group kept: rounding alone
    w3s40, w2s25                  3.0 bits per weight spent on narrower codes and more kept groups
                                  (a kept weight costs its code plus 2 bits of the group's 32-bit
                                  header: 3-bit codes keep 60 %, 2-bit codes 75 %), each with its own
                                  sensitivity allocation measured at its code width

A script, not a test. The gqsa4 format stores 4-bit codes only: the narrower rows are emulations
(codes 0..7 or 0..3 inside the nibbles), so they say what a narrower type would score, not its size.
The end-to-end check of the 3-bit row is `convert.py` under the same setting (see DESIGN).

    python benchmarks/code_width.py [--nsamples 16] [--seqlen 512] [--eval-text FILE] [--rows w4,w8,...]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gqsa_gguf import calib, codec, model_io, oneshot, pipeline  # noqa: E402
from gqsa_gguf import format as fmt  # noqa: E402
from gqsa_gguf.config import DEFAULT_CALIB, CompressionConfig  # noqa: E402
from gqsa_gguf.evaluate import perplexity_torch  # noqa: E402

# row -> (code maximum, spec, the code maximum the spec's sensitivity allocation is measured at;
# None: the spec's uniform layout, which for w4s0 keeps every group)
ROWS = {
    "w4": (15, "w4s50", 15), "w8": (255, "w4s50", 15),
    "w4-dense": (15, "w4s0", None), "w8-dense": (255, "w4s0", None),
    "w3s40": (7, "w4s40", 7), "w2s25": (3, "w4s25", 3),
}
DEV_TEXT = "/usr/share/perl/5.36.0/pod/perldiag.pod"      # neither calibration nor the README's evaluation text


def set_code_max(qmax: int) -> None:
    fmt.QMAX = codec.QMAX = qmax


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-text", default=DEV_TEXT)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown row(s) {unknown}; known: {', '.join(ROWS)}")
    torch.set_num_threads(args.threads)

    info = model_io.inspect_checkpoint(model_io.default_model_dir())
    tok = model_io.load_tokenizer(info)
    windows = calib.calibration_windows(calib.tokenize(tok, calib.load_text(DEFAULT_CALIB)[0]),
                                        args.nsamples, args.seqlen, seed=0)
    ev = calib.eval_windows(calib.tokenize(tok, calib.load_text(args.eval_text)[0]), args.seqlen, args.eval_windows)
    model = model_io.load_model(info)
    for p in model.parameters():
        p.requires_grad_(False)

    def ppl(m) -> float:
        return perplexity_torch(m, ev, batch_size=4, progress=False).ppl

    results = {"float": ppl(model)}
    print(f"float: {results['float']:.2f}", flush=True)
    allocations: dict[tuple[int, str], dict[str, int]] = {}
    code_max = fmt.QMAX
    try:
        for row in rows:
            qmax, spec, alloc_qmax = ROWS[row]
            cfg = CompressionConfig.from_spec(spec)
            t0 = time.time()
            if alloc_qmax is not None and (alloc_qmax, spec) not in allocations:
                set_code_max(alloc_qmax)
                allocations[(alloc_qmax, spec)] = pipeline.choose_allocation(model, info, windows, cfg, progress=False)
            keep = None if alloc_qmax is None else allocations[(alloc_qmax, spec)]
            set_code_max(qmax)
            m = copy.deepcopy(model)
            oneshot.compress_model(m, info, windows, cfg, keep=keep, progress=False)
            results[row] = ppl(m)
            del m
            print(f"{row}: {results[row]:.2f} ({time.time() - t0:.0f} s)", flush=True)
    finally:
        set_code_max(code_max)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
