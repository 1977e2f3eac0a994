"""PyTorch models rebuilt from a GQSA GGUF, holding exactly its weights (for evaluation and for the
logits-agreement tests against llama.cpp).

In:  a GGUF written by `export` (read and validated by gguf_io.read_gguf).
Out: `model_from_gguf(path)` -> (transformers causal LM in float32, GGUFFile): a model of the
     layout that rebuilds the file's architecture (gqsa_gguf/arch), built from its metadata alone (no checkpoint folder needed), whose every
     parameter is the file's tensor decoded to float32 — gqsa4 linears dequantized by the NumPy
     reference codec (zeros in pruned groups), f16 / q8_0 embeddings and head decoded, permuted q/k
     rows un-permuted back to HF order, and a `rope_freqs.weight` ('llama3' RoPE scaling) applied to
     the rotary frequencies as llama.cpp applies it.

Invariants: the model's linear weights equal `CompressedLinear.dequantize()` of the conversion
bit for bit (both are (q - z) * d computed exactly in float32); every tensor of the file is used
and every parameter of the model is set, or ModelFromGGUFError names the one that is not.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from . import arch
from .gguf_io import GGUFFile, read_gguf
from .errors import GQSAError

__all__ = ["ModelFromGGUFError", "hf_config_from_gguf", "model_from_gguf"]


class ModelFromGGUFError(GQSAError, ValueError):
    """The GGUF does not describe a model this module can rebuild."""


def _meta(g: GGUFFile, key: str, kind=(int,)):
    if key not in g.metadata:
        raise ModelFromGGUFError(f"{g.path}: metadata '{key}' is missing — not a GGUF gqsa-gguf writes")
    v = g.metadata[key]
    if not isinstance(v, kind):
        raise ModelFromGGUFError(f"{g.path}: metadata '{key}' = {v!r} has the wrong type")
    return v


def hf_config_from_gguf(g: GGUFFile):
    """The transformers config of the model a GGUF of gqsa-gguf describes."""
    return _layout_and_config(g)[1]


def _layout_and_config(g: GGUFFile):
    """(layout, transformers config) of the file's architecture."""
    name = _meta(g, "general.architecture", (str,))
    try:
        layout = arch.for_gguf(name)
    except arch.UnknownArchitecture as e:
        raise ModelFromGGUFError(f"{g.path}: {e}") from None
    n_head = _meta(g, f"{name}.attention.head_count")
    hidden = _meta(g, f"{name}.embedding_length")
    head_dim = g.metadata.get(f"{name}.attention.key_length") or g.metadata.get(f"{name}.rope.dimension_count") \
        or hidden // n_head
    vocab = g.metadata.get(f"{name}.vocab_size") or len(g.metadata.get("tokenizer.ggml.tokens", []))
    common = dict(
        vocab_size=int(vocab), hidden_size=hidden, intermediate_size=_meta(g, f"{name}.feed_forward_length"),
        num_hidden_layers=_meta(g, f"{name}.block_count"), num_attention_heads=n_head,
        num_key_value_heads=_meta(g, f"{name}.attention.head_count_kv"),
        max_position_embeddings=_meta(g, f"{name}.context_length"),
        rms_norm_eps=float(_meta(g, f"{name}.attention.layer_norm_rms_epsilon", (float,))),
        tie_word_embeddings="output.weight" not in g.tensors, hidden_act="silu",
    )
    theta = float(_meta(g, f"{name}.rope.freq_base", (float,)))
    cfg = layout.hf_config_from_gguf(common, int(head_dim), theta)
    # transformers >= 5 moved rope_theta into rope_parameters; set both spellings where present
    if getattr(cfg, "rope_parameters", None) is not None:
        cfg.rope_parameters = {**cfg.rope_parameters, "rope_theta": theta, "rope_type": "default"}
    return layout, cfg


def model_from_gguf(path: str | os.PathLike):
    """(model, GGUFFile): a float32 PyTorch model holding exactly the file's weights."""
    import transformers

    g = read_gguf(path)
    layout, cfg = _layout_and_config(g)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.eval()
    hp = arch.Hparams(n_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
                      intermediate_size=cfg.intermediate_size, n_head=cfg.num_attention_heads,
                      n_head_kv=cfg.num_key_value_heads, head_dim=_head_dim(cfg),
                      context_length=cfg.max_position_embeddings)
    state = {}
    rope_freqs = None
    for name, t in g.tensors.items():
        if name == "rope_freqs.weight":
            rope_freqs = torch.from_numpy(np.array(g.tensor_array(name), dtype=np.float32, copy=True))
            continue
        hf = layout.gguf_to_hf(name)
        if hf is None:
            raise ModelFromGGUFError(f"{g.path}: tensor '{name}' is not part of the {layout.gguf_arch} layout "
                                     f"gqsa-gguf writes")
        arr = np.asarray(g.tensor_array(name), dtype=np.float32)
        perm = layout.rope_permutation(hp, name)
        if perm is not None:
            arr = arr[np.argsort(perm)]
        state[hf] = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")
               and not m.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ModelFromGGUFError(f"{g.path}: the file's tensors do not fit the model: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    if rope_freqs is not None:
        # llama.cpp divides each rotary frequency by its factor; do the same to the plain frequencies
        rot = model.model.rotary_emb
        plain = arch.rope_inv_freq(float(g.metadata[f"{layout.gguf_arch}.rope.freq_base"]), rope_freqs.shape[0] * 2)
        if tuple(rot.inv_freq.shape) != tuple(plain.shape):
            raise ModelFromGGUFError(f"{g.path}: rope_freqs.weight has {rope_freqs.shape[0]} factors, the model "
                                     f"{rot.inv_freq.shape[0]} frequencies")
        rot.inv_freq = plain / rope_freqs
        rot.original_inv_freq = rot.inv_freq
    return model, g


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
