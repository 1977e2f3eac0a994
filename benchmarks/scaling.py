"""How the converter's time and memory grow with the model (issue 16): a table of peak RSS and
seconds per stage for several checkpoints converted at the same reduced settings.

    python benchmarks/scaling.py LABEL=FOLDER [LABEL=FOLDER ...] [--out-dir scaling-out]
                                 [--reuse] [-- extra convert.py arguments]

Each checkpoint is converted by `convert.py` in a child process under `/usr/bin/time -v` (its
"Maximum resident set size" is the peak), with SETTINGS and the extra arguments; the log of each
run is kept in --out-dir (LABEL.log) and `--reuse` builds the table from the logs already there
instead of converting again (a 7B-shaped run takes hours on 2 cores). The converter prints each
stage's seconds and the peak RSS when the stage ended (a running maximum, so the stage whose value
rises set the peak); the table shows both, with the converter's own estimate of the peak (memory.py,
printed in the log before it reads a weight) beside the measured one. Random checkpoints of a given shape: scripts/make_random_checkpoint.py.

Writes OUT_DIR/scaling.md (markdown) and prints it.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gqsa_gguf import memory, model_io                      # noqa: E402

SETTINGS = ["--nsamples", "8", "--seqlen", "256", "--bqpo-epochs", "0", "--e2e-epochs", "0"]
STAGES = ("prepare", "allocate", "compress", "load", "bqpo", "e2e", "export")

_TIME = re.compile(r"^time: (.*), total ([\d.]+) s$", re.M)
_PEAKS = re.compile(r"^peak RSS at the end of each stage: (.*)$", re.M)
_MAXRSS = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")
# the converter's own estimate for the run's settings (memory.check, printed before any weight is read)
_ESTIMATE = re.compile(r"^memory: about ([\d.]+) GB at the peak \((\w+)", re.M)
_WALL = re.compile(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)")


def run(label: str, folder: Path, out_dir: Path, extra: list[str]) -> Path:
    log = out_dir / f"{label}.log"
    cmd = ["/usr/bin/time", "-v", sys.executable, str(ROOT / "convert.py"), str(folder), *SETTINGS, *extra,
           "-o", str(out_dir / f"{label}.gguf")]
    print(f"{label}: {shlex.join(cmd)}", flush=True)
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc != 0:
        raise SystemExit(f"{label}: convert.py exited with {rc}; see {log}")
    return log


def parse(log: Path) -> dict:
    text = log.read_text(errors="replace")
    m, p, r, w = _TIME.search(text), _PEAKS.search(text), _MAXRSS.search(text), _WALL.search(text)
    if not (m and p and r):
        raise SystemExit(f"{log}: no 'time:', 'peak RSS ...' or /usr/bin/time line — did the run finish?")
    seconds = {k: float(v.removesuffix(" s")) for k, v in (x.split(" ", 1) for x in m.group(1).split(", "))}
    peaks = {k: float(v.removesuffix(" GB")) for k, v in (x.split(" ", 1) for x in p.group(1).split(", "))}
    est = _ESTIMATE.search(text)
    return {"seconds": seconds, "peaks": peaks, "max_rss": int(r.group(1)) * 1024, "wall": w.group(1) if w else "?",
            **({"estimate": float(est.group(1)) * 1e9, "estimate_stage": est.group(2)} if est else {})}


def describe(folder: Path) -> dict:
    info = model_io.inspect_checkpoint(folder)
    z = memory.model_sizes(info)
    disk = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return {"params": z.total, "layers": info.n_layers, "hidden": z.hidden, "ffn": z.ffn, "block": z.block,
            "disk": disk}


def table(rows: list[tuple[str, dict, dict]]) -> str:
    used = [s for s in STAGES if any(s in r["seconds"] for _, _, r in rows)]
    head = (["model", "params", "layers x hidden / ffn", "one block f32", "on disk", "peak RSS", "estimate"]
            + [f"{s} s (peak GB)" for s in used] + ["wall"])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, d, r in rows:
        cells = [label, f"{d['params'] / 1e9:.2f}B", f"{d['layers']} x {d['hidden']} / {d['ffn']}",
                 f"{d['block'] * 4 / 1e9:.2f} GB", f"{d['disk'] / 1e9:.2f} GB", f"{r['max_rss'] / 1e9:.2f} GB",
                 f"{r['estimate'] / 1e9:.2f} GB ({r['estimate_stage']})" if "estimate" in r else "- (not in the log)"]
        cells += [f"{r['seconds'][s]:.0f} ({r['peaks'][s]:.2f})" if s in r["seconds"] else "-" for s in used]
        out.append("| " + " | ".join(cells + [r["wall"]]) + " |")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="LABEL=CHECKPOINT_FOLDER")
    ap.add_argument("--out-dir", default="scaling-out")
    ap.add_argument("--reuse", action="store_true", help="build the table from the logs in --out-dir")
    a = ap.parse_args(argv)
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in a.runs:
        label, sep, folder = spec.partition("=")
        if not sep or not label or not folder:
            ap.error(f"{spec!r}: expected LABEL=CHECKPOINT_FOLDER")
        folder = model_io.resolve_model(folder)
        log = out_dir / f"{label}.log"
        if not (a.reuse and log.exists()):
            log = run(label, folder, out_dir, extra)
        rows.append((label, describe(folder), parse(log)))
    md = (f"Settings: `{shlex.join(SETTINGS + extra)}`; peak RSS from /usr/bin/time; per stage: seconds and "
          f"(the peak RSS when the stage ended, GB); estimate: the converter's own (memory.py) for the run's "
          f"settings, printed before it reads a weight.\n\n" + table(rows) + "\n")
    (out_dir / "scaling.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
