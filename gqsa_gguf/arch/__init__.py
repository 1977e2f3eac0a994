"""Decoder architectures: everything particular to one model family, in one class per file.

In:  an HF architecture name (config.json's `architectures[0]`) or a GGUF's `general.architecture`.
Out: `for_hf(name)` / `for_gguf(name)` -> the `DecoderLayout` of that family, which owns
     * the seven decoder linears GQSA compresses (`LINEARS`, HF module paths inside a block), their
       shapes (`linear_shape`) and which of them read the same input (`INPUT_GROUPS`);
     * the HF <-> GGUF tensor names (`hf_to_gguf`, `gguf_to_hf`) and the writing order;
     * the RoPE facts: which scaling types it accepts, whether llama.cpp's graph wants the q/k rows
       permuted (`rope_permutation`), the plain rotary frequencies (`rope_inv_freq`);
     * the checks of its config.json beyond the common ones (`check_hf_config`);
     * the hyper-parameters written to the file (`write_hparams`) and, back from a file, the
       transformers config (`hf_config_from_gguf`).

Adding an architecture is one new module in this package defining one `@register`ed subclass;
modules are discovered at import, so nothing else changes. A name no module registers is refused
with the list of the known ones (`UnknownArchitecture`).

Invariants: every HF architecture name is registered once; a GGUF architecture name rebuilds to
exactly one layout (the one with `rebuilds_gguf = True`); tensor names round-trip.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass

import numpy as np

from ..errors import GQSAError

__all__ = ["LINEARS", "INPUT_GROUPS", "DecoderLayout", "Hparams", "UnknownArchitecture", "register",
           "for_hf", "for_gguf", "known_hf", "rope_inv_freq", "interleave_rope_rows"]

# The decoder linears of a block (HF module paths relative to the block) that GQSA compresses,
# grouped by the input they share: the first of each group is hooked for the group's Hessian.
INPUT_GROUPS = (
    ("self_attn.q_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.o_proj", ("self_attn.o_proj",)),
    ("mlp.gate_proj", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.down_proj", ("mlp.down_proj",)),
)
LINEARS = tuple(n for _, group in INPUT_GROUPS for n in group)


class UnknownArchitecture(GQSAError, ValueError):
    """An architecture no layout in gqsa_gguf/arch registers; the message lists the known ones."""


@dataclass(frozen=True)
class Hparams:
    """The hyper-parameters a decoder's GGUF metadata holds (`model_io.ModelInfo` has the same
    attribute names, so either can be written)."""

    n_layers: int
    hidden_size: int
    intermediate_size: int
    n_head: int
    n_head_kv: int
    head_dim: int
    context_length: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    vocab_size: int | None = None     # None: not written (llama.cpp counts the token list)


def rope_inv_freq(theta: float, head_dim: int):
    """Plain RoPE's inverse frequencies, float32 [head_dim/2], computed as transformers does."""
    import torch

    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim))


class DecoderLayout:
    """A pre-norm decoder of `model.layers.N` blocks (attention + gated MLP, RMSNorm, RoPE).

    Subclasses set the class attributes and override the hooks their family needs."""

    hf_architectures: tuple[str, ...] = ()   # config.json names this layout converts
    gguf_arch = ""                           # llama.cpp's LLM_ARCH name written to general.architecture
    hf_config_class = ""                     # transformers config class a GGUF of gguf_arch rebuilds to
    rebuilds_gguf = True                     # the layout model_from_gguf uses for files of gguf_arch
    rope_types: tuple[str, ...] = ("default",)
    rope_permuted = False                    # llama.cpp's graph wants q/k rotary pairs interleaved
    attention_bias = False                   # q/k/v biases
    linears = LINEARS
    input_groups = INPUT_GROUPS
    # block tensors, HF name (relative to model.layers.N) -> GGUF name (relative to blk.N), in the
    # order they are written: norms, attention, MLP
    block_tensors: dict[str, str] = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    top_tensors: dict[str, str] = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }

    @property
    def name(self) -> str:
        return self.hf_architectures[0]

    # --- config.json ------------------------------------------------------------------------------

    def check_hf_config(self, cfg: dict) -> str | None:
        """What in `cfg` this family cannot convert (beyond the common checks), or None."""
        return None

    def context_length(self, cfg: dict) -> int:
        """The context the GGUF declares (llama.cpp's n_ctx_train)."""
        return cfg["max_position_embeddings"]

    def notes(self, cfg: dict) -> list[str]:
        """Lines for the conversion summary about what this family's conversion changed."""
        return []

    # --- shapes -----------------------------------------------------------------------------------

    def linear_shape(self, hp, linear: str) -> tuple[int, int]:
        """(rows N, width K) of one of `linears` for hyper-parameters `hp` (Hparams or ModelInfo)."""
        h, i = hp.hidden_size, hp.intermediate_size
        q, kv = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
        return {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                "self_attn.o_proj": (h, q), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h),
                "mlp.down_proj": (h, i)}[linear]

    def gguf_linears(self, hp) -> list[tuple[str, int, int]]:
        """(GGUF name inside a block without '.weight', e.g. 'attn_q', rows, width) of each linear."""
        return [(self.block_tensors[f"{lin}.weight"].removesuffix(".weight"), *self.linear_shape(hp, lin))
                for lin in self.linears]

    def linear_names(self, n_layers: int) -> list[str]:
        """Full HF module names of every compressed linear, block by block."""
        return [f"model.layers.{i}.{lin}" for i in range(n_layers) for lin in self.linears]

    # --- tensor names -----------------------------------------------------------------------------

    def hf_to_gguf(self, hf: str) -> str | None:
        """HF state-dict name -> llama.cpp tensor name; None for a name this layout does not know."""
        if hf in self.top_tensors:
            return self.top_tensors[hf]
        parts = hf.split(".", 3)
        if len(parts) == 4 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
            sub = self.block_tensors.get(parts[3])
            if sub is not None:
                return f"blk.{int(parts[2])}.{sub}"
        return None

    def gguf_to_hf(self, name: str) -> str | None:
        top = {v: k for k, v in self.top_tensors.items()}
        if name in top:
            return top[name]
        parts = name.split(".", 2)
        block = {v: k for k, v in self.block_tensors.items()}
        if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in block:
            return f"model.layers.{int(parts[1])}.{block[parts[2]]}"
        return None

    def tensor_order(self, hf: str):
        """Sort key of llama.cpp's usual order: embeddings, blocks in order (attention, then MLP),
        final norm, head."""
        if hf == "model.embed_tokens.weight":
            return (0, 0, 0, "")
        parts = hf.split(".", 3)
        if len(parts) == 4 and parts[1] == "layers" and parts[2].isdigit():
            sub = parts[3]
            rank = {"input_layernorm.weight": 0, "post_attention_layernorm.weight": 200}.get(sub)
            if rank is None:
                pos = {k: i for i, k in enumerate(self.block_tensors)}.get(sub, 99)
                rank = 100 + pos if sub.startswith("self_attn") else 300 + pos
            return (1, int(parts[2]), rank, sub)
        return (2, 0, 0 if hf == "model.norm.weight" else 1, hf)

    # --- RoPE -------------------------------------------------------------------------------------

    def rope_permutation(self, hp, gguf_name: str) -> np.ndarray | None:
        """Row order W_gguf = W_hf[perm] of a q/k weight for llama.cpp's graph, or None (unchanged).

        HF stores each head's rotary pairs as (first half, second half) ("rotate_half"); a graph
        with interleaved pairs needs per head of hd rows: HF row j*hd/2 + i (j = half, i = pair) at
        row 2*i + j. The permutation reorders output rows only, and GQSA's mask and codes are per
        row, so it can be applied to compressed rows."""
        if not self.rope_permuted:
            return None
        if gguf_name.endswith(".attn_q.weight"):
            n_head = hp.n_head
        elif gguf_name.endswith(".attn_k.weight"):
            n_head = hp.n_head_kv
        else:
            return None
        return interleave_rope_rows(n_head * hp.head_dim, n_head)

    # --- GGUF metadata ----------------------------------------------------------------------------

    def write_hparams(self, g, hp, name: str | None = None) -> None:
        """Writes the hyper-parameters of `hp` (Hparams or ModelInfo) with a gguf.GGUFWriter."""
        if name is not None:
            g.add_name(name)
        g.add_context_length(hp.context_length)
        g.add_embedding_length(hp.hidden_size)
        g.add_block_count(hp.n_layers)
        g.add_feed_forward_length(hp.intermediate_size)
        g.add_head_count(hp.n_head)
        g.add_head_count_kv(hp.n_head_kv)
        g.add_rope_freq_base(hp.rope_theta)
        g.add_layer_norm_rms_eps(hp.rms_eps)
        if hp.vocab_size is not None:
            g.add_vocab_size(hp.vocab_size)
        g.add_rope_dimension_count(hp.head_dim)
        if hp.head_dim * hp.n_head != hp.hidden_size:
            g.add_key_length(hp.head_dim)
            g.add_value_length(hp.head_dim)

    def hf_config_from_gguf(self, common: dict, head_dim: int, theta: float):
        """The transformers config of a file of this layout; `common` holds the keyword arguments
        every family shares (vocab, sizes, heads, context, eps, tied head, silu)."""
        import transformers

        return getattr(transformers, self.hf_config_class)(head_dim=head_dim, rope_theta=theta, **common)


def block_tensors_with(extra: dict[str, str], after: str) -> dict[str, str]:
    """DecoderLayout.block_tensors with `extra` inserted after the HF name `after` (write order)."""
    out: dict[str, str] = {}
    for k, v in DecoderLayout.block_tensors.items():
        out[k] = v
        if k == after:
            out.update(extra)
    return out


def interleave_rope_rows(n_rows: int, n_head: int) -> np.ndarray:
    """The q/k row permutation of `DecoderLayout.rope_permutation` for n_rows rows in n_head heads."""
    if n_rows % n_head or (n_rows // n_head) % 2:
        raise ValueError(f"cannot permute {n_rows} rows into {n_head} heads of even size")
    hd = n_rows // n_head
    return np.arange(n_rows).reshape(n_head, 2, hd // 2).transpose(0, 2, 1).reshape(-1)


_BY_HF: dict[str, DecoderLayout] = {}
_BY_GGUF: dict[str, DecoderLayout] = {}


def register(cls: type[DecoderLayout]) -> type[DecoderLayout]:
    """Class decorator: makes the layout known under its HF names (and its GGUF name if it
    `rebuilds_gguf`)."""
    layout = cls()
    for hf in cls.hf_architectures:
        if hf in _BY_HF:
            raise RuntimeError(f"architecture {hf} registered twice ({type(_BY_HF[hf]).__name__}, {cls.__name__})")
        _BY_HF[hf] = layout
    if cls.rebuilds_gguf:
        if cls.gguf_arch in _BY_GGUF:
            raise RuntimeError(f"GGUF architecture {cls.gguf_arch} rebuilt by two layouts")
        _BY_GGUF[cls.gguf_arch] = layout
    return cls


def known_hf() -> list[str]:
    return sorted(_BY_HF)


def for_hf(architecture: str) -> DecoderLayout:
    """The layout of an HF architecture name; UnknownArchitecture lists the known ones."""
    return _lookup(_BY_HF, architecture, f"architecture {architecture!r} is not supported; gqsa-gguf converts "
                                         f"{', '.join(known_hf())}")


def for_gguf(gguf_arch: str) -> DecoderLayout:
    """The layout that rebuilds a GGUF of `general.architecture` gguf_arch."""
    return _lookup(_BY_GGUF, gguf_arch, f"GGUF architecture {gguf_arch!r} is not one gqsa-gguf writes "
                                        f"({', '.join(sorted(_BY_GGUF))})")


def _lookup(table: dict, key, refusal: str) -> DecoderLayout:
    if isinstance(key, str) and key in table:
        return table[key]
    raise UnknownArchitecture(refusal)


for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_m.name}")
