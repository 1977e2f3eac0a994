"""Qwen3 (gqsa_gguf/arch/qwen3.py): a tiny random Qwen3ForCausalLM (q/k RMSNorm, no attention bias,
head_dim * heads != hidden) goes through convert -> the patched llama.cpp and matches PyTorch's
logits; the file is a `qwen3` GGUF with the q/k norms in f32 and no biases.

Needs the patched native libraries (fails, never skips, without them: tests/conftest.py)."""

import numpy as np
import pytest

import tiny_models
from gqsa_gguf import arch
from gqsa_gguf.cli import main
from gqsa_gguf.gguf_io import read_gguf
from gqsa_gguf.model_io import inspect_checkpoint, load_model

HEAD_DIM = 32        # 4 heads x 32 = 128 != hidden 64: the key/value lengths must be written


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tiny_models.checkpoint("Qwen3ForCausalLM", config={"head_dim": HEAD_DIM, "rope_theta": 1000000.0},
                                    tokenizer="qwen2", pad_vocab=16, train_steps=300, group_sparsity=0.5)
    out = tmp_path_factory.mktemp("qwen3") / "qwen3.gguf"
    assert main(["convert", str(folder), "-o", str(out), "--gqsa", "w4s50", "--calib",
                 str(tiny_models.calib_file(folder)), "--nsamples", "8", "--seqlen", "64",
                 "--e2e-epochs", "0", "-q"]) == 0        # one-shot: the norm gains stay the checkpoint's
    return folder, out


def test_qwen3_layout():
    layout = arch.for_hf("Qwen3ForCausalLM")
    assert arch.for_gguf("qwen3") is layout and not layout.rope_permuted and not layout.attention_bias
    assert layout.hf_to_gguf("model.layers.2.self_attn.q_norm.weight") == "blk.2.attn_q_norm.weight"
    assert layout.hf_to_gguf("model.layers.2.self_attn.k_norm.weight") == "blk.2.attn_k_norm.weight"
    assert layout.hf_to_gguf("model.layers.2.self_attn.q_proj.bias") is None
    assert "attention_bias" in layout.check_hf_config({"attention_bias": True})


def test_file_holds_qk_norms_and_no_biases(converted):
    folder, out = converted
    g = read_gguf(out)
    m = g.metadata
    assert m["general.architecture"] == "qwen3" and m["qwen3.attention.key_length"] == HEAD_DIM
    assert m["qwen3.rope.freq_base"] == 1000000.0 and m["tokenizer.ggml.pre"] == "qwen2"
    assert not any(n.endswith(".bias") for n in g.tensors)
    state = load_model(inspect_checkpoint(folder)).state_dict()
    for i in range(tiny_models.LAYERS):
        for w in ("q", "k"):
            got = g.tensor_array(f"blk.{i}.attn_{w}_norm.weight")
            assert got.dtype == np.float32 and got.shape == (HEAD_DIM,)
            np.testing.assert_array_equal(got, state[f"model.layers.{i}.self_attn.{w}_norm.weight"].numpy())


def test_logits_agree_with_pytorch(llama_cpp, converted):
    folder, out = converted
    nmse, top1 = tiny_models.logits_agreement(llama_cpp, out, tiny_models.token_windows(folder, n=8, seqlen=64))
    assert nmse <= 1e-3, f"logits NMSE {nmse:.2e} > 1e-3"
    assert top1 >= 0.99, f"top-1 agreement {top1:.4f} < 0.99"
