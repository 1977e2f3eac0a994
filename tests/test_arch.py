"""gqsa_gguf/arch: the registry and what every DecoderLayout answers (fast tier: no model, no native
build). Parametrized over every registered layout, so a new architecture file is covered here too."""

import numpy as np
import pytest

from gqsa_gguf import arch, codec
from gqsa_gguf.gguf_io import GQSAWriter, read_gguf

LAYOUTS = [arch.for_hf(n) for n in arch.known_hf()]
HP = arch.Hparams(n_layers=2, hidden_size=64, intermediate_size=128, n_head=4, n_head_kv=2, head_dim=32,
                  context_length=256, rope_theta=500000.0, rms_eps=1e-6, vocab_size=300)


def test_llama_and_qwen2_are_registered_and_rebuild_their_files():
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM"} <= set(arch.known_hf())
    assert arch.for_gguf("llama") is arch.for_hf("LlamaForCausalLM")
    assert arch.for_gguf("qwen2") is arch.for_hf("Qwen2ForCausalLM")
    for layout in LAYOUTS:                 # every GGUF name written can be rebuilt
        assert arch.for_gguf(layout.gguf_arch).gguf_arch == layout.gguf_arch


def test_unknown_architecture_is_refused_with_the_known_ones():
    with pytest.raises(arch.UnknownArchitecture) as e:
        arch.for_hf("GPT2LMHeadModel")
    assert "'GPT2LMHeadModel' is not supported" in str(e.value)
    for name in arch.known_hf():
        assert name in str(e.value)
    with pytest.raises(arch.UnknownArchitecture, match="'gpt2' is not one gqsa-gguf writes"):
        arch.for_gguf("gpt2")


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.name)
def test_tensor_names_round_trip(layout):
    names = list(layout.top_tensors) + [f"model.layers.{i}.{sub}" for i in (0, 11) for sub in layout.block_tensors]
    gguf = [layout.hf_to_gguf(n) for n in names]
    assert len(set(gguf)) == len(gguf) and all(g is not None for g in gguf)
    assert [layout.gguf_to_hf(g) for g in gguf] == names
    assert layout.hf_to_gguf("model.layers.0.self_attn.q_proj.weight") == "blk.0.attn_q.weight"
    assert layout.hf_to_gguf("model.layers.3.mlp.down_proj.weight") == "blk.3.ffn_down.weight"
    assert layout.hf_to_gguf("model.layers.0.mlp.extra_proj.weight") is None
    assert layout.gguf_to_hf("blk.0.attn_qkv.weight") is None


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.name)
def test_write_order_is_llama_cpps(layout):
    block = [f"model.layers.1.{sub}" for sub in layout.block_tensors]
    state = ["lm_head.weight", "model.norm.weight", *block[::-1], "model.embed_tokens.weight",
             "model.layers.0.input_layernorm.weight"]
    order = [layout.hf_to_gguf(n) for n in sorted(state, key=layout.tensor_order)]
    assert order[:2] == ["token_embd.weight", "blk.0.attn_norm.weight"]
    assert order[-2:] == ["output_norm.weight", "output.weight"]
    blk = [n.split(".", 2)[2] for n in order[2:-2]]
    assert blk[0] == "attn_norm.weight" and "ffn_norm.weight" in blk
    cut = blk.index("ffn_norm.weight")
    assert all(n.startswith("attn_") for n in blk[:cut]) and all(n.startswith("ffn_") for n in blk[cut:])
    assert blk.index("attn_q.weight") < blk.index("attn_k.weight") < blk.index("attn_v.weight") \
        < blk.index("attn_output.weight")


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.name)
def test_linears_shapes_and_input_groups(layout):
    assert layout.linears == tuple(n for _, grp in layout.input_groups for n in grp)
    assert all(hooked == grp[0] for hooked, grp in layout.input_groups)
    assert layout.gguf_linears(HP) == [("attn_q", 128, 64), ("attn_k", 64, 64), ("attn_v", 64, 64),
                                       ("attn_output", 64, 128), ("ffn_gate", 128, 64), ("ffn_up", 128, 64),
                                       ("ffn_down", 64, 128)]
    assert layout.linear_names(2)[7] == "model.layers.1.self_attn.q_proj"


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.name)
def test_rope_permutation_only_where_the_graph_interleaves(layout):
    q = layout.rope_permutation(HP, "blk.0.attn_q.weight")
    k = layout.rope_permutation(HP, "blk.0.attn_k.weight")
    assert layout.rope_permutation(HP, "blk.0.attn_v.weight") is None
    if not layout.rope_permuted:
        assert q is None and k is None
        return
    np.testing.assert_array_equal(q, arch.interleave_rope_rows(HP.n_head * HP.head_dim, HP.n_head))
    np.testing.assert_array_equal(k, arch.interleave_rope_rows(HP.n_head_kv * HP.head_dim, HP.n_head_kv))
    # head 0: HF rows (0, 16), (1, 17), ... become adjacent pairs
    np.testing.assert_array_equal(q[:6], [0, 16, 1, 17, 2, 18])


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.name)
def test_hparams_written_and_read_back(layout, tmp_path):
    w = GQSAWriter(layout.gguf_arch, "{}")
    layout.write_hparams(w.gguf, HP, name="tiny")
    w.add_gqsa_tensor("blk.0.attn_q.weight", codec.quantize(np.ones((1, 16), np.float32), np.zeros((1, 1), int)), 16)
    m = read_gguf(w.write(tmp_path / "h.gguf")).metadata
    a = layout.gguf_arch
    assert m["general.architecture"] == a and m["general.name"] == "tiny"
    assert (m[f"{a}.block_count"], m[f"{a}.embedding_length"], m[f"{a}.feed_forward_length"]) == (2, 64, 128)
    assert (m[f"{a}.attention.head_count"], m[f"{a}.attention.head_count_kv"]) == (4, 2)
    assert (m[f"{a}.context_length"], m[f"{a}.vocab_size"], m[f"{a}.rope.dimension_count"]) == (256, 300, 32)
    assert m[f"{a}.rope.freq_base"] == 500000.0 and m[f"{a}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    # head_dim * n_head (128) != hidden (64): the key/value lengths say so
    assert (m[f"{a}.attention.key_length"], m[f"{a}.attention.value_length"]) == (32, 32)


def test_rope_inv_freq_is_transformers_plain_rope():
    got = arch.rope_inv_freq(10000.0, 8).numpy()
    np.testing.assert_allclose(got, 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8), rtol=1e-6)
    assert got.dtype == np.float32
