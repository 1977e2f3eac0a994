"""A tiny random LLaMA (width 64, 2 layers) and its one-shot GQSA result, for the training tests.

Not a test module: imported by tests/test_fakequant.py, test_bqpo.py, test_e2e.py and by the
torchrun worker tests/e2e_ddp_worker.py, so every process builds the same model from the seed.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch

WIDTH, FFN, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 128, 2, 4, 2, 256


def tiny_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=FFN, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def tiny_windows(n: int = 8, seqlen: int = 32, seed: int = 1) -> torch.LongTensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seqlen), generator=g)


def tiny_info():
    head_dim = WIDTH // HEADS
    shapes = {"self_attn.q_proj": (WIDTH, WIDTH), "self_attn.k_proj": (KV_HEADS * head_dim, WIDTH),
              "self_attn.v_proj": (KV_HEADS * head_dim, WIDTH), "self_attn.o_proj": (WIDTH, WIDTH),
              "mlp.gate_proj": (FFN, WIDTH), "mlp.up_proj": (FFN, WIDTH), "mlp.down_proj": (WIDTH, FFN)}
    return SimpleNamespace(n_layers=LAYERS, architecture="LlamaForCausalLM", linear_shape=shapes.__getitem__)


def tiny_oneshot(model, windows, spec: str = "w4s50"):
    """One-shot GQSA of a copy of `model` (the float model is left untouched): {name: CompressedLinear}."""
    from gqsa_gguf.config import CompressionConfig
    from gqsa_gguf.oneshot import compress_model

    work = copy.deepcopy(model)
    res = compress_model(work, tiny_info(), windows, CompressionConfig.from_spec(spec), progress=False)
    return res.linears


def nan_gain(model):
    """`model` with a NaN in block 0's first RMSNorm gain (in place; returns it): what makes the
    first training step's loss NaN, for the tests of the trainings' NaN/Inf guards (a NaN group
    scale is refused before training starts)."""
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[0] = float("nan")
    return model
