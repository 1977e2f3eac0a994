"""PyTorch models rebuilt from a GQSA GGUF, holding exactly its weights (for evaluation and for the
logits-agreement tests against llama.cpp).

In:  a GGUF written by `export` (read and validated by gguf_io.read_gguf).
Out: `model_from_gguf(path)` -> (transformers causal LM in float32, GGUFFile): a LLaMA / Qwen2 model
     built from the file's architecture metadata alone (no checkpoint folder needed), whose every
     parameter is the file's tensor decoded to float32 — gqsa4 linears dequantized by the NumPy
     reference codec (zeros in pruned groups), f16 / q8_0 embeddings and head decoded, LLaMA q/k
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

from .export import gguf_to_hf_name, llama_rope_permutation, needs_rope_permutation
from .gguf_io import GGUFFile, read_gguf

__all__ = ["ModelFromGGUFError", "hf_config_from_gguf", "model_from_gguf"]


class ModelFromGGUFError(ValueError):
    """The GGUF does not describe a model this module can rebuild."""


def _meta(g: GGUFFile, key: str, kind=(int,)):
    if key not in g.metadata:
        raise ModelFromGGUFError(f"{g.path}: metadata '{key}' is missing — not a llama/qwen2 GGUF of gqsa-gguf")
    v = g.metadata[key]
    if not isinstance(v, kind):
        raise ModelFromGGUFError(f"{g.path}: metadata '{key}' = {v!r} has the wrong type")
    return v


def hf_config_from_gguf(g: GGUFFile):
    """The transformers config of the model a llama/qwen2 GGUF describes."""
    import transformers

    arch = _meta(g, "general.architecture", (str,))
    if arch not in ("llama", "qwen2"):
        raise ModelFromGGUFError(f"{g.path}: architecture '{arch}' is not llama or qwen2")
    n_head = _meta(g, f"{arch}.attention.head_count")
    hidden = _meta(g, f"{arch}.embedding_length")
    head_dim = g.metadata.get(f"{arch}.attention.key_length") or g.metadata.get(f"{arch}.rope.dimension_count") \
        or hidden // n_head
    vocab = g.metadata.get(f"{arch}.vocab_size") or len(g.metadata.get("tokenizer.ggml.tokens", []))
    common = dict(
        vocab_size=int(vocab), hidden_size=hidden, intermediate_size=_meta(g, f"{arch}.feed_forward_length"),
        num_hidden_layers=_meta(g, f"{arch}.block_count"), num_attention_heads=n_head,
        num_key_value_heads=_meta(g, f"{arch}.attention.head_count_kv"),
        max_position_embeddings=_meta(g, f"{arch}.context_length"),
        rms_norm_eps=float(_meta(g, f"{arch}.attention.layer_norm_rms_epsilon", (float,))),
        tie_word_embeddings="output.weight" not in g.tensors, hidden_act="silu",
    )
    theta = float(_meta(g, f"{arch}.rope.freq_base", (float,)))
    if arch == "llama":
        cfg = transformers.LlamaConfig(head_dim=int(head_dim), rope_theta=theta, **common)
    else:
        cfg = transformers.Qwen2Config(rope_theta=theta, use_sliding_window=False, **common)
    # transformers >= 5 moved rope_theta into rope_parameters; set both spellings where present
    if getattr(cfg, "rope_parameters", None) is not None:
        cfg.rope_parameters = {**cfg.rope_parameters, "rope_theta": theta, "rope_type": "default"}
    return cfg


def model_from_gguf(path: str | os.PathLike):
    """(model, GGUFFile): a float32 PyTorch model holding exactly the file's weights."""
    import transformers

    g = read_gguf(path)
    cfg = hf_config_from_gguf(g)
    arch = g.metadata["general.architecture"]
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.eval()
    state = {}
    rope_freqs = None
    for name, t in g.tensors.items():
        if name == "rope_freqs.weight":
            rope_freqs = torch.from_numpy(np.array(g.tensor_array(name), dtype=np.float32, copy=True))
            continue
        hf = gguf_to_hf_name(name)
        arr = np.asarray(g.tensor_array(name), dtype=np.float32)
        if needs_rope_permutation(arch, name):
            n_head = cfg.num_attention_heads if name.endswith(".attn_q.weight") else cfg.num_key_value_heads
            arr = arr[np.argsort(llama_rope_permutation(arr.shape[0], n_head))]
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
        hd = rope_freqs.shape[0] * 2
        plain = 1.0 / (float(g.metadata[f"{arch}.rope.freq_base"])
                       ** (torch.arange(0, hd, 2, dtype=torch.int64).to(torch.float32) / hd))
        if tuple(rot.inv_freq.shape) != tuple(plain.shape):
            raise ModelFromGGUFError(f"{g.path}: rope_freqs.weight has {rope_freqs.shape[0]} factors, the model "
                                     f"{rot.inv_freq.shape[0]} frequencies")
        rot.inv_freq = plain / rope_freqs
        rot.original_inv_freq = rot.inv_freq
    return model, g
