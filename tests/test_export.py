"""GGUF export of tiny LLaMA and Qwen2 checkpoints: tensor set, shapes, metadata, tokenizer,
LLaMA q/k row permutation, and the PyTorch model rebuilt from the file."""

import json

import numpy as np
import pytest
import torch

import tiny_models
from gqsa_gguf import arch
from gqsa_gguf import format as fmt
from gqsa_gguf.arch import interleave_rope_rows
from gqsa_gguf.cli import main
from gqsa_gguf.config import CalibConfig, CompressionConfig, ConvertConfig, ExportConfig
from gqsa_gguf.export import ExportError, export_gguf, hf_to_gguf_name
from gqsa_gguf.gguf_io import read_gguf
from gqsa_gguf.gguf_model import model_from_gguf
from gqsa_gguf.model_io import ModelError, inspect_checkpoint, load_model, rope_freq_factors
from gqsa_gguf.oneshot import compress_model
from gqsa_gguf.vocab import VocabError, detect_pre_tokenizer

LINEARS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
           "ffn_down": "mlp.down_proj"}


def _convert(kind, tmp_path_factory, spec="w4s50", dense="f16", **ck):
    folder = tiny_models.checkpoint(kind, **ck)
    info = inspect_checkpoint(folder)
    model = load_model(info)
    float_state = {k: v.clone() for k, v in model.state_dict().items()}
    windows = tiny_models.token_windows(folder, n=4, seqlen=32)
    cfg = ConvertConfig(model=str(folder), output=str(tmp_path_factory.mktemp(kind) / "m.gguf"),
                        compression=CompressionConfig.from_spec(spec),
                        calib=CalibConfig(source="tiny", nsamples=4, seqlen=32),
                        export=ExportConfig(dense_type=dense))
    res = compress_model(model, info, windows, cfg.compression, progress=False)
    summary = export_gguf(cfg.output, info, model.state_dict(), res.linears, cfg,
                          rope_factors=rope_freq_factors(model, info))
    return dict(folder=folder, info=info, model=model, float_state=float_state, res=res, cfg=cfg,
                summary=summary, g=read_gguf(cfg.output), windows=windows)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _convert("llama", tmp_path_factory)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return _convert("qwen2", tmp_path_factory, pad_vocab=16)


def _expected_names(info):
    names = {"token_embd.weight", "output_norm.weight"}
    if not info.tie_embeddings:
        names.add("output.weight")
    for i in range(info.n_layers):
        names |= {f"blk.{i}.attn_norm.weight", f"blk.{i}.ffn_norm.weight"}
        names |= {f"blk.{i}.{t}.weight" for t in LINEARS}
        if info.attention_bias:
            names |= {f"blk.{i}.attn_{t}.bias" for t in "qkv"}
    return names


@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_tensor_set_types_and_shapes(which, request):
    d = request.getfixturevalue(which)
    g, info = d["g"], d["info"]
    assert set(g.tensors) == _expected_names(info)
    assert set(g.gqsa) == {f"blk.{i}.{t}.weight" for i in range(info.n_layers) for t in LINEARS}
    for i in range(info.n_layers):
        for t, lin in LINEARS.items():
            name = f"blk.{i}.{t}.weight"
            rows, width = info.linear_shape(lin)
            n_kept = fmt.kept_groups(width, 0.5)
            ti = g.tensors[name]
            assert ti.type_id == fmt.GGML_TYPE_GQSA4 and ti.ne == (n_kept * 16, rows)
            assert g.gqsa[name].width == width and g.gqsa[name].sparsity == 1 - n_kept / (width // 16)
    emb = g.tensors["token_embd.weight"]
    assert emb.type_name == "F16" and emb.ne == (info.hidden_size, info.vocab_size)
    assert g.tensors["output_norm.weight"].type_name == "F32"
    if not info.tie_embeddings:
        assert g.tensors["output.weight"].ne == (info.hidden_size, info.vocab_size)


@pytest.mark.parametrize("which,pre", [("llama", "llama-bpe"), ("qwen2", "qwen2")])
def test_metadata_and_tokenizer(which, pre, request):
    d = request.getfixturevalue(which)
    g, info, cfg = d["g"], d["info"], d["cfg"]
    m = g.metadata
    arch = info.gguf_arch
    assert m["general.architecture"] == arch
    assert m[f"{arch}.block_count"] == info.n_layers
    assert m[f"{arch}.context_length"] == info.context_length
    assert m[f"{arch}.embedding_length"] == info.hidden_size
    assert m[f"{arch}.feed_forward_length"] == info.intermediate_size
    assert m[f"{arch}.attention.head_count"] == info.n_head
    assert m[f"{arch}.attention.head_count_kv"] == info.n_head_kv
    assert m[f"{arch}.rope.dimension_count"] == info.head_dim
    assert m[f"{arch}.vocab_size"] == info.vocab_size
    assert m[f"{arch}.rope.freq_base"] == pytest.approx(info.rope_theta)
    assert m[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(info.rms_eps)
    assert m["tokenizer.ggml.model"] == "gpt2" and m["tokenizer.ggml.pre"] == pre
    toks = m["tokenizer.ggml.tokens"]
    assert len(toks) == info.vocab_size and toks[:3] == tiny_models.SPECIALS
    types = np.asarray(m["tokenizer.ggml.token_type"])
    assert (types[:3] == 3).all() and (types[3:len(toks) - 16] == 1).all()     # CONTROL, then NORMAL
    if which == "qwen2":                                                       # padded vocabulary rows
        assert toks[-1] == f"[PAD{info.vocab_size - 1}]" and (types[-16:] == 5).all()
    assert len(m["tokenizer.ggml.merges"]) > 10
    assert m["tokenizer.ggml.bos_token_id"] == 0 and m["tokenizer.ggml.eos_token_id"] == 2
    assert m["tokenizer.ggml.add_bos_token"] is False
    assert m["tokenizer.chat_template"] == tiny_models.CHATML
    assert ConvertConfig.from_json(m[fmt.KEY_CONFIG]) == cfg
    assert json.loads(m[fmt.KEY_CONFIG])["compression"]["spec"] == "w4s50"


def test_llama_q_k_rows_are_rope_permuted(llama):
    g, info, res = llama["g"], llama["info"], llama["res"]
    for i in range(info.n_layers):
        for t, lin, heads in (("attn_q", "self_attn.q_proj", info.n_head), ("attn_k", "self_attn.k_proj", info.n_head_kv),
                              ("attn_v", "self_attn.v_proj", None), ("ffn_up", "mlp.up_proj", None)):
            hf = res.linears[f"model.layers.{i}.{lin}"].dequantize().numpy()
            got = g.tensor_array(f"blk.{i}.{t}.weight")
            want = hf[interleave_rope_rows(hf.shape[0], heads)] if heads else hf
            np.testing.assert_array_equal(got, want)


def test_qwen2_q_k_rows_are_not_permuted(qwen2):
    g, res = qwen2["g"], qwen2["res"]
    for t, lin in (("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj")):
        np.testing.assert_array_equal(g.tensor_array(f"blk.0.{t}.weight"),
                                      res.linears[f"model.layers.0.{lin}"].dequantize().numpy())
    np.testing.assert_array_equal(g.tensor_array("blk.1.attn_q.bias"),
                                  qwen2["float_state"]["model.layers.1.self_attn.q_proj.bias"].numpy())


def _rope_half(x, pos, base):          # HF: rotate_half pairs (i, i + hd/2)
    hd = x.shape[-1]
    inv = base ** (-np.arange(0, hd, 2) / hd)
    c, s = np.cos(pos * inv), np.sin(pos * inv)
    a, b = x[: hd // 2], x[hd // 2:]
    return np.concatenate([a * c - b * s, b * c + a * s])


def _rope_interleaved(x, pos, base):   # llama.cpp's LLaMA rope: pairs (2i, 2i + 1)
    hd = x.shape[-1]
    inv = base ** (-np.arange(0, hd, 2) / hd)
    c, s = np.cos(pos * inv), np.sin(pos * inv)
    a, b = x[0::2], x[1::2]
    out = np.empty_like(x)
    out[0::2], out[1::2] = a * c - b * s, b * c + a * s
    return out


def test_permutation_turns_hf_rope_into_llama_cpp_rope():
    n_head, hd = 3, 8
    perm = interleave_rope_rows(n_head * hd, n_head)
    rng = np.random.default_rng(0)
    q_hf = rng.standard_normal(n_head * hd)                # one projected vector, HF row order
    q_gguf = q_hf[perm]
    for pos in (0, 1, 7, 100):
        for h in range(n_head):
            hf = _rope_half(q_hf[h * hd:(h + 1) * hd], pos, 10000.0)
            cpp = _rope_interleaved(q_gguf[h * hd:(h + 1) * hd], pos, 10000.0)
            np.testing.assert_allclose(cpp, hf[perm[h * hd:(h + 1) * hd] - h * hd], rtol=1e-12)


@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_model_from_gguf_holds_exactly_the_compressed_weights(which, request):
    d = request.getfixturevalue(which)
    m, _ = model_from_gguf(d["cfg"].output)
    ref = d["model"]                                        # float model with fake-quant linears installed
    for name, p in ref.state_dict().items():
        got = m.state_dict()[name]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(got, p.to(torch.float16).to(torch.float32)), name   # stored as f16
        else:
            assert torch.equal(got, p), name
    with torch.no_grad():
        a = m(input_ids=d["windows"]).logits
        b = ref(input_ids=d["windows"]).logits
    assert ((a - b) ** 2).sum() / (b ** 2).sum() < 1e-5


def test_bits_per_weight_and_summary(llama, tmp_path_factory):
    s = llama["summary"]
    assert s.linear_bpw == pytest.approx(3.0) and s.linear_bpw <= 3.0
    text = s.format()
    for needle in ("blk.0.attn_q.weight", "gqsa4", "rope-permuted rows", "3.000 bits per weight", "not compressed",
                   "tied to token_embd.weight", "token_embd.weight: embedding lookup", "RMSNorm"):
        assert needle in text, needle
    d75 = _convert("llama", tmp_path_factory, spec="w4s75")
    assert d75["summary"].linear_bpw == pytest.approx(1.5)


def test_q8_0_dense_type(tmp_path_factory):
    d = _convert("qwen2", tmp_path_factory, dense="q8_0", pad_vocab=16)
    g = d["g"]
    for name, hf in (("token_embd.weight", "model.embed_tokens.weight"), ("output.weight", "lm_head.weight")):
        assert g.tensors[name].type_name == "Q8_0"
        ref = d["float_state"][hf].numpy()
        got = g.tensor_array(name)
        assert np.abs(got - ref).max() <= np.abs(ref).max(axis=1, keepdims=True).max() / 127 + 1e-6
    assert "stored as q8_0" in d["summary"].format()


def test_cli_convert_prints_the_summary(tmp_path, capsys):
    folder = tiny_models.checkpoint("qwen2", pad_vocab=16)
    out = tmp_path / "q.gguf"
    rc = main(["convert", str(folder), "-o", str(out), "--gqsa", "w4s75", "--calib", str(tiny_models.calib_file(folder)),
               "--nsamples", "4", "--seqlen", "32", "-q"])
    text = capsys.readouterr().out
    assert rc == 0 and out.is_file()
    assert "1.500 bits per weight" in text and "pre-tokenizer 'qwen2' (detected)" in text
    assert read_gguf(out).gqsa_config["compression"]["spec"] == "w4s75"


def test_tokenizer_pre_override(tmp_path):
    folder = tiny_models.checkpoint("llama")
    out = tmp_path / "o.gguf"
    assert main(["convert", str(folder), "-o", str(out), "--calib", str(tiny_models.calib_file(folder)),
                 "--nsamples", "2", "--seqlen", "16", "--tokenizer-pre", "smaug-bpe", "-q"]) == 0
    assert read_gguf(out).metadata["tokenizer.ggml.pre"] == "smaug-bpe"


def test_pre_tokenizer_detection():
    bl = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    smollm = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, bl]}}
    assert detect_pre_tokenizer(smollm) == "smollm"
    assert detect_pre_tokenizer({"pre_tokenizer": bl}) == "gpt-2"
    odd = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\p{N}{1,2}"}, "behavior": "Isolated"}, dict(bl, use_regex=False)]}}
    with pytest.raises(VocabError, match="--tokenizer-pre"):
        detect_pre_tokenizer(odd)
    with pytest.raises(VocabError, match="--tokenizer-pre"):
        detect_pre_tokenizer({"pre_tokenizer": None})


def test_unknown_tensor_is_refused(llama, tmp_path):
    with pytest.raises(ExportError, match="no llama.cpp counterpart"):
        hf_to_gguf_name(arch.for_hf("LlamaForCausalLM"), "model.layers.0.self_attn.rotary_extra.weight")
    state = dict(llama["model"].state_dict())
    state["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(4, 4)
    with pytest.raises(ExportError, match="extra_proj"):
        export_gguf(tmp_path / "x.gguf", llama["info"], state, llama["res"].linears, llama["cfg"])
    assert not (tmp_path / "x.gguf").exists()


def test_llama3_rope_scaling_writes_rope_freqs(tmp_path_factory):
    d = _convert("llama", tmp_path_factory, llama3_rope=True)
    g, info, model = d["g"], d["info"], d["model"]
    assert info.rope_type == "llama3"
    factors = g.tensor_array("rope_freqs.weight")
    assert factors.shape == (info.head_dim // 2,) and factors[0] == 1.0 and factors[-1] == 8.0
    np.testing.assert_array_equal(factors, rope_freq_factors(model, info))
    assert "rope_freqs.weight" in d["summary"].format()
    m, _ = model_from_gguf(d["cfg"].output)
    torch.testing.assert_close(m.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    windows = tiny_models.token_windows(d["folder"], n=2, seqlen=96)      # well past the original 32
    with torch.no_grad():
        a, b = m(input_ids=windows).logits, model(input_ids=windows).logits
    assert ((a - b) ** 2).sum() / (b ** 2).sum() < 1e-5


def test_unsupported_rope_scaling_is_refused(tmp_path):
    folder = tiny_models.make_checkpoint(tmp_path / "yarn", "llama")
    cj = json.loads((folder / "config.json").read_text())
    cj["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (folder / "config.json").write_text(json.dumps(cj))
    with pytest.raises(ModelError, match="RoPE scaling type 'yarn' is not supported"):
        inspect_checkpoint(folder)
