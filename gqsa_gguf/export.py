"""Packing and GGUF writing: a complete llama.cpp model file with gqsa4 decoder linears.

In:  the checkpoint's `ModelInfo`, the model's state dict (for the tensors GQSA does not touch:
     embeddings, norms, output head, Qwen2 q/k/v biases; any mapping — `streamed.StreamedModel`'s
     reads each tensor when asked, so only one dense tensor is in float32 at a time), the
     `CompressedLinear`s of `oneshot.compress_model` or `PackedLinear`s of a
     `streamed.BlockStore` (HF names and row order; a mapping read one linear at a time), the
     `ConvertConfig`.
Out: `export_gguf(...)` writes the file atomically (gguf_io.GQSAWriter) and returns an
     `ExportSummary` (every tensor with type, shape, sparsity, bits; the bits per weight of the
     linear weights; what was not compressed and why).

What goes in the file:
  * the architecture's metadata for its llama.cpp graph (`info.layout.write_hparams`);
  * the tokenizer (`vocab.read_vocab`) and the chat template;
  * token_embd / output as --dense-type (f16 or q8_0), norms and biases as f32;
  * the seven decoder linears of every block as gqsa4 or gqsa3 (`packed_rows`: codec.pack), their logical widths,
    sparsities and the config JSON under `gqsa.*` (docs/FORMAT.md).

Tensor names, write order and the q/k row permutation some graphs need are the layout's
(gqsa_gguf/arch); the permutation reorders output rows only and GQSA's mask and codes are per row,
so it is applied to the compressed rows.

Invariants: every state-dict tensor is either written or listed with a reason, never dropped
silently; an unknown tensor name raises; linear widths come from the model, never guessed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gquants

from . import __version__
from . import format as fmt
from .arch import DecoderLayout
from .gguf_io import GQSAWriter
from .model_io import ModelInfo
from .oneshot import CompressedLinear, PackedLinear
from .vocab import read_vocab
from .errors import GQSAError

__all__ = ["ExportError", "ExportSummary", "TensorRow", "export_gguf", "hf_to_gguf_name"]


class ExportError(GQSAError, RuntimeError):
    """The model cannot be written as a GGUF (unknown tensor, missing compressed linear, ...)."""


def hf_to_gguf_name(layout: DecoderLayout, hf: str) -> str:
    """HF state-dict name -> llama.cpp tensor name; raises ExportError for names the layout does not know."""
    name = layout.hf_to_gguf(hf)
    if name is None:
        raise ExportError(f"tensor '{hf}' has no llama.cpp counterpart in this exporter — the checkpoint has "
                          f"parts the {layout.gguf_arch} graph does not use; refusing to drop it silently")
    return name


@dataclass
class TensorRow:
    name: str
    type: str
    shape: tuple[int, ...]      # logical [rows, width] (HF order)
    sparsity: float | None
    bpw: float                  # bits per logical weight, metadata included
    note: str = ""


@dataclass
class ExportSummary:
    path: Path
    rows: list[TensorRow]
    linear_bpw: float           # bits of all GQSA tensors / their logical weights
    file_bytes: int
    not_compressed: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def format(self, every_tensor: bool = True) -> str:
        lines = []
        w = max(len(r.name) for r in self.rows)
        lines.append(f"{'tensor':<{w}}  {'type':<6} {'shape [rows, width]':<20} {'sparsity':>8} {'bits/w':>7}  note")
        gqsa_names = {t.name for t in fmt.TYPES.values()}
        for r in self.rows if every_tensor else [r for r in self.rows if r.type not in gqsa_names]:
            sp = "-" if r.sparsity is None else f"{r.sparsity:.1%}"
            shape = "[" + ", ".join(str(s) for s in r.shape) + "]"
            lines.append(f"{r.name:<{w}}  {r.type:<6} {shape:<20} {sp:>8} {r.bpw:>7.3f}  {r.note}")
        gqsa_rows = [r for r in self.rows if r.type in gqsa_names]
        lines.append("")
        lines.append(f"{len(gqsa_rows)} decoder linear tensors stored as "
                     f"{'/'.join(sorted({r.type for r in gqsa_rows})) or 'GQSA'}: "
                     f"{self.linear_bpw:.3f} bits per weight (all metadata included)")
        if self.not_compressed:
            lines.append("not compressed:")
            for what, why in self.not_compressed:
                lines.append(f"  {what}: {why}")
        for n in self.notes:
            lines.append(f"note: {n}")
        lines.append(f"wrote {self.path} ({self.file_bytes / 2**20:.1f} MiB)")
        return "\n".join(lines)


def _dense(name: str, arr: np.ndarray, dense_type: str, notes: list[str]) -> tuple[np.ndarray, GGMLQuantizationType | None, str, float]:
    """(data, raw_dtype, type name, bits per weight) for an embedding / output head."""
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if dense_type == "q8_0":
        blck, size = gquants.GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0]
        if arr.shape[-1] % blck == 0:
            return gquants.quantize(arr, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0, "q8_0", 8.0 * size / blck
        notes.append(f"{name}: row width {arr.shape[-1]} is not a multiple of {blck}; written as f16 instead of q8_0")
    if max(float(arr.max(initial=0.0)), -float(arr.min(initial=0.0))) > fmt.FP16_MAX:     # no |arr| copy
        notes.append(f"{name}: values exceed the f16 range; written as f32")
        return arr, None, "f32", 32.0
    return arr.astype(np.float16), None, "f16", 16.0


def export_gguf(path: str | os.PathLike, info: ModelInfo, state_dict: Mapping,
                compressed: Mapping[str, CompressedLinear | PackedLinear],
                config, progress: bool = False, rope_factors: np.ndarray | None = None) -> ExportSummary:
    """Writes the GGUF (see module docstring). `state_dict`: HF name -> tensor (torch or numpy);
    rope_factors: `model_io.rope_freq_factors` (required for 'llama3' RoPE scaling)."""
    path = Path(path)
    xcfg = config.export
    vocab = read_vocab(info.folder, info.vocab_size, xcfg.tokenizer_pre)

    layout = info.layout
    w = GQSAWriter(layout.gguf_arch, config.to_json(), __version__, bits=config.compression.bits)
    g = w.gguf
    layout.write_hparams(g, info, name=info.name)
    vocab.add_to(g)

    rows: list[TensorRow] = []
    not_compressed: list[tuple[str, str]] = []
    notes: list[str] = list(vocab.notes) + layout.notes(info.hf_config)
    notes.append(f"tokenizer: {vocab.model}" + (f", pre-tokenizer '{vocab.pre}' ({vocab.pre_source})" if vocab.pre else ""))

    expected_linears = set(layout.linear_names(info.n_layers))
    missing = sorted(expected_linears - set(compressed))
    extra = sorted(set(compressed) - expected_linears)
    if missing or extra:
        raise ExportError(f"compressed linears do not match the model: missing {missing[:4]}, unexpected {extra[:4]}")

    def np_of(t) -> np.ndarray:
        return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)

    gqsa_bits = 0
    gqsa_weights = 0
    for hf in sorted(state_dict, key=layout.tensor_order):
        name = hf_to_gguf_name(layout, hf) if not hf.endswith("rotary_emb.inv_freq") else None
        if name is None:
            not_compressed.append((hf, "RoPE frequencies are recomputed by llama.cpp from rope.freq_base"))
            continue
        module = hf[: -len(".weight")] if hf.endswith(".weight") else None
        if module in compressed:
            cl = compressed[module]
            rows_n, width = info.linear_shape(module.split(".", 3)[3])
            if (cl.rows, cl.width) != (rows_n, width):
                raise ExportError(f"{module}: compressed shape [{cl.rows}, {cl.width}] != model [{rows_n}, {width}]")
            if cl.bits != w.type.bits:
                raise ExportError(f"{module}: {cl.bits}-bit codes, but the file's type is {w.type.name} "
                                  f"(--gqsa {config.compression.spec})")
            perm = layout.rope_permutation(info, name)
            if perm is not None:
                cl = cl.permute_rows(perm)
            packed = cl.packed_rows()
            rec = w.add_gqsa_tensor(name, packed, cl.width, cl.sparsity)
            bpw = w.type.bits_per_weight(cl.n_kept, cl.width)
            gqsa_bits += packed.size * 8
            gqsa_weights += cl.rows * cl.width
            rows.append(TensorRow(name, w.type.name, (cl.rows, cl.width), rec.sparsity, bpw,
                                  "rope-permuted rows" if perm is not None else ""))
            continue
        if name == "output.weight" and info.tie_embeddings:
            not_compressed.append((hf, "tied to token_embd.weight; llama.cpp reuses it (no output.weight)"))
            continue
        arr = np_of(state_dict[hf])              # a lazy state dict reads the tensor here
        if name in ("token_embd.weight", "output.weight"):
            data, raw, tname, bpw = _dense(name, arr, xcfg.dense_type, notes)
            w.add_tensor(name, data, raw_dtype=raw)
            why = ("embedding lookup, not a matmul of a decoder block" if name == "token_embd.weight"
                   else "output head: outside the decoder blocks GQSA compresses (paper §3.2)")
            not_compressed.append((name, f"{why}; stored as {tname} (--dense-type)"))
            rows.append(TensorRow(name, tname, tuple(arr.shape), None, bpw, "dense"))
        elif arr.ndim == 1:
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
            rows.append(TensorRow(name, "f32", tuple(arr.shape), None, 32.0,
                                  "norm" if "norm" in name else "bias"))
        else:
            raise ExportError(f"tensor '{hf}' ({arr.shape}) is 2-D but neither a compressed linear nor an "
                              f"embedding/output head — refusing to write it uncompressed silently")

    if info.rope_type != "default":
        if rope_factors is None or np.asarray(rope_factors).shape != (info.head_dim // 2,):
            raise ExportError(f"'{info.rope_type}' RoPE scaling needs its {info.head_dim // 2} frequency factors "
                              f"(model_io.rope_freq_factors), got {None if rope_factors is None else np.shape(rope_factors)}")
        w.add_tensor("rope_freqs.weight", np.ascontiguousarray(rope_factors, dtype=np.float32))
        rows.append(TensorRow("rope_freqs.weight", "f32", (info.head_dim // 2,), None, 32.0, "rope factors"))
        not_compressed.append(("rope_freqs.weight", f"'{info.rope_type}' RoPE frequency factors, f32"))
    gguf_names = {r.name for r in rows}
    for req in ("token_embd.weight", "output_norm.weight"):
        if req not in gguf_names:
            raise ExportError(f"the state dict has no tensor for '{req}' — the checkpoint is incomplete")
    if not info.tie_embeddings and "output.weight" not in gguf_names:
        raise ExportError("tie_word_embeddings is false but the checkpoint has no lm_head.weight")
    norms = [r for r in rows if r.note == "norm"]
    biases = [r for r in rows if r.note == "bias"]
    if norms:
        not_compressed.append((f"{len(norms)} RMSNorm weights", "1-D, kept in f32"))
    if biases:
        not_compressed.append((f"{len(biases)} attention biases", "1-D, kept in f32"))
    # 1-D tensors are summarised above; drop their per-tensor duplicates from not_compressed
    not_compressed = [(a, b) for a, b in not_compressed
                      if a not in gguf_names or a in ("token_embd.weight", "output.weight", "rope_freqs.weight")]

    path.parent.mkdir(parents=True, exist_ok=True)
    w.write(path, progress=progress)
    return ExportSummary(path=path, rows=rows, linear_bpw=gqsa_bits / max(1, gqsa_weights),
                         file_bytes=path.stat().st_size, not_compressed=not_compressed, notes=notes)

