"""Fake-quant training forms of a GQSA linear (paper §3.3-3.4), exact with what the GGUF stores.

In:  a one-shot `oneshot.CompressedLinear` (kept group indices, q, z, d) and the layer's float
     weight W [N, K] (and bias, if any).
Out: `GQSLinear` — the BQPO form: float weights of the kept groups (trainable), per-group scale
     and zero point (trainable), fixed group mask (the kept indices; pruned groups do not exist);
     `FrozenGQSLinear` — the E2E-OQP form: frozen integer codes q of the kept groups only (no dense
     mask), trainable scale and zero point;
     conversions `GQSLinear.from_compressed` -> `.to_frozen()` -> `.export_arrays()` /
     `.to_compressed()` (indices int32, q uint8, z uint8, d float16: what `codec.pack` takes).

The forward of both forms, per kept group g of a row (16 weights):

    d  = fp16(clamp(scale, 2^-24, 65504))           # rounded to fp16 in the forward (STE)
    zi = clamp(round(zero), 0, 15)                   # integer zero point in the forward (STE)
    q  = clamp(round(w / d) + zi, 0, 15)             # GQSLinear only (STE); FrozenGQSLinear: frozen
    w_hat = (q - zi) * d                             # exact in float32 (5-bit int x fp16)

and y = x @ W_hat.T + b with W_hat zero in the pruned groups. `export_arrays()` returns exactly
(indices, q, zi, d) of this forward, so `codec.dequantize(codec.pack(*export_arrays()), K)` is
bit-exact with the weight the forward multiplies by (tested in tests/test_fakequant.py); in fp32
the forward therefore equals x @ dequantize(...).T bit for bit. (Under GPU autocast the matmul
runs in bf16/fp16 and only the weights stay exact.)

Design decisions:
  * zero point: a continuous float parameter, rounded and clamped in the forward with a
    straight-through estimator (EfficientQAT's choice). The file stores that rounded integer, so
    training always sees the integer zero point it will be exported with; the continuous value
    accumulates gradient steps until they cross a rounding boundary (so it needs a larger lr than
    the scale to move at all: lr_zero).
  * scale: a float32 parameter, rounded to fp16 in the forward with a straight-through
    estimator (identity gradient), and clamped to the positive fp16 range: the file stores fp16,
    so training sees the stored scale. The STE is a custom autograd function whose forward returns
    the fp16 value exactly (the usual `s + (fp16(s) - s).detach()` can differ from fp16(s) by one
    float32 rounding).
  * rounding of w / d: STE (gradient 1); clamping to 0..15: zero gradient outside (LSQ/EfficientQAT).
  * biases (Qwen2 q/k/v) stay float and frozen: they are exported as float tensors.

`PackedGQSLinear` is `FrozenGQSLinear` in the memory of the streamed E2E-OQP (issue 16): the same
parameters and the same forward, bit for bit, but the frozen codes are kept two to a byte with
int16 group indices (10 bytes a kept group against FrozenGQSLinear's 24), and the dense weight is
built inside a custom autograd function on every call and never saved: its backward builds it
again from the codes and the current scale and zero. The gradients are the chain rule through the
forward above with the same straight-through rules (fp16 and round: identity; clamp: zero
outside), so they equal FrozenGQSLinear's to float summation order (tests/test_fakequant.py).

Invariants: every conversion keeps the indices and shapes; an all-zero group (d = 0 in the
one-shot result) becomes d = 2^-24 with q = z = 0 — the same zero weights; non-finite inputs raise.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import format as fmt

__all__ = ["SCALE_MIN", "SCALE_MAX", "round_ste", "fp16_ste", "stored_scale", "integer_zero",
           "GQSLinear", "FrozenGQSLinear", "PackedGQSLinear", "swap_linear", "gqs_modules"]

SCALE_MIN = fmt.FP16_MIN_SUBNORMAL   # smallest positive fp16 (subnormal): the scale never reaches 0
SCALE_MAX = fmt.FP16_MAX             # largest finite fp16
_G = fmt.GROUP_SIZE


class _RoundSTE(torch.autograd.Function):
    """round half to even (= numpy rint, as the codec) forward; identity gradient."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _FP16STE(torch.autograd.Function):
    """x rounded to fp16 (nearest even) and back to x's dtype, exactly; identity gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.to(torch.float16).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return g


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return _RoundSTE.apply(x)


def fp16_ste(x: torch.Tensor) -> torch.Tensor:
    return _FP16STE.apply(x)


def stored_scale(scale: torch.Tensor) -> torch.Tensor:
    """The fp16 scale the file stores for a trainable float scale, as float32 (STE gradient)."""
    return fp16_ste(torch.clamp(scale, SCALE_MIN, SCALE_MAX))


def integer_zero(zero: torch.Tensor, qmax: int | None = None) -> torch.Tensor:
    """The integer zero point 0..qmax (gqsa4: 15) the file stores for a trainable float zero, as
    float32 (STE)."""
    return torch.clamp(round_ste(zero), 0, fmt.QMAX if qmax is None else qmax)


def _check_init(name: str, what: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        raise ValueError(f"{name}: non-finite {what} at {bad} — the weights or the one-shot result are corrupt")


def _scatter_groups(groups: torch.Tensor, indices: torch.Tensor, width: int) -> torch.Tensor:
    """Kept groups [N, n_kept, 16] at their group indices [N, n_kept] (any integer dtype) -> the
    dense weight [N, width] with zeros in the pruned groups (differentiable in `groups`)."""
    n = groups.shape[0]
    idx = indices.to(torch.int64)[:, :, None].expand(-1, -1, _G)
    return groups.new_zeros(n, width // _G, _G).scatter(1, idx, groups).reshape(n, width)


class _GQSBase(torch.nn.Module):
    """What both forms share: shapes, kept indices, scale/zero parameters, bias, scatter."""

    def __init__(self, name: str, width: int, indices: torch.Tensor, scale: torch.Tensor,
                 zero: torch.Tensor, bias: torch.Tensor | None, bits: int = fmt.BITS):
        super().__init__()
        if width % _G:
            raise ValueError(f"{name}: width {width} is not a multiple of the group size {_G}")
        self.name = name
        self.bits = int(bits)                               # 4: gqsa4, 3: gqsa3
        self.qmax = fmt.qmax_of(self.bits)
        self.in_features = int(width)
        self.out_features = int(indices.shape[0])
        self.register_buffer("indices", indices.to(torch.int64).contiguous())   # [N, n_kept], sorted
        _check_init(name, "scale", scale)
        _check_init(name, "zero point", zero)
        self.scale = torch.nn.Parameter(scale.detach().to(torch.float32).clone())
        self.zero = torch.nn.Parameter(zero.detach().to(torch.float32).clone())
        if bias is not None:
            self.register_buffer("bias", bias.detach().to(torch.float32).clone())
        else:
            self.bias = None

    @property
    def n_kept(self) -> int:
        return int(self.indices.shape[1])

    def _scatter(self, groups: torch.Tensor) -> torch.Tensor:
        """Kept groups [N, n_kept, 16] -> dense weight [N, K] with zeros in the pruned groups."""
        return _scatter_groups(groups, self.indices, self.in_features)

    def group_weights(self) -> torch.Tensor:           # [N, n_kept, 16], differentiable
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        """The exact weight the file will hold, float32 [N, K] (differentiable)."""
        return self._scatter(self.group_weights())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)   # fp32, or autocast casts on GPU

    def codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def export_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(indices int32 [N, n_kept], q uint8 [N, n_kept, 16], z uint8 [N, n_kept], d float16
        [N, n_kept]): the arguments of codec.pack, exactly the weights of this forward."""
        q, z, d = self.codes()
        return (self.indices.to(torch.int32).cpu().numpy(), q.to(torch.uint8).cpu().numpy(),
                z.to(torch.uint8).cpu().numpy(), d.to(torch.float16).cpu().numpy())

    def to_compressed(self):
        """The oneshot.CompressedLinear of the trained layer (export's input)."""
        from .oneshot import CompressedLinear

        idx, q, z, d = self.export_arrays()
        return CompressedLinear(self.name, self.in_features, idx, q, z, d, self.bits)

    def extra_repr(self) -> str:
        return (f"{self.name}: in={self.in_features}, out={self.out_features}, "
                f"kept={self.n_kept}/{self.in_features // _G} groups, {self.bits}-bit")


class GQSLinear(_GQSBase):
    """BQPO form: float kept-group weights, scale and zero point all trainable; mask fixed."""

    def __init__(self, name: str, width: int, indices: torch.Tensor, weight_groups: torch.Tensor,
                 scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None = None, bits: int = fmt.BITS):
        super().__init__(name, width, indices, scale, zero, bias, bits)
        if weight_groups.shape != (self.out_features, self.n_kept, _G):
            raise ValueError(f"{name}: weight groups {tuple(weight_groups.shape)} do not match indices "
                             f"{tuple(self.indices.shape)}")
        _check_init(name, "weight", weight_groups)
        self.weight = torch.nn.Parameter(weight_groups.detach().to(torch.float32).clone())

    @classmethod
    def from_compressed(cls, cl, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "GQSLinear":
        """From a one-shot result and the layer's float weight [N, K]: float weights of the kept
        groups, scale = d, zero = z. At init the forward reproduces the one-shot weights exactly
        (q = clamp(rint(w / d) + z) is the min-max quantizer's own formula)."""
        n, k = cl.indices.shape[0], cl.width
        if tuple(weight.shape) != (n, k):
            raise ValueError(f"{cl.name}: float weight {tuple(weight.shape)} vs compressed [{n}, {k}]")
        idx = torch.from_numpy(np.asarray(cl.indices, dtype=np.int64))
        groups = weight.detach().to(torch.float32).reshape(n, k // _G, _G)
        wg = torch.gather(groups, 1, idx[:, :, None].expand(-1, -1, _G))
        d = torch.from_numpy(np.asarray(cl.d, dtype=np.float16).astype(np.float32))
        z = torch.from_numpy(np.asarray(cl.z, dtype=np.float32))
        return cls(cl.name, k, idx, wg, d, z, bias, cl.bits)

    @classmethod
    def from_oneshot(cls, cl, bias: torch.Tensor | None = None) -> "GQSLinear":
        """From a one-shot result alone: the kept float weights start at the one-shot's own
        dequantized values (q - z) * d, so the forward at init is the one-shot layer bit for bit
        and training starts from the error-compensated weights, not from the float ones."""
        idx = torch.from_numpy(np.asarray(cl.indices, dtype=np.int64))
        q = torch.from_numpy(np.asarray(cl.q, dtype=np.float32))
        d = torch.from_numpy(np.asarray(cl.d, dtype=np.float16).astype(np.float32))
        z = torch.from_numpy(np.asarray(cl.z, dtype=np.float32))
        wg = (q - z[..., None]) * d[..., None]
        return cls(cl.name, cl.width, idx, wg, d, z, bias, cl.bits)

    def _quant(self):
        d = stored_scale(self.scale)[..., None]
        zi = integer_zero(self.zero, self.qmax)[..., None]
        q = torch.clamp(round_ste(self.weight / d) + zi, 0, self.qmax)
        return q, zi, d

    def group_weights(self) -> torch.Tensor:
        q, zi, d = self._quant()
        return (q - zi) * d

    @torch.no_grad()
    def codes(self):
        q, zi, d = self._quant()
        return q, zi[..., 0], d[..., 0]

    @torch.no_grad()
    def to_frozen(self) -> "FrozenGQSLinear":
        """Freezes the integer codes: the E2E-OQP form with the same forward (bit-exact)."""
        q, z, _ = self.codes()
        return FrozenGQSLinear(self.name, self.in_features, self.indices, q.to(torch.uint8),
                               self.scale, z, self.bias, self.bits)


class FrozenGQSLinear(_GQSBase):
    """E2E-OQP form: frozen integer q of the kept groups (no dense mask), trainable scale and zero.

    The zero parameter starts at the exported integer z; training moves it continuously and the
    forward (and export) use clamp(round(zero), 0, qmax) (gqsa4: 15, gqsa3: 7), with q unchanged."""

    def __init__(self, name: str, width: int, indices: torch.Tensor, q: torch.Tensor,
                 scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None = None, bits: int = fmt.BITS):
        super().__init__(name, width, indices, scale, zero, bias, bits)
        if q.shape != (self.out_features, self.n_kept, _G):
            raise ValueError(f"{name}: q {tuple(q.shape)} does not match indices {tuple(self.indices.shape)}")
        if q.dtype != torch.uint8 or int(q.max()) > self.qmax:
            raise ValueError(f"{name}: q must be uint8 codes 0..{self.qmax}, got {q.dtype} max {int(q.max())}")
        self.register_buffer("q", q.contiguous().clone())

    @classmethod
    def from_compressed(cls, cl, bias: torch.Tensor | None = None) -> "FrozenGQSLinear":
        """Straight from a one-shot result (E2E-OQP without BQPO)."""
        d = torch.from_numpy(np.asarray(cl.d, dtype=np.float16).astype(np.float32))
        return cls(cl.name, cl.width, torch.from_numpy(np.asarray(cl.indices, dtype=np.int64)),
                   torch.from_numpy(np.asarray(cl.q, dtype=np.uint8)), d,
                   torch.from_numpy(np.asarray(cl.z, dtype=np.float32)), bias, cl.bits)

    def group_weights(self) -> torch.Tensor:
        d = stored_scale(self.scale)[..., None]
        zi = integer_zero(self.zero, self.qmax)[..., None]
        return (self.q.to(d.dtype) - zi) * d

    @torch.no_grad()
    def codes(self):
        return self.q, integer_zero(self.zero, self.qmax), stored_scale(self.scale)

    def frozen_tensors(self) -> tuple[torch.Tensor, ...]:
        """What fixes the frozen part of the layer (a run's fingerprint): q and the indices."""
        return self.q, self.indices


def _nibbles(q: np.ndarray) -> np.ndarray:
    """Codes uint8 [..., 16] two to a byte as in a gqsa4 block's qs: uint8 [..., 8]."""
    return np.ascontiguousarray(q[..., :_G // 2] | (q[..., _G // 2:] << 4))


def _unpack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [N, n_kept, 8], two 4-bit codes a byte as in a gqsa4 block's qs (docs/FORMAT.md:
    low nibbles weights 0..7, high nibbles 8..15) -> uint8 [N, n_kept, 16]."""
    return torch.cat([codes & 0x0F, codes >> 4], dim=-1)


def _expand(codes, indices, d, zi, width: int) -> torch.Tensor:
    """The dense float32 weight [N, width]: (q - zi) * d in the kept groups, zeros elsewhere."""
    groups = (_unpack_codes(codes).to(torch.float32) - zi[..., None]) * d[..., None]
    return _scatter_groups(groups, indices, width)


class _ExpandedLinear(torch.autograd.Function):
    """y = x @ W(scale, zero).T + b with W expanded from the codes in the forward and again in the
    backward; saves the input, scale and zero (and refers to the module's codes and indices)."""

    @staticmethod
    def forward(ctx, x, scale, zero, codes, indices, bias, width: int, qmax: int):
        with torch.no_grad():
            d, zi = _stored_scale_value(scale), _integer_zero_value(zero, qmax)
            w = _expand(codes, indices, d, zi, width)
        # under autocast F.linear casts as it does in FrozenGQSLinear.forward; the backward then
        # multiplies in that dtype too (what autograd does for FrozenGQSLinear's bf16 matmul)
        dev = x.device.type
        ctx.amp_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        ctx.width, ctx.qmax = width, qmax
        ctx.save_for_backward(x, scale, zero, codes, indices)
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad):
        x, scale, zero, codes, indices = ctx.saved_tensors
        d, zi = _stored_scale_value(scale), _integer_zero_value(zero, ctx.qmax)
        w = _expand(codes, indices, d, zi, ctx.width)
        dt = ctx.amp_dtype or torch.float32
        g2 = grad.reshape(-1, grad.shape[-1]).to(dt)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = (g2 @ w.to(dt)).reshape(*x.shape[:-1], ctx.width).to(x.dtype)
        n = w.shape[0]
        del w                                            # the dense weight and its gradient never coexist
        dscale = dzero = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dw = (g2.t() @ x.reshape(-1, ctx.width).to(dt)).to(torch.float32)
            idx = indices.to(torch.int64)[:, :, None].expand(-1, -1, _G)
            dg = torch.gather(dw.reshape(n, ctx.width // _G, _G), 1, idx)      # d loss / d w_hat, kept groups
            del dw
            if ctx.needs_input_grad[1]:                  # w_hat = (q - zi) * d; fp16 STE; clamp
                dd = (dg * (_unpack_codes(codes).to(torch.float32) - zi[..., None])).sum(-1)
                dscale = dd * ((scale >= SCALE_MIN) & (scale <= SCALE_MAX))
            if ctx.needs_input_grad[2]:                  # round STE; clamp of round(zero) to 0..qmax
                r = torch.round(zero)
                dzero = -(dg * d[..., None]).sum(-1) * ((r >= 0) & (r <= ctx.qmax))
        return dx, dscale, dzero, None, None, None, None, None


def _stored_scale_value(scale: torch.Tensor) -> torch.Tensor:
    return torch.clamp(scale, SCALE_MIN, SCALE_MAX).to(torch.float16).to(scale.dtype)


def _integer_zero_value(zero: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.clamp(torch.round(zero), 0, qmax)


class PackedGQSLinear(_GQSBase):
    """E2E-OQP form of the streamed training: FrozenGQSLinear's parameters and forward, with the
    frozen codes packed two to a byte (`qs` uint8 [N, n_kept, 8], as in a gqsa4 block; gqsa3's
    3-bit codes too) and int16 group indices, the dense weight expanded per call and never kept (see
    the module docstring)."""

    def __init__(self, name: str, width: int, indices: torch.Tensor, codes: torch.Tensor,
                 scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None = None, bits: int = fmt.BITS):
        super().__init__(name, width, indices, scale, zero, bias, bits)
        self.indices = self.indices.to(torch.int16)          # < 4096 groups a row (docs/FORMAT.md)
        if codes.shape != (self.out_features, self.n_kept, _G // 2) or codes.dtype != torch.uint8:
            raise ValueError(f"{name}: codes must be uint8 {(self.out_features, self.n_kept, _G // 2)}, got "
                             f"{codes.dtype} {tuple(codes.shape)}")
        self.register_buffer("qs", codes.contiguous().clone())

    @classmethod
    def from_packed(cls, p, bias: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                    zero: torch.Tensor | None = None) -> "PackedGQSLinear":
        """From a oneshot.PackedLinear (gqsa4 or gqsa3 rows): codes and indices from the rows, scale = d
        and zero = z unless given (the float values a training stage left, e.g. BQPO's)."""
        from . import codec

        idx, q, z, d = codec.unpack(p.data, bits=p.bits)
        n, k = idx.shape
        if p.bits == fmt.BITS:                           # gqsa4 blocks hold the nibbles already
            del q
            codes = torch.from_numpy(np.ascontiguousarray(p.data.reshape(n, k, fmt.BLOCK_BYTES)[:, :, 4:]))
        else:
            codes = torch.from_numpy(_nibbles(q))
            del q
        scale = torch.from_numpy(d.astype(np.float32)) if scale is None else scale
        zero = torch.from_numpy(z.astype(np.float32)) if zero is None else zero
        return cls(p.name, p.width, torch.from_numpy(idx.astype(np.int64)), codes, scale, zero, bias, p.bits)

    @classmethod
    def from_compressed(cls, cl, bias: torch.Tensor | None = None) -> "PackedGQSLinear":
        """From a oneshot.CompressedLinear: the same layer as FrozenGQSLinear.from_compressed."""
        codes = torch.from_numpy(_nibbles(np.asarray(cl.q, dtype=np.uint8)))
        d = torch.from_numpy(np.asarray(cl.d, dtype=np.float16).astype(np.float32))
        return cls(cl.name, cl.width, torch.from_numpy(np.asarray(cl.indices, dtype=np.int64)), codes, d,
                   torch.from_numpy(np.asarray(cl.z, dtype=np.float32)), bias, cl.bits)

    @property
    def q(self) -> torch.Tensor:
        """The frozen codes uint8 [N, n_kept, 16] (unpacked on each call)."""
        return _unpack_codes(self.qs)

    def frozen_tensors(self) -> tuple[torch.Tensor, ...]:
        """What fixes the frozen part of the layer (a run's fingerprint): codes and indices."""
        return self.qs, self.indices

    def group_weights(self) -> torch.Tensor:
        d = stored_scale(self.scale)[..., None]
        zi = integer_zero(self.zero, self.qmax)[..., None]
        return (self.q.to(d.dtype) - zi) * d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ExpandedLinear.apply(x, self.scale, self.zero, self.qs, self.indices, self.bias, self.in_features,
                                     self.qmax)

    @torch.no_grad()
    def codes(self):
        return self.q, integer_zero(self.zero, self.qmax), stored_scale(self.scale)


# --- model surgery ----------------------------------------------------------------------------------

def swap_linear(root: torch.nn.Module, path: str, new: torch.nn.Module) -> torch.nn.Module:
    """Replaces the submodule at dotted `path` (relative to root) by `new`; returns the old one."""
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    return old


def gqs_modules(model: torch.nn.Module) -> dict[str, _GQSBase]:
    """Every GQSLinear / FrozenGQSLinear in `model`, keyed by its HF module name (its `.name`)."""
    return {m.name: m for m in model.modules() if isinstance(m, _GQSBase)}
