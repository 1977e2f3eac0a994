"""Fake-quant layers vs the NumPy reference codec: bit-exact with what the GGUF stores."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gqsa_gguf import codec, format as fmt
from gqsa_gguf.fakequant import GQSLinear, FrozenGQSLinear, stored_scale, integer_zero
from gqsa_gguf.oneshot import CompressedLinear


def _random_compressed(n=24, k=96, n_kept=3, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    w[0, :16] = 0.0                                     # an all-zero group (d = 0 in one-shot)
    kept = np.sort(np.stack([rng.choice(k // 16, n_kept, replace=False) for _ in range(n)]), axis=1)
    kept[0, 0] = 0
    packed = codec.quantize(w, kept)
    idx, q, z, d = codec.unpack(packed)
    return torch.from_numpy(w), CompressedLinear("t", k, idx, q, z, d), packed


def _file_weight(layer):
    return torch.from_numpy(codec.dequantize(codec.pack(*layer.export_arrays()), layer.in_features))


def _perturb(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():                               # trained-looking values: off the fp16 and integer grids
        layer.scale.mul_(1 + 0.3 * torch.rand(layer.scale.shape, generator=g)).add_(1e-7)
        layer.zero.add_(torch.rand(layer.zero.shape, generator=g) * 3 - 1.5)
        if isinstance(layer, GQSLinear):
            layer.weight.add_(torch.randn(layer.weight.shape, generator=g) * 0.01)


def test_gqslinear_init_reproduces_oneshot_bit_exact():
    w, cl, packed = _random_compressed()
    g = GQSLinear.from_compressed(cl, w)
    assert torch.equal(g.dense_weight(), torch.from_numpy(codec.dequantize(packed, 96)))
    idx, q, z, d = g.export_arrays()
    np.testing.assert_array_equal(q[1:], cl.q[1:])      # row 0 holds the all-zero group (d 0 -> 2^-24)
    np.testing.assert_array_equal(z[1:], cl.z[1:])


@pytest.mark.parametrize("cls", ["gqs", "frozen"])
def test_forward_equals_dequantized_file_bit_exact(cls):
    w, cl, _ = _random_compressed()
    layer = GQSLinear.from_compressed(cl, w) if cls == "gqs" else FrozenGQSLinear.from_compressed(cl)
    _perturb(layer)
    x = torch.randn(5, 7, 96)
    W = _file_weight(layer)                             # bit-exact with codec.dequantize(pack(...))
    assert torch.equal(layer.dense_weight(), W)
    assert torch.equal(layer(x), F.linear(x, W))


def test_to_frozen_keeps_forward_and_codes():
    w, cl, _ = _random_compressed()
    g = GQSLinear.from_compressed(cl, w)
    _perturb(g)
    p = g.to_frozen()
    assert torch.equal(p.dense_weight(), g.dense_weight())
    for a, b in zip(p.export_arrays(), g.export_arrays()):
        np.testing.assert_array_equal(a, b)
    c = p.to_compressed()
    assert torch.equal(c.dequantize(), g.dense_weight())


def test_ste_gradients_and_stored_values():
    s = torch.tensor([1e-3 + 1e-9, 0.0, 1e6, -1.0], requires_grad=True)
    d = stored_scale(s)
    assert d.tolist() == [float(np.float16(1e-3 + 1e-9)), 2.0 ** -24, 65504.0, 2.0 ** -24]
    d.sum().backward()
    assert s.grad.tolist() == [1.0, 0.0, 0.0, 0.0]     # identity inside the clamp range
    z = torch.tensor([2.5, 3.5, -4.0, 20.0, 7.4], requires_grad=True)
    zi = integer_zero(z)
    assert zi.tolist() == [2.0, 4.0, 0.0, 15.0, 7.0]     # half to even, clamped to 0..15
    zi.sum().backward()
    assert z.grad.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_gradients_reach_weights_scales_zeros():
    w, cl, _ = _random_compressed()
    g = GQSLinear.from_compressed(cl, w)
    g(torch.randn(4, 96)).pow(2).sum().backward()
    for p in (g.weight, g.scale, g.zero):
        assert p.grad is not None and p.grad.abs().sum() > 0
    p = FrozenGQSLinear.from_compressed(cl)
    p(torch.randn(4, 96)).pow(2).sum().backward()
    assert p.scale.grad.abs().sum() > 0 and p.zero.grad.abs().sum() > 0
    assert not p.q.requires_grad and p.q.dtype == torch.uint8
