"""The 3-bit type gqsa3 on the Python side (docs/FORMAT.md "The 3-bit type gqsa3"): the codec's
packing and rules, the one-shot and the fake-quant layers at 3 bits, the GGUF writer and reader, and
a converted tiny model. The C side and llama.cpp are checked in tests/test_gqsa3_native.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_models
from gqsa_gguf import codec
from gqsa_gguf import format as fmt
from gqsa_gguf.config import CalibConfig, CompressionConfig, ConvertConfig
from gqsa_gguf.export import export_gguf
from gqsa_gguf.fakequant import FrozenGQSLinear, GQSLinear, PackedGQSLinear
from gqsa_gguf.gguf_io import GGUFError, GQSAWriter, add_gqsa_metadata, add_gqsa_tensor, read_gguf
from gqsa_gguf.gguf_model import model_from_gguf
from gqsa_gguf.model_io import inspect_checkpoint, load_model, rope_freq_factors
from gqsa_gguf.oneshot import (PackedLinear, _cholesky_inverse_upper, compress_linear_obs, compress_model,
                               quantize_groups_torch)

RNG = np.random.default_rng(3)


def _random_rows(n=6, groups=10, kept=6, bits=3):
    idx = np.sort(np.stack([RNG.choice(groups, kept, replace=False) for _ in range(n)]), axis=1)
    top = (1 << bits) - 1
    q = RNG.integers(0, top + 1, (n, kept, 16))
    z = RNG.integers(0, top + 1, (n, kept))
    d = RNG.uniform(1e-3, 2.0, (n, kept)).astype(np.float32)
    return idx, q, z, d


def test_pack_unpack_round_trip_and_block_size():
    idx, q, z, d = _random_rows()
    packed = codec.pack(idx, q, z, d, bits=3)
    assert packed.shape == (6, 6 * fmt.GQSA3.block_bytes) and packed.dtype == np.uint8
    i2, q2, z2, d2 = codec.unpack(packed, bits=3)
    assert (i2 == idx).all() and (q2 == q).all() and (z2 == z).all() and (d2 == d.astype(np.float16)).all()
    # the same arrays as gqsa4 are 12 bytes a block and decode to the same weights
    p4 = codec.pack(idx, q, z, d)
    assert np.array_equal(codec.dequantize(packed, 160, bits=3), codec.dequantize(p4, 160))


def test_codes_and_zero_above_seven_are_refused():
    idx, q, z, d = _random_rows()
    q[2, 1, 5] = 8
    with pytest.raises(codec.GQSAFormatError, match="outside 0..7"):
        codec.pack(idx, q, z, d, bits=3)
    idx, q, z, d = _random_rows()
    packed = codec.pack(idx, q, z, d, bits=3).copy()
    blocks = packed.view(fmt.GQSA3_BLOCK_DTYPE)
    blocks["iz"][4, 3] |= 9 << fmt.ZERO_SHIFT                    # z = 9..15: a 4-bit field, only 0..7 valid
    with pytest.raises(codec.GQSAFormatError, match="row 4 block 3: zero point 1[1-5] > 7"):
        codec.validate(packed, 160, bits=3)
    with pytest.raises(codec.GQSAFormatError, match="not a positive multiple of the 10-byte block"):
        codec.validate(packed[:, :-4], 160, bits=3)
    with pytest.raises(codec.GQSAFormatError, match="4-bit .gqsa4. or 3-bit .gqsa3. codes, not 2-bit"):
        codec.quantize_groups(np.zeros((1, 16), np.float32), bits=2)


def test_quantize_groups_is_the_spec_rule_at_seven():
    x = RNG.standard_normal((200, 16)).astype(np.float32)
    x[0] = 0
    q, z, d = codec.quantize_groups(x, bits=3)
    assert q.max() <= 7 and z.max() <= 7 and d[0] == 0 and q[0].max() == 0
    lo, hi = np.minimum(x.min(1), 0), np.maximum(x.max(1), 0)
    s = ((hi - lo) / np.float32(7)).astype(np.float32)
    assert np.array_equal(d[1:], s[1:].astype(np.float16))
    df = d.astype(np.float32)[1:]
    assert np.array_equal(z[1:], np.clip(np.rint(-lo[1:] / df), 0, 7))
    assert np.array_equal(q[1:], np.clip(np.rint(x[1:] / df[:, None]) + z[1:, None], 0, 7))
    # the one-shot's torch path is bit-exact with it
    qt, zt, dt = quantize_groups_torch(torch.from_numpy(x), bits=3)
    assert np.array_equal(qt.numpy(), q) and np.array_equal(zt.numpy(), z) and np.array_equal(dt.numpy(), d)
    # and 3-bit rounding is coarser than 4-bit on the same groups
    err3 = np.square(codec.dequantize_stored(codec.quantize_dense(x.reshape(10, 320), 3), 3) - x.reshape(10, 320))
    err4 = np.square(codec.dequantize_stored(codec.quantize_dense(x.reshape(10, 320))) - x.reshape(10, 320))
    assert err3.mean() > 2 * err4.mean()


def _obs_layer(bits):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 128, generator=g)
    X = torch.randn(512, 128, generator=g)
    H = (X.T @ X / 512).double()
    cl, rel = compress_linear_obs(W, H, 5, 0.01, "t", chol=_cholesky_inverse_upper(H, 0.01, "t"), bits=bits)
    return W, H, cl, rel


def test_obs_one_shot_at_three_bits():
    W, H, cl3, rel3 = _obs_layer(3)
    _, _, cl4, rel4 = _obs_layer(4)
    assert cl3.bits == 3 and cl3.q.max() <= 7 and cl3.z.max() <= 7
    assert cl4.q.max() > 7                                      # the 4-bit run does use the 16 levels
    assert 0 < rel4 < rel3 < 1                                   # fewer levels, more output error
    packed = cl3.packed_rows()
    assert packed.shape[1] == 5 * fmt.GQSA3.block_bytes
    assert np.array_equal(codec.dequantize(packed, 128, bits=3), cl3.dequantize().numpy())
    back = PackedLinear.of(cl3)
    assert back.bits == 3 and back.n_kept == 5
    un = back.unpack()
    assert un.bits == 3 and np.array_equal(un.q, cl3.q) and np.array_equal(un.indices, cl3.indices)


def test_fake_quant_layers_keep_three_bit_codes():
    _, _, cl, _ = _obs_layer(3)
    frozen = FrozenGQSLinear.from_compressed(cl)
    packed = PackedGQSLinear.from_packed(PackedLinear.of(cl))
    ref = cl.dequantize()
    assert frozen.bits == packed.bits == 3 and frozen.qmax == packed.qmax == 7
    assert torch.equal(frozen.dense_weight().detach(), ref) and torch.equal(packed.dense_weight().detach(), ref)
    x = torch.randn(3, 128)
    assert torch.allclose(packed(x), frozen(x), rtol=1e-5, atol=1e-5)
    # a zero trained past 7 is stored as 7 in both forms, and gets no gradient there
    with torch.no_grad():
        for m in (frozen, packed):
            m.zero[0, 0] = 9.3
    assert float(frozen.codes()[1][0, 0]) == 7 == float(packed.codes()[1][0, 0])
    packed(x).sum().backward()
    assert float(packed.zero.grad[0, 0]) == 0 and float(packed.zero.grad.abs().sum()) > 0
    back = frozen.to_compressed()
    assert back.bits == 3 and back.z.max() <= 7
    # the BQPO form rounds its float weights to 3-bit codes
    g = GQSLinear.from_oneshot(cl)
    assert g.bits == 3 and torch.equal(g.dense_weight().detach(), ref) and int(g.codes()[0].max()) <= 7
    assert g.to_frozen().bits == 3


def test_reader_refuses_a_gqsa3_tensor_in_a_four_bit_file(tmp_path):
    w = GQSAWriter("llama", '{"spec": "w3s40"}', bits=4)
    rec = add_gqsa_tensor(w.gguf, "x", codec.pack(*_random_rows(), bits=3), 160, bits=3)
    add_gqsa_metadata(w.gguf, w.config_json, w.tool_version, [rec], bits=4)
    path = tmp_path / "mixed.gguf"
    w.gguf.write_header_to_file(path)
    w.gguf.write_kv_data_to_file()
    w.gguf.write_tensors_to_file()
    w.gguf.close()
    with pytest.raises(GGUFError, match="lists 'x', which has type gqsa3.*'gqsa.bits' = 4 makes its GQSA type gqsa4"):
        read_gguf(path)
    with pytest.raises(ValueError, match="4-bit .gqsa4. or 3-bit .gqsa3. codes, not 2-bit"):
        GQSAWriter("llama", "{}", bits=2)


@pytest.fixture(scope="module")
def w3(tmp_path_factory):
    folder = tiny_models.checkpoint("llama")
    info = inspect_checkpoint(folder)
    model = load_model(info)
    windows = tiny_models.token_windows(folder, n=4, seqlen=32)
    cfg = ConvertConfig(model=str(folder), output=str(tmp_path_factory.mktemp("w3") / "m.gguf"),
                        compression=CompressionConfig.from_spec("w3s40"),
                        calib=CalibConfig(source="tiny", nsamples=4, seqlen=32))
    res = compress_model(model, info, windows, cfg.compression, progress=False)
    summary = export_gguf(cfg.output, info, model.state_dict(), res.linears, cfg,
                          rope_factors=rope_freq_factors(model, info))
    return dict(model=model, res=res, cfg=cfg, summary=summary, windows=windows)


def test_converted_file_is_gqsa3_throughout(w3):
    g = read_gguf(w3["cfg"].output)
    assert g.metadata[fmt.KEY_BITS] == 3 and g.gqsa_type is fmt.GQSA3
    assert g.gqsa and all(g.tensors[n].type_id == fmt.GGML_TYPE_GQSA3 for n in g.gqsa)
    kept = sum(g.tensors[n].ne[0] * g.tensors[n].n_rows for n in g.gqsa)
    logical = sum(r.width * g.tensors[n].n_rows for n, r in g.gqsa.items())
    # 5 bits a kept weight, metadata included: the summary's bits per weight is 5 x the kept share
    assert w3["summary"].linear_bpw == pytest.approx(5 * kept / logical)
    assert "stored as gqsa3" in w3["summary"].format()
    for cl in w3["res"].linears.values():
        assert cl.bits == 3 and cl.q.max() <= 7 and cl.z.max() <= 7


def test_file_holds_exactly_the_three_bit_weights(w3):
    m, _ = model_from_gguf(w3["cfg"].output)
    for name, cl in w3["res"].linears.items():
        assert torch.equal(m.get_submodule(name).weight.detach(), cl.dequantize()), name
    with torch.no_grad():
        a = m(input_ids=w3["windows"]).logits
        b = w3["model"](input_ids=w3["windows"]).logits
    assert float(((a - b) ** 2).sum() / (b ** 2).sum()) < 1e-5
