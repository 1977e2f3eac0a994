"""Decode speed of one model through two (or more) builds of the libraries, side by side.

The portable build (scripts/setup.sh --portable) against the native one, a build with a kernel
change against one without, or one CPU variant of a portable build against another: each build is
a library directory (a build's bin/, or an installed gqsa_gguf/lib), optionally with a CPU variant
(`DIR@VARIANT`, through $GQSA_GGUF_CPU_VARIANT). A process binds to one library directory for
good, so every measurement is a fresh process; the builds take turns in each round. The table gives
each build's median CPU time per decoded token (user + sys of the process: what a kernel change
changes, and less disturbed than the wall clock when other programs share the cores; with more than
one thread it includes ggml's workers waiting at barriers), every round's, and the median and best
tokens/s, so a busy moment of the machine shows as a spread instead of as a difference between
builds. The models are written once (a synthetic `gqsa-gguf bench` shape, random weights; --layers
shortens it; several formats separated by commas), and the bound is the measured read bandwidth over
the weight bytes read per token, as in `gqsa-gguf bench`.

    python benchmarks/builds_ab.py --synthetic llama-7b --layers 8 --format w4s50,w4s25 --threads 1 \\
        --decode 32 --rounds 8 native=build/cp311-cp311-linux_x86_64/bin portable=build/cp311-cp311-linux_x86_64-portable/bin
    python benchmarks/builds_ab.py --kernel 32768 --rounds 6 native=... portable=... portable-x64=DIR@x64

For one kernel change, native/tests's `bench_sb_step` (both builds of the x86 kernel file in one
process, alternating call by call) resolves differences of a few per cent that runs in separate
processes do not.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    sb_ns = None                      # the repacked (superblock) decode kernel alone, 1 thread, median CPU time
    if hasattr(lib, "gqsa_test_time_sb_rows") and n_kept >= 8:
        sb = lib.gqsa_test_time_sb_rows
        sb.restype = ctypes.c_double
        sb.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
        sb_ns = sb(w.ctypes.data, n_kept, rows, width, reps)
    kernels = getattr(lib, "gqsa_test_cpu_kernels", None)     # hooks of builds before it existed lack it
    if kernels is not None:
        kernels.restype = ctypes.c_char_p
    print(json.dumps({"s": best, "sb_ns": sb_ns, "bytes": w.nbytes, "kernels": kernels().decode() if kernels else "?",
                      "variant": runtime._chosen_variant(runtime.lib_dir()).name if runtime.is_portable() else None}))
"""

# A decode of n tokens after a short prompt, timed by the wall clock and by the process's CPU time
# (user + sys of every thread): the CPU time per token is what a kernel change changes, and unlike
# tokens/s it does not count the time the process waits while other programs run on a shared core.
# With more than one thread it includes ggml's workers spinning at barriers.
TIME = """
    import json, resource, sys, time
    from pathlib import Path
    from gqsa_gguf import bench, runtime
    ll = runtime.import_llama_cpp()
    path, threads, n_prompt, n_decode = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    llm = ll.Llama(model_path=str(path), n_ctx=n_prompt + n_decode + 8, n_batch=n_prompt, n_ubatch=n_prompt,
                   n_threads=threads, n_threads_batch=threads, verbose=False)
    prompt = [1000 + i % 20000 for i in range(n_prompt)]
    llm.eval(prompt[:8])                      # warm-up: touches every weight page once
    llm.reset()
    llm.eval(prompt)
    def cpu():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    c0, t0 = cpu(), time.perf_counter()
    for i in range(n_decode):
        llm.eval([2000 + i])
    c1, t1 = cpu(), time.perf_counter()
    llm.close()
    print(json.dumps({"tg": n_decode / (t1 - t0), "cpu_ms": 1e3 * (c1 - c0) / n_decode,
                      "variant": runtime.loaded_cpu_variant(), "machine": bench.machine_description(ll)}))
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
    sb_runs: dict[str, list[float]] = {name: [] for name, _, _ in builds}
    info = {}
    for r in range(args.rounds):
        for name, lib, variant in (builds if r % 2 == 0 else builds[::-1]):
            out = time_kernel(lib, variant, args.kernel, shape_width(args), args.threads, args.reps, sparsity, weights)
            runs[name].append(out["bytes"] / out["s"] / 1e9)
            if out.get("sb_ns") is not None:
                sb_runs[name].append(out["sb_ns"])
            info[name] = out
            sb_text = f", repacked {out['sb_ns']:.3f} CPU ns/block" if out.get("sb_ns") is not None else ""
            print(f"round {r + 1}/{args.rounds}  {name:10s} {runs[name][-1]:6.2f} GB/s{sb_text}  "
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
    if all(sb_runs.values()):
        lines += ["", "The repacked (superblock) decode kernel alone (ggml_gqsa_sb_rows, 1 thread, the same weight "
                  "repacked), median thread CPU time per block of each round's median:", "",
                  "| build | CPU ns/block (median) | every round |", "|---|---|---|"]
        for name, _, _ in builds:
            lines.append(f"| {name} | {statistics.median(sb_runs[name]):.3f} | "
                         f"{', '.join(f'{x:.3f}' for x in sb_runs[name])} |")
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
    p.add_argument("--format", default="w4s50", help="a format, or several separated by commas (default w4s50)")
    p.add_argument("--layers", type=int, help="the shape with this many layers instead of its own (a shorter file)")
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
    if args.layers:
        shape = dataclasses.replace(shape, name=f"{shape.name}-{args.layers}l", n_layer=args.layers)
    formats = args.format.split(",")
    for f in formats:
        if f not in bench.FORMATS or f in bench.QUANTIZED:
            raise SystemExit(f"--format {f}: builds_ab measures the formats write_model writes: "
                             f"{', '.join(x for x in bench.FORMATS if x not in bench.QUANTIZED)}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    weights = bench._RandomWeights(seed=0)
    models, sizes = {}, {}
    for f in formats:
        models[f] = args.out_dir / f"{shape.name}-{f}.gguf"
        print(f"writing {models[f]} ...", flush=True)
        sizes[f] = bench.write_model(shape, f, models[f], weights)
    bandwidth = bench.measure_bandwidth(args.threads)
    runs = {(f, name): [] for f in formats for name, _, _ in builds}
    info = {}
    for r in range(args.rounds):
        for f in formats:
            for name, lib, variant in (builds if r % 2 == 0 else builds[::-1]):     # alternate who goes first
                out = time_build(models[f], lib, variant, args.threads, args.prompt, args.decode)
                runs[f, name].append(out)
                info[name] = out
                print(f"round {r + 1}/{args.rounds}  {f:6s} {name:10s} decode {out['tg']:6.2f} tok/s, "
                      f"{out['cpu_ms']:7.2f} CPU ms/token  (CPU variant {out['variant'] or 'native'})", flush=True)
    for f in formats:
        models[f].unlink()
    ref = builds[0][0]
    lines = [f"`{shape.name}` (width {shape.n_embd}, FFN {shape.n_ff}, {shape.n_layer} layers), {args.threads} "
             f"thread(s), decode {args.decode} tokens after a {args.prompt}-token prompt, {args.rounds} rounds, "
             f"the builds alternating, each run a fresh process. CPU ms/token: user + sys time of the process over "
             f"the decode. Bound: {bandwidth / 1e9:.1f} GB/s read / bytes per token.", "",
             f"| format | build | CPU variant | CPU ms/token (median) | × {ref} | every round | tok/s median (best) "
             f"| % of bound (best) |",
             "|---|---|---|---|---|---|---|---|"]
    for f in formats:
        bound = bandwidth / sizes[f]["bytes_per_token"]
        ref_ms = statistics.median(o["cpu_ms"] for o in runs[f, ref])
        for name, _, _ in builds:
            ms = [o["cpu_ms"] for o in runs[f, name]]
            tg = [o["tg"] for o in runs[f, name]]
            lines.append(f"| {f} | {name} | {info[name]['variant'] or 'native'} | {statistics.median(ms):.2f} | "
                         f"{statistics.median(ms) / ref_ms:.3f} | {', '.join(f'{x:.1f}' for x in ms)} | "
                         f"{statistics.median(tg):.2f} ({max(tg):.2f}) | {100 * max(tg) / bound:.0f} % |")
    lines += ["", f"Machine: {info[ref]['machine']}.", "",
              "Command: `python benchmarks/builds_ab.py " + " ".join(sys.argv[1:] if argv is None else argv) + "`."]
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    (args.out_dir / "builds-ab.md").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
