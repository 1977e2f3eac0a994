"""Decode speed of one model through two (or more) builds of the libraries, side by side.

The portable build (scripts/setup.sh --portable) against the native one, a build with a kernel
change against one without, or one CPU variant of a portable build against another: each build is
a library directory (a build's bin/, or an installed gqsa_gguf/lib), optionally with a CPU variant
(`DIR@VARIANT`, through $GQSA_GGUF_CPU_VARIANT). A process binds to one library directory for
good, so every measurement is a fresh process; the builds take turns in each round, and the table
gives the best, the median and every round's tokens/s, so a busy moment of the machine shows as a
spread instead of as a difference between builds. The model is written once (a synthetic
`gqsa-gguf bench` shape, random weights), and the bound is the measured read bandwidth over the
weight bytes read per token, as in `gqsa-gguf bench`.

    python benchmarks/builds_ab.py --synthetic llama-7b --format w4s50 --threads 2 --rounds 4 \\
        native=build/cp311-cp311-linux_x86_64/bin portable=build/cp311-cp311-linux_x86_64-portable/bin
    python benchmarks/builds_ab.py --kernel 32768 --rounds 6 native=... portable=... portable-x64=DIR@x64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gqsa_gguf import bench, runtime  # noqa: E402

KERNEL = """
    import ctypes, json, sys
    import numpy as np
    from gqsa_gguf import bench, format as fmt, runtime
    rows, width, threads, reps = (int(a) for a in sys.argv[1:5])
    sparsity = float(sys.argv[5])
    w = np.load(sys.argv[6])
    lib = runtime.native_lib()
    fn = lib.gqsa_test_time_mul_mat
    fn.restype = ctypes.c_double
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int, ctypes.c_int]
    n_kept = fmt.kept_groups(width, sparsity)
    best = fn(fmt.GGML_TYPE_GQSA4, w.ctypes.data, n_kept * fmt.GROUP_SIZE, rows, width, 1, threads, reps)
    kernels = getattr(lib, "gqsa_test_cpu_kernels", None)     # hooks of builds before it existed lack it
    if kernels is not None:
        kernels.restype = ctypes.c_char_p
    print(json.dumps({"s": best, "bytes": w.nbytes, "kernels": kernels().decode() if kernels else "?",
                      "variant": runtime._chosen_variant(runtime.lib_dir()).name if runtime.is_portable() else None}))
"""

TIME = """
    import json, sys
    from pathlib import Path
    from gqsa_gguf import bench, runtime
    ll = runtime.import_llama_cpp()
    pp, tg = bench.time_model(ll, Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    print(json.dumps({"pp": pp, "tg": tg, "variant": runtime.loaded_cpu_variant(),
                      "machine": bench.machine_description(ll)}))
"""


def parse_build(spec: str) -> tuple[str, Path, str | None]:
    """NAME=DIR[@VARIANT] -> (name, dir, variant)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise SystemExit(f"a build is NAME=DIR[@VARIANT], not {spec!r}")
    d, _, variant = rest.partition("@")
    path = Path(d).expanduser().resolve()
    if not (path / runtime.LLAMA_LIB_NAME).is_file():
        raise SystemExit(f"build {name}: {path} has no {runtime.LLAMA_LIB_NAME}")
    return name, path, variant or None


def _env(lib: Path, variant: str | None) -> dict:
    env = {**os.environ, runtime.LIB_DIR_ENV: str(lib)}
    env.pop(runtime.CPU_VARIANT_ENV, None)
    if variant:
        env[runtime.CPU_VARIANT_ENV] = variant
    return env


def time_kernel(lib: Path, variant: str | None, rows: int, width: int, threads: int, reps: int, sparsity: float,
                weights: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(KERNEL), str(rows), str(width), str(threads), str(reps),
                           str(sparsity), str(weights)], env=_env(lib, variant), capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"kernel timing through {lib} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def kernel_main(args, builds) -> int:
    """--kernel: one decode mul_mat (1 column) of a rows x width gqsa4 weight through each build's
    test hooks (ggml_mul_mat on the CPU backend, plain file layout), best of --reps calls per round."""
    bandwidth = bench.measure_bandwidth(args.threads)
    sparsity = bench.GQSA_SPARSITY[args.format]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    weights = args.out_dir / "builds-ab-weights.npy"
    import numpy as np
    np.save(weights, bench._RandomWeights(seed=0).gqsa(sparsity, args.kernel, shape_width(args)))
    runs: dict[str, list[float]] = {name: [] for name, _, _ in builds}
    info = {}
    for r in range(args.rounds):
        for name, lib, variant in (builds if r % 2 == 0 else builds[::-1]):
            out = time_kernel(lib, variant, args.kernel, shape_width(args), args.threads, args.reps, sparsity, weights)
            runs[name].append(out["bytes"] / out["s"] / 1e9)
            info[name] = out
            print(f"round {r + 1}/{args.rounds}  {name:10s} {runs[name][-1]:6.2f} GB/s  "
                  f"(variant {out['variant'] or 'native'}, {out['kernels']} kernels)", flush=True)
    weights.unlink()
    ref = builds[0][0]
    nbytes = info[ref]["bytes"]
    lines = [f"Decode mul_mat (1 column) of a {args.kernel} x {shape_width(args)} {args.format} weight "
             f"({nbytes / 1e6:.1f} MB), {args.threads} thread(s), best of {args.reps} calls per round, "
             f"{args.rounds} alternating rounds, each a fresh process; measured read bandwidth "
             f"{bandwidth / 1e9:.1f} GB/s.", "",
             f"| build | CPU variant | kernels | best GB/s | median | × {ref} (best) | % of bandwidth (best) | every round |",
             "|---|---|---|---|---|---|---|---|"]
    best_ref = max(runs[ref])
    for name, _, _ in builds:
        g = runs[name]
        lines.append(f"| {name} | {info[name]['variant'] or 'native'} | {info[name]['kernels']} | {max(g):.2f} | "
                     f"{statistics.median(g):.2f} | {max(g) / best_ref:.3f} | {100 * max(g) * 1e9 / bandwidth:.0f} % | "
                     f"{', '.join(f'{x:.2f}' for x in g)} |")
    lines += ["", "Command: `python benchmarks/builds_ab.py " + " ".join(sys.argv[1:]) + "`."]
    print()
    print("\n".join(lines))
    return 0


def shape_width(args) -> int:
    return bench.PRESETS[args.synthetic].n_ff        # the widest linear (ffn_down's input)


def time_build(model: Path, lib: Path, variant: str | None, threads: int, n_prompt: int, n_decode: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(TIME), str(model), str(threads), str(n_prompt),
                           str(n_decode)], env=_env(lib, variant), capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"timing through {lib} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("builds", nargs="+", help="NAME=DIR[@VARIANT], two or more; the first is the reference")
    p.add_argument("--synthetic", choices=sorted(bench.PRESETS), default="llama-7b")
    p.add_argument("--format", default="w4s50", choices=bench.FORMATS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out-dir", type=Path, default=Path("bench-out"))
    p.add_argument("--kernel", type=int, metavar="ROWS",
                   help="time one decode mul_mat of a ROWS x (the shape's FFN width) weight through each build's test "
                        "hooks instead of a whole model (a short call, best of --reps: less exposed to a busy machine)")
    p.add_argument("--reps", type=int, default=20, help="--kernel: calls per round (default 20)")
    args = p.parse_args(argv)
    builds = [parse_build(b) for b in args.builds]
    if len(builds) < 2:
        raise SystemExit("give at least two builds")
    if args.kernel:
        return kernel_main(args, builds)
    shape = bench.PRESETS[args.synthetic]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model = args.out_dir / f"{shape.name}-{args.format}.gguf"
    if args.format in bench.QUANTIZED:
        raise SystemExit("builds_ab measures the formats write_model writes (not the quantizer's file types)")
    print(f"writing {model} ...", flush=True)
    sizes = bench.write_model(shape, args.format, model, bench._RandomWeights(seed=0))
    bandwidth = bench.measure_bandwidth(args.threads)
    bound = bandwidth / sizes["bytes_per_token"]
    runs: dict[str, list[float]] = {name: [] for name, _, _ in builds}
    info = {}
    for r in range(args.rounds):
        for name, lib, variant in (builds if r % 2 == 0 else builds[::-1]):     # alternate who goes first
            out = time_build(model, lib, variant, args.threads, args.prompt, args.decode)
            runs[name].append(out["tg"])
            info[name] = out
            print(f"round {r + 1}/{args.rounds}  {name:10s} decode {out['tg']:6.2f} tok/s  "
                  f"(CPU variant {out['variant'] or 'native'})", flush=True)
    model.unlink()
    ref = builds[0][0]
    lines = [f"`{shape.name}` {args.format}, {args.threads} thread(s), decode {args.decode} tokens, "
             f"{args.rounds} alternating rounds, each a fresh process. Bound: {bandwidth / 1e9:.1f} GB/s read "
             f"/ {sizes['bytes_per_token'] / 1e6:.1f} MB per token = {bound:.2f} tok/s.", "",
             f"| build | CPU variant | best tok/s | median | × {ref} (best) | % of bound (best) | every round |",
             "|---|---|---|---|---|---|---|"]
    best_ref = max(runs[ref])
    for name, lib, _ in builds:
        tg = runs[name]
        lines.append(f"| {name} | {info[name]['variant'] or 'native'} | {max(tg):.2f} | {statistics.median(tg):.2f} | "
                     f"{max(tg) / best_ref:.3f} | {100 * max(tg) / bound:.0f} % | {', '.join(f'{t:.2f}' for t in tg)} |")
    lines += ["", f"Machine: {info[ref]['machine']}.", "",
              "Command: `python benchmarks/builds_ab.py " + " ".join(sys.argv[1:] if argv is None else argv) + "`."]
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    (args.out_dir / "builds-ab.md").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
