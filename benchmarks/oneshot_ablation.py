"""What each part of the one-shot pass contributes: an ablation on SmolLM2-135M (a script, not a test).

    python benchmarks/oneshot_ablation.py [--nsamples 32] [--seqlen 512] [--rows NAME,...]

Every row is a one-shot GQSA model (no BQPO / E2E-OQP) of the embedded default model, built with
`oneshot.compress_model` exactly as `convert.py --bqpo-epochs 0 --e2e-epochs 0` builds it, with one
setting changed at a time:

    method       rtn = the paper's saliency mask + round-to-nearest; obs = joint pruning and
                 quantization with Optimal-Brain-Surgeon error compensation (SparseGPT/GPTQ)
    allocation   uniform = every tensor at the spec's sparsity (the paper's layout);
                 sensitivity = keep fraction per tensor from its measured error (allocation.py)
    calibration  debian:janeaustenr (prose only, the old default) or debian:calib-mix (prose, code
                 and technical text, the new default)

Perplexity: PyTorch, float32, on consecutive 512-token windows of debian:debian-handbook, which no
calibration text contains. Writes docs/quality-ablation.json and docs/quality-ablation.md;
results are cached in WORKDIR/ablation.json, so a rerun only computes missing rows.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gqsa_gguf import allocation, calib, model_io, oneshot  # noqa: E402
from gqsa_gguf.config import DEFAULT_EVAL_TEXT, CompressionConfig  # noqa: E402
from gqsa_gguf.evaluate import perplexity_torch  # noqa: E402

AUSTEN, MIX = "debian:janeaustenr", "debian:calib-mix"
# name: (spec, method, allocation, calibration, what it is)
ROWS = {
    "rtn-uniform-mix": ("w4s50", "rtn", "uniform", MIX, "the paper's one-shot: saliency mask, round-to-nearest, uniform"),
    "obs-uniform-mix": ("w4s50", "obs", "uniform", MIX, "error-compensated (OBS), uniform"),
    "obs-sensitivity-mix": ("w4s50", "obs", "sensitivity", MIX, "error-compensated, allocated (the converter's defaults)"),
    "rtn-uniform-austen": ("w4s50", "rtn", "uniform", AUSTEN, "the paper's one-shot on Austen alone (the old defaults)"),
    "obs-uniform-austen": ("w4s50", "obs", "uniform", AUSTEN, "error-compensated, uniform, Austen alone"),
    "obs-sensitivity-austen": ("w4s50", "obs", "sensitivity", AUSTEN, "error-compensated, allocated, Austen alone"),
    "w4s25-obs-sensitivity-mix": ("w4s25", "obs", "sensitivity", MIX, "the defaults at 4.5 bits/weight"),
    "w4s75-obs-sensitivity-mix": ("w4s75", "obs", "sensitivity", MIX, "the defaults at 1.5 bits/weight"),
}
# what one method contributes: (method, row without it, row with it)
CONTRIBUTIONS = (
    ("error compensation (OBS updates, adaptive group mask, clip search)", "rtn-uniform-mix", "obs-uniform-mix"),
    ("error compensation, on Austen alone", "rtn-uniform-austen", "obs-uniform-austen"),
    ("the bit budget spread by sensitivity", "obs-uniform-mix", "obs-sensitivity-mix"),
    ("the bit budget spread by sensitivity, on Austen alone", "obs-uniform-austen", "obs-sensitivity-austen"),
    ("the calibration mix instead of Austen alone (paper's one-shot)", "rtn-uniform-austen", "rtn-uniform-mix"),
    ("the calibration mix instead of Austen alone (new one-shot)", "obs-sensitivity-austen", "obs-sensitivity-mix"),
)
DEFAULT_ROWS = "rtn-uniform-mix,obs-uniform-mix,obs-sensitivity-mix"


def run_row(name, float_model, info, ev, args, texts) -> dict:
    spec, method, alloc, source, _ = ROWS[name]
    tok_ids = texts[source]
    windows = calib.calibration_windows(tok_ids, args.nsamples, args.seqlen, seed=0)
    cfg = CompressionConfig.from_spec(spec, method=method, allocation=alloc)
    m = copy.deepcopy(float_model)
    t0 = time.time()
    keep = None
    if alloc == "sensitivity":
        curves = oneshot.sensitivity_curves(m, info, windows, cfg, progress=False)
        keep = allocation.allocate(curves, cfg.sparsity)
    res = oneshot.compress_model(m, info, windows, cfg, progress=False, keep=keep)
    secs = time.time() - t0
    shapes = {n: (cl.rows, cl.width) for n, cl in res.linears.items()}
    kept = {n: cl.n_kept for n, cl in res.linears.items()}
    fractions = [cl.n_kept / (cl.width // 16) for cl in res.linears.values()]
    return dict(spec=spec, method=method, allocation=alloc, calibration=source,
                ppl=perplexity_torch(m, ev, batch_size=1, progress=False).ppl, seconds=secs,
                bpw=allocation.mean_bits(shapes, kept), keep_min=min(fractions), keep_max=max(fractions),
                nsamples=args.nsamples, seqlen=args.seqlen, eval_windows=int(ev.shape[0]))


def write_report(results: dict, float_ppl: float, args) -> None:
    (ROOT / "docs" / "quality-ablation.json").write_text(json.dumps(dict(float=float_ppl, rows=results), indent=2))
    lines = ["# One-shot ablation: what each part contributes (SmolLM2-135M-Instruct)", "",
             f"Generated by `python benchmarks/oneshot_ablation.py --nsamples {args.nsamples} --seqlen {args.seqlen} "
             f"--rows {args.rows}` on {platform.machine()} ({torch.get_num_threads()} threads), torch "
             f"{torch.__version__}. One-shot only (no BQPO / E2E-OQP), {args.nsamples} calibration windows of "
             f"{args.seqlen} tokens; perplexity in PyTorch on {results[next(iter(results))]['eval_windows']} "
             f"consecutive 512-token windows of `{DEFAULT_EVAL_TEXT}` (no calibration text contains it). "
             f"Float model: {float_ppl:.2f}. Bits per weight: decoder linears, all metadata included.", "",
             "| row | spec | one-shot | allocation | calibration | bits/weight | kept share per tensor | perplexity | × float | seconds |",
             "|---|---|---|---|---|---:|---|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {ROWS[name][4]} | {r['spec']} | {r['method']} | {r['allocation']} | `{r['calibration']}` | "
                     f"{r['bpw']:.3f} | {r['keep_min']:.0%}–{r['keep_max']:.0%} | {r['ppl']:.1f} | "
                     f"{r['ppl'] / float_ppl:.1f} | {r['seconds']:.0f} |")
    # what each method contributed: the row with it against the row without it
    steps = [f"- {what}: perplexity {results[a]['ppl']:.1f} -> {results[b]['ppl']:.1f} "
             f"({results[a]['ppl'] / results[b]['ppl']:.2f}x lower)"
             for what, a, b in CONTRIBUTIONS if a in results and b in results]
    if steps:
        lines += ["", "What each method contributed (the row with it against the row without it):", "", *steps]
    (ROOT / "docs" / "quality-ablation.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--rows", default=DEFAULT_ROWS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/gqsa-ablation")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [r for r in args.rows.split(",") if r]
    unknown = [r for r in names if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "ablation.json"
    done = json.loads(cache.read_text()) if cache.exists() else {}

    info = model_io.inspect_checkpoint(model_io.default_model_dir())
    tok = model_io.load_tokenizer(info)
    texts = {s: calib.tokenize(tok, calib.load_text(s)[0]) for s in {ROWS[n][3] for n in names}}
    ev = calib.eval_windows(calib.tokenize(tok, calib.load_text(DEFAULT_EVAL_TEXT)[0]), 512, args.eval_windows)
    float_model = model_io.load_model(info)
    for p in float_model.parameters():
        p.requires_grad_(False)
    key = f"n{args.nsamples}-s{args.seqlen}-e{args.eval_windows}"
    if f"float-{key}" not in done:
        done[f"float-{key}"] = perplexity_torch(float_model, ev, batch_size=1, progress=False).ppl
    results = {}
    for name in names:
        if f"{name}-{key}" not in done:
            print(f"== {name} ...", flush=True)
            done[f"{name}-{key}"] = run_row(name, float_model, info, ev, args, texts)
            cache.write_text(json.dumps(done, indent=2))
        results[name] = done[f"{name}-{key}"]
        print(f"== {name}: ppl {results[name]['ppl']:.1f} ({results[name]['seconds']:.0f} s)", flush=True)
    write_report(results, done[f"float-{key}"], args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
