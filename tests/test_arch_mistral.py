"""Mistral (gqsa_gguf/arch/mistral.py): a tiny random MistralForCausalLM with a sliding window goes
through convert -> the patched llama.cpp and matches PyTorch's logits; the file is a `llama` GGUF
declaring the window as its context, and the LLaMA it rebuilds to computes what Mistral computes.

Needs the patched native libraries (fails, never skips, without them: tests/conftest.py)."""

import json

import pytest
import torch

import tiny_models
from gqsa_gguf import arch
from gqsa_gguf.cli import main
from gqsa_gguf.gguf_io import read_gguf
from gqsa_gguf.gguf_model import model_from_gguf

WINDOW = 48          # < max_position_embeddings (256): the file must declare 48 tokens of context


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tiny_models.checkpoint("MistralForCausalLM", config={"sliding_window": WINDOW}, train_steps=300,
                                    group_sparsity=0.5)
    out = tmp_path_factory.mktemp("mistral") / "mistral.gguf"
    assert main(["convert", str(folder), "-o", str(out), "--gqsa", "w4s50", "--calib",
                 str(tiny_models.calib_file(folder)), "--nsamples", "8", "--seqlen", str(WINDOW), "-q"]) == 0
    return folder, out


def test_mistral_is_a_llama_layout_with_its_window_as_context():
    layout = arch.for_hf("MistralForCausalLM")
    assert layout.gguf_arch == "llama" and layout.rope_permuted and not layout.attention_bias
    assert arch.for_gguf("llama") is arch.for_hf("LlamaForCausalLM")       # files rebuild as LLaMA
    cfg = {"max_position_embeddings": 32768, "sliding_window": 4096}
    assert layout.context_length(cfg) == 4096 and "4096-token context" in layout.notes(cfg)[0]
    for full in ({"max_position_embeddings": 4096, "sliding_window": None},
                 {"max_position_embeddings": 4096, "sliding_window": 4096}):
        assert layout.context_length(full) == 4096 and layout.notes(full) == []
    assert "sliding_window" in layout.check_hf_config({"sliding_window": -1})


def test_file_is_llama_with_the_window_as_context(converted):
    folder, out = converted
    m = read_gguf(out).metadata
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["MistralForCausalLM"]
    assert m["general.architecture"] == "llama" and m["llama.context_length"] == WINDOW
    assert "llama.attention.sliding_window" not in m      # the pinned llama graph reads no such key


def test_rebuilt_llama_computes_what_mistral_computes(converted):
    import transformers

    folder, out = converted
    llama, _ = model_from_gguf(out)
    mistral = transformers.MistralForCausalLM(transformers.AutoConfig.from_pretrained(str(folder)))
    mistral.load_state_dict(llama.state_dict())
    mistral.eval()
    windows = tiny_models.token_windows(folder, n=4, seqlen=WINDOW)
    with torch.no_grad():
        torch.testing.assert_close(llama(input_ids=windows).logits, mistral(input_ids=windows).logits,
                                   rtol=1e-5, atol=1e-5)


def test_logits_agree_with_pytorch(llama_cpp, converted):
    folder, out = converted
    nmse, top1 = tiny_models.logits_agreement(llama_cpp, out, tiny_models.token_windows(folder, n=8, seqlen=WINDOW))
    assert nmse <= 1e-3, f"logits NMSE {nmse:.2e} > 1e-3"
    assert top1 >= 0.99, f"top-1 agreement {top1:.4f} < 0.99"
