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


# --- PackedGQSLinear: FrozenGQSLinear with the codes packed and the weight expanded per call --------

def _pair(n, k, n_kept, seed, bias):
    from gqsa_gguf.fakequant import PackedGQSLinear
    from gqsa_gguf.oneshot import PackedLinear

    _, cl, packed = _random_compressed(n, k, n_kept, seed)
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed)) if bias else None
    ref = FrozenGQSLinear.from_compressed(cl, b)
    got = PackedGQSLinear.from_packed(PackedLinear("t", k, packed), b)
    _perturb(ref, seed)
    with torch.no_grad():
        # off the clamp ranges too: a negative scale (clamped to 2^-24), zeros rounding to -1 and 16
        ref.scale[0, 0] = -0.01
        ref.zero[0, -1] = -0.8
        ref.zero[-1, 0] = 15.7
        got.scale.copy_(ref.scale)
        got.zero.copy_(ref.zero)
    return ref, got


def _grads(layer, x):
    x = x.detach().clone().requires_grad_(True)
    layer.scale.grad = layer.zero.grad = None
    y = layer(x)
    # a loss whose gradient differs per output element
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).square().sum().backward()
    return y.detach(), x.grad, layer.scale.grad, layer.zero.grad


@pytest.mark.parametrize("n,k,n_kept,bias,seed", [(24, 96, 3, False, 0), (40, 160, 7, True, 1), (8, 64, 4, True, 2),
                                                   (33, 48, 1, False, 3)])
def test_packed_linear_equals_frozen_forward_and_gradients(n, k, n_kept, bias, seed):
    ref, got = _pair(n, k, n_kept, seed, bias)
    assert got.qs.dtype == torch.uint8 and got.qs.shape == (n, n_kept, 8) and got.indices.dtype == torch.int16
    assert torch.equal(got.q, ref.q) and torch.equal(got.indices.long(), ref.indices)
    for a, b in zip(got.export_arrays(), ref.export_arrays()):
        np.testing.assert_array_equal(a, b)
    x = torch.randn(3, 5, k, generator=torch.Generator().manual_seed(seed + 10))
    y_r, dx_r, ds_r, dz_r = _grads(ref, x)
    y_g, dx_g, ds_g, dz_g = _grads(got, x)
    assert torch.equal(y_g, y_r)                         # the same weight, the same matmul
    for a, b in ((dx_g, dx_r), (ds_g, ds_r), (dz_g, dz_r)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))
    # the clamp ranges stop the gradient where FrozenGQSLinear's does, and only there
    assert ds_r[0, 0] == 0 and ds_g[0, 0] == 0 and dz_g[0, -1] == 0 and dz_g[-1, 0] == 0
    assert int((ds_g != 0).sum()) >= ds_g.numel() - 2 and int((dz_g != 0).sum()) >= dz_g.numel() - 3
    # the dense weight is not saved for the backward: only the input, scale, zero and the buffers
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        got(x.requires_grad_(True))
    assert all(t.shape != (n, k) for t in saved), [tuple(t.shape) for t in saved]


def test_packed_linear_under_bf16_autocast_behaves_as_frozen():
    ref, got = _pair(48, 128, 4, 5, True)
    x = torch.randn(2, 7, 128, generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_r, dx_r, ds_r, dz_r = _grads(ref, x)
        y_g, dx_g, ds_g, dz_g = _grads(got, x)
    assert y_g.dtype == y_r.dtype == torch.bfloat16 and torch.equal(y_g, y_r)
    assert dx_g.dtype == torch.float32
    for a, b in ((dx_g, dx_r), (ds_g, ds_r), (dz_g, dz_r)):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * float(b.abs().max()))
