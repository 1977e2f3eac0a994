#!/usr/bin/env python3
"""Write a randomly initialised LLaMA-shaped Hugging Face checkpoint folder of a given shape.

    python scripts/make_random_checkpoint.py OUT --preset llama-1b [--hidden H --layers L ...]

For measuring how time and memory grow with the model (issue 16) without downloading a 7B model:
the folder is what `gqsa-gguf convert` reads — config.json, generation_config.json, F16
safetensors (one `model.safetensors`, or `model-0000i-of-0000n.safetensors` shards of at most
--shard-gb with `model.safetensors.index.json` when it does not fit in one), and the tokenizer
files of the default model (SmolLM2-135M-Instruct, `model_io.default_model_dir()`).

Vocabulary: the converter writes one GGUF token per embedding row and refuses a tokenizer id
>= vocab_size (gqsa_gguf/vocab.py pads rows the tokenizer lacks), so vocab_size must be at least
the copied tokenizer's size (49152). The presets use exactly that; LLaMA-7B's own 32000 rows would
not hold SmolLM2's ids, so the 7B-shaped checkpoint has 6.88B parameters instead of 6.74B.

Memory: tensors are generated and written one at a time, large ones in chunks of rows
(`CHUNK_ELEMENTS`), straight into the safetensors layout (the header is computed from the shapes
first), so peak memory is a few tens of MB whatever the model size (tested).

Values: linears and embeddings ~ N(0, INIT_STD) (float32 draws rounded to F16), RMSNorm gains 1;
every tensor has its own generator seeded from (seed, tensor name), so the values do not depend
on the sharding. With std 0.02 the activations of a random model stay finite over 32 layers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

INIT_STD = 0.02
CHUNK_ELEMENTS = 1 << 22                 # 4M values (16 MB float32) generated at a time
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "tokenizer.model")


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int | None = None             # None: the copied tokenizer's size
    tie: bool = False
    context: int = 2048
    rope_theta: float = 10000.0


PRESETS = {
    # tests: small enough to write in a second (the 49152-row embedding is most of it)
    "tiny": Shape(hidden=64, layers=2, ffn=128, heads=4, kv_heads=2, tie=True),
    # TinyLlama-1.1B's shape (untied head)
    "llama-1b": Shape(hidden=2048, layers=22, ffn=5632, heads=32, kv_heads=4),
    # LLaMA-7B's shape (LLaMA-2-7B: same), untied head
    "llama-7b": Shape(hidden=4096, layers=32, ffn=11008, heads=32, kv_heads=32, context=4096),
}


def tokenizer_size(folder: Path) -> int:
    """1 + the largest token id of the tokenizer in `folder` (tokenizer.json: BPE vocabulary and
    added tokens)."""
    tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    ids = list(tj.get("model", {}).get("vocab", {}).values()) + [t["id"] for t in tj.get("added_tokens", [])]
    if not ids:
        raise SystemExit(f"{folder}/tokenizer.json: no token ids found")
    return max(ids) + 1


def tensor_shapes(s: Shape, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every tensor, in the usual file order."""
    hd = s.hidden // s.heads
    q, kv = s.heads * hd, s.kv_heads * hd
    out = [("model.embed_tokens.weight", (vocab, s.hidden))]
    for i in range(s.layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (s.hidden,)),
                (p + "self_attn.q_proj.weight", (q, s.hidden)),
                (p + "self_attn.k_proj.weight", (kv, s.hidden)),
                (p + "self_attn.v_proj.weight", (kv, s.hidden)),
                (p + "self_attn.o_proj.weight", (s.hidden, q)),
                (p + "post_attention_layernorm.weight", (s.hidden,)),
                (p + "mlp.gate_proj.weight", (s.ffn, s.hidden)),
                (p + "mlp.up_proj.weight", (s.ffn, s.hidden)),
                (p + "mlp.down_proj.weight", (s.hidden, s.ffn))]
    out.append(("model.norm.weight", (s.hidden,)))
    if not s.tie:
        out.append(("lm_head.weight", (vocab, s.hidden)))
    return out


def n_params(s: Shape, vocab: int) -> int:
    return sum(int(np.prod(shape)) for _, shape in tensor_shapes(s, vocab))


def _generator(seed: int, name: str) -> np.random.Generator:
    h = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(h[:8], "little")))


def _write_values(f, name: str, shape: tuple[int, ...], seed: int) -> None:
    """Writes the F16 values of one tensor, CHUNK_ELEMENTS at a time."""
    n = int(np.prod(shape))
    if name.endswith("norm.weight"):
        f.write(np.ones(n, dtype=np.float16).tobytes())
        return
    gen = _generator(seed, name)
    for start in range(0, n, CHUNK_ELEMENTS):
        k = min(CHUNK_ELEMENTS, n - start)
        chunk = gen.standard_normal(k, dtype=np.float32)
        chunk *= INIT_STD
        f.write(chunk.astype(np.float16).data)        # no bytes copy


def _write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], seed: int) -> None:
    """One safetensors file: u64 header length, JSON header (offsets relative to the data), data."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)            # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for name, shape in tensors:
            _write_values(f, name, shape, seed)
        if f.tell() != 8 + len(hbytes) + offset:
            raise RuntimeError(f"{path}: wrote {f.tell()} bytes, expected {8 + len(hbytes) + offset}")


def _shards(tensors, shard_bytes: int) -> list[list]:
    """Greedy split in file order; a tensor larger than shard_bytes gets a shard of its own."""
    shards, cur, size = [], [], 0
    for name, shape in tensors:
        b = int(np.prod(shape)) * 2
        if cur and size + b > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += b
    if cur:
        shards.append(cur)
    return shards


def config_json(s: Shape, vocab: int, src_cfg: dict) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": s.hidden, "intermediate_size": s.ffn, "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads, "head_dim": s.hidden // s.heads,
        "vocab_size": vocab, "max_position_embeddings": s.context, "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "rope_theta": s.rope_theta, "rope_scaling": None,
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
        "tie_word_embeddings": s.tie, "initializer_range": INIT_STD, "use_cache": True, "dtype": "float16",
        "bos_token_id": src_cfg.get("bos_token_id"), "eos_token_id": src_cfg.get("eos_token_id"),
        "pad_token_id": src_cfg.get("pad_token_id"),
        "_name_or_path": f"random-llama-h{s.hidden}-l{s.layers}-f{s.ffn}",
    }


def write_checkpoint(out: str | os.PathLike, shape: Shape, seed: int = 0, shard_gb: float = 2.0,
                     tokenizer_dir: str | os.PathLike | None = None, log=print) -> Path:
    """Writes the folder `out` (atomically: built in a temp folder next to it, then renamed; an
    existing `out` is refused) and returns it."""
    out = Path(out).expanduser()
    if out.exists():
        raise SystemExit(f"{out} already exists — remove it or choose another folder")
    if shape.hidden % shape.heads or shape.heads % shape.kv_heads or (shape.hidden // shape.heads) % 2:
        raise SystemExit(f"heads {shape.heads}/{shape.kv_heads} do not divide hidden {shape.hidden} into even "
                         f"head sizes with whole key/value groups")
    if tokenizer_dir is None:
        from gqsa_gguf.model_io import default_model_dir
        tokenizer_dir = default_model_dir()
    tokenizer_dir = Path(tokenizer_dir)
    need = tokenizer_size(tokenizer_dir)
    vocab = need if shape.vocab is None else shape.vocab
    if vocab < need:
        raise SystemExit(f"--vocab {vocab} is smaller than the copied tokenizer ({tokenizer_dir}: ids up to "
                         f"{need - 1}); the converter refuses token ids >= vocab_size — use --vocab >= {need}")
    src_cfg = json.loads((tokenizer_dir / "config.json").read_text()) if (tokenizer_dir / "config.json").is_file() else {}

    tensors = tensor_shapes(shape, vocab)
    total = sum(int(np.prod(s)) for _, s in tensors) * 2
    shards = _shards(tensors, max(1, int(shard_gb * 1e9)))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        files = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
        for fname, part in zip(files, shards):
            _write_shard(tmp / fname, part, seed)
            log(f"  {fname}: {len(part)} tensors, {sum(int(np.prod(s)) for _, s in part) * 2 / 1e9:.2f} GB")
        if len(shards) > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {n: f for f, part in zip(files, shards) for n, _ in part}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        cfg = config_json(shape, vocab, src_cfg)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
               "pad_token_id": cfg["pad_token_id"], "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, tmp / name)
        (tmp / "gqsa_random.json").write_text(json.dumps(
            {"shape": asdict(replace(shape, vocab=vocab)), "seed": seed, "init_std": INIT_STD,
             "tokenizer_from": str(tokenizer_dir), "params": total // 2}, indent=2))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def shape_from_args(a: argparse.Namespace) -> Shape:
    s = PRESETS[a.preset]
    over = {k: getattr(a, k) for k in ("hidden", "layers", "ffn", "heads", "kv_heads", "vocab", "context")
            if getattr(a, k) is not None}
    if a.tie is not None:
        over["tie"] = a.tie
    return replace(s, **over)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", help="checkpoint folder to create (must not exist)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--hidden", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--ffn", type=int, help="intermediate (MLP) size")
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--vocab", type=int, help="embedding rows (default: the copied tokenizer's size)")
    p.add_argument("--context", type=int, help="max_position_embeddings")
    p.add_argument("--tie", dest="tie", action="store_true", default=None, help="tie the output head to the embeddings")
    p.add_argument("--untie", dest="tie", action="store_false", help="separate output head")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-gb", type=float, default=2.0, help="largest shard (GB; a larger tensor gets its own)")
    p.add_argument("--tokenizer-from", default=None,
                   help="folder to copy the tokenizer files from (default: the default model's)")
    a = p.parse_args(argv)
    s = shape_from_args(a)
    for k in ("hidden", "layers", "ffn", "heads", "kv_heads"):
        if getattr(s, k) <= 0:
            p.error(f"--{k.replace('_', '-')} must be positive")
    if a.shard_gb <= 0:
        p.error("--shard-gb must be positive")
    print(f"writing {a.out}: {s}")
    out = write_checkpoint(a.out, s, seed=a.seed, shard_gb=a.shard_gb, tokenizer_dir=a.tokenizer_from)
    meta = json.loads((out / "gqsa_random.json").read_text())
    print(f"{out}: {meta['params'] / 1e9:.3f}B parameters, {meta['params'] * 2 / 1e9:.2f} GB F16")
    return 0


if __name__ == "__main__":
    sys.exit(main())
