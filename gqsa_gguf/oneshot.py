"""One-shot GQSA compression: decide, for every decoder linear, which groups survive and their
4-bit codes (paper §3.1-3.2; the BQPO / E2E-OQP training of §3.3-3.4 comes later).

In:  a float32 HF causal LM (the architectures of gqsa_gguf/arch), or a block source over a
     checkpoint read block by block (`streamed.StreamedModel`); its `ModelInfo`, calibration
     windows LongTensor [nsamples, seqlen], a `CompressionConfig`.
Out: `compress_model(...)` -> `CompressionResult` with one `CompressedLinear` per decoder linear
     (q, k, v, o, gate, up, down of every layer), keyed by HF module name, e.g.
     "model.layers.3.self_attn.q_proj". A model given whole is modified in place: on return each
     of those linears holds exactly the dequantized compressed weight
     (`CompressedLinear.dequantize()`). `compress_blocks(...)` is the same pass as a generator of
     one `BlockResult` per block (what the streamed conversion consumes, writing each to disk);
     `sensitivity_curves` / `sensitivity_blocks` the allocation's probe, likewise.

`CompressedLinear` is the seam between deciding and storing: kept group indices, q, z, d and the
logical width, in HF row order; `PackedLinear` the same as gqsa4 rows (12 bytes a kept group).
Packing into gqsa4 bytes (and llama.cpp's q/k row permutation) is `export`'s job.

Order of work (the GPTQ/SparseGPT block-wise scheme): the calibration windows are embedded once;
then for each decoder block (`compress_block`, one code path for a model in memory and a streamed
one): with `method="obs"` (default) the four input groups (q/k/v share the attention input, gate/up
the MLP input) are compressed in the order the data flows, each from H = 2XX^T/n taken with the
linears before it already compressed (GPTQ's true-sequential), by OBS error compensation on the
row-balanced group mask; with `method="rtn"` one dense pass gives all four H, and each linear gets
the Eq. 4 saliency mask with min-max 4-bit rounding. With `sequential=True` (default) the
now-compressed block is run again and its outputs are the next block's inputs, so later blocks
are calibrated on the activations they will really see.

Invariants: quantization is bit-exact with `codec.quantize_groups` (tested); every row keeps
exactly the allocated number of groups, sorted; non-finite weights raise; a block source gives
bit-for-bit the results of the loaded model (tests/test_streamed.py).
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass

import numpy as np
import torch

from . import arch, codec
from . import format as fmt
from .errors import GQSAError
from .saliency import (HessianAccumulator, dampened_cholesky, dampened_cholesky_, group_saliency,
                       hessian_inverse_diag, inverse_diag_from_cholesky, select_groups, weight_saliency)
from .training import capture_layer_inputs, layer_output

__all__ = ["CompressedLinear", "PackedLinear", "CompressionResult", "OneShotError", "ChainState", "BlockResult",
           "ModelBlocks", "quantize_groups_torch", "dequantize_groups_torch", "compress_linear", "saliency_round",
           "compress_block", "compress_blocks", "compress_model", "sensitivity_block", "sensitivity_blocks",
           "sensitivity_curves", "apply_compressed"]

# linears that share one input: the first is hooked, its H serves the group (gqsa_gguf/arch)
_INPUT_GROUPS = arch.INPUT_GROUPS
_LINEARS = arch.LINEARS


class OneShotError(GQSAError, RuntimeError):
    """Compression could not proceed (bad weights, unexpected model structure)."""


class _KeptGroups:
    """What CompressedLinear and PackedLinear share: rows, kept groups per row, the width."""

    width: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n_kept / (self.width // fmt.GROUP_SIZE)


@dataclass(frozen=True, eq=False)
class CompressedLinear(_KeptGroups):
    """One compressed linear W[N, K] in HF row order.

    indices int32 [N, n_kept]: kept group numbers per row, strictly increasing, < K/16
    q uint8 [N, n_kept, 16]: 4-bit codes 0..15; z uint8 [N, n_kept]: zero points 0..15
    d float16 [N, n_kept]: scales;  w = (q - z) * d inside kept groups, 0 elsewhere.
    bits: the code width, 4 (gqsa4) or 3 (gqsa3: codes and zero points 0..7).
    """

    name: str
    width: int
    indices: np.ndarray
    q: np.ndarray
    z: np.ndarray
    d: np.ndarray
    bits: int = fmt.BITS

    def __post_init__(self):
        n, k = self.indices.shape
        if self.q.shape != (n, k, fmt.GROUP_SIZE) or self.z.shape != (n, k) or self.d.shape != (n, k):
            raise OneShotError(f"{self.name}: inconsistent shapes indices {self.indices.shape}, q {self.q.shape}, "
                               f"z {self.z.shape}, d {self.d.shape}")
        if self.width % fmt.GROUP_SIZE or not 0 < k <= self.width // fmt.GROUP_SIZE:
            raise OneShotError(f"{self.name}: {k} kept groups do not fit width {self.width}")

    @property
    def rows(self) -> int:
        return self.indices.shape[0]

    @property
    def n_kept(self) -> int:
        return self.indices.shape[1]

    def permute_rows(self, perm: np.ndarray) -> "CompressedLinear":
        """Rows reordered: row r of the result is row perm[r] of self (rows are independent)."""
        return CompressedLinear(self.name, self.width, self.indices[perm], self.q[perm], self.z[perm],
                                self.d[perm], self.bits)

    def packed_rows(self) -> np.ndarray:
        """The gqsa4 rows, uint8 [N, n_kept*12] (gqsa3: n_kept*10; codec.pack; docs/FORMAT.md)."""
        return codec.pack(self.indices, self.q, self.z, self.d, self.bits)

    def dequantize(self) -> torch.Tensor:
        """float32 [N, width], exact (the same values as codec.dequantize of the packed rows)."""
        vals = dequantize_groups_torch(torch.from_numpy(self.q), torch.from_numpy(self.z),
                                       torch.from_numpy(self.d))
        out = torch.zeros(self.rows, self.width // fmt.GROUP_SIZE, fmt.GROUP_SIZE, dtype=torch.float32)
        idx = torch.from_numpy(self.indices.astype(np.int64))[:, :, None].expand(-1, -1, fmt.GROUP_SIZE)
        out.scatter_(1, idx, vals)
        return out.reshape(self.rows, self.width)


@dataclass(frozen=True, eq=False)
class PackedLinear(_KeptGroups):
    """A CompressedLinear held as its gqsa4 rows, uint8 [N, n_kept*12]: 12 bytes a kept group,
    0.75 a kept weight against CompressedLinear's 1.44 — how the streamed conversion keeps the
    finished blocks. `unpack()` gives the CompressedLinear back exactly (codec.pack / unpack)."""

    name: str
    width: int
    data: np.ndarray
    bits: int = fmt.BITS

    @classmethod
    def of(cls, cl: CompressedLinear) -> "PackedLinear":
        return cls(cl.name, cl.width, cl.packed_rows(), cl.bits)

    @property
    def rows(self) -> int:
        return self.data.shape[0]

    @property
    def n_kept(self) -> int:
        return self.data.shape[1] // fmt.gqsa_type(self.bits).block_bytes

    def permute_rows(self, perm: np.ndarray) -> "PackedLinear":
        return PackedLinear(self.name, self.width, self.data[perm], self.bits)

    def packed_rows(self) -> np.ndarray:
        return self.data

    def unpack(self) -> CompressedLinear:
        return CompressedLinear(self.name, self.width, *codec.unpack(self.data, bits=self.bits), self.bits)


@dataclass
class CompressionResult:
    linears: dict[str, CompressedLinear]
    rel_errors: dict[str, float]          # tr(D H D^T) / tr(W H W^T), D = W - W_hat: output error share
    seconds: float
    nsamples: int
    seqlen: int


# --- min-max quantization, bit-exact with codec.quantize_groups ----------------------------------

def quantize_groups_torch(x: torch.Tensor, bits: int = fmt.BITS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max `bits`-bit quantization of groups x [..., 16] (docs/FORMAT.md "Reference quantizer").

    Returns q uint8 [..., 16], z uint8 [...], d float16 [...] — bit-exact with
    codec.quantize_groups: both run codec.minmax_groups, here on torch's primitives.
    """
    if x.shape[-1] != fmt.GROUP_SIZE:
        raise ValueError(f"quantize_groups_torch needs groups of {fmt.GROUP_SIZE} in the last axis, got {tuple(x.shape)}")
    x = x.to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise OneShotError("non-finite weight in a group to quantize — the model has NaN/inf weights")
    return codec.minmax_groups(x, _TorchOps, fmt.qmax_of(bits))


class _TorchOps:
    """torch's primitives for codec.minmax_groups (torch.round is rint: half to even)."""
    f32, f16, u8 = torch.float32, torch.float16, torch.uint8
    const = staticmethod(lambda v, dtype: torch.tensor(v, dtype=dtype))
    amin = staticmethod(lambda x: x.amin(dim=-1))
    amax = staticmethod(lambda x: x.amax(dim=-1))
    minimum, maximum, where, clip, rint = torch.minimum, torch.maximum, torch.where, torch.clamp, torch.round
    cast = staticmethod(lambda x, dtype: x.to(dtype))


def dequantize_groups_torch(q: torch.Tensor, z: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """(q - z) * d in float32, [..., 16]; exact (5-bit integer times an fp16)."""
    return (q.to(torch.float32) - z.to(torch.float32)[..., None]) * d.to(torch.float32)[..., None]


# --- one linear ------------------------------------------------------------------------------------

def compress_linear(W: torch.Tensor, H: torch.Tensor, n_kept: int, damp: float, name: str = "?",
                    hinv: tuple[torch.Tensor, torch.Tensor] | None = None,
                    bits: int = fmt.BITS) -> tuple[CompressedLinear, float]:
    """Compresses W [N, K] given its input Hessian H [K, K]; returns (result, relative output error).

    hinv: `hessian_inverse_diag(H, damp)` if already computed (linears sharing an input share it).
    """
    W = W.detach().to(torch.float32)
    cl = saliency_round(W, hinv if hinv is not None else hessian_inverse_diag(H, damp, name), n_kept, name, bits)
    return cl, relative_output_error(W, H, cl)


def saliency_round(W: torch.Tensor, hinv: tuple[torch.Tensor, torch.Tensor], n_kept: int,
                   name: str = "?", bits: int = fmt.BITS) -> CompressedLinear:
    """The paper's one-shot of W [N, K] (float32): each row keeps its n_kept groups of highest
    Eq. 4 saliency, rounded to nearest on their min-max grids. hinv: (diag(H_damped^-1), dead
    inputs), `hessian_inverse_diag`; H itself is not needed (the sensitivity probe drops it)."""
    n, k = W.shape
    if not bool(torch.isfinite(W).all()):
        bad = (~torch.isfinite(W)).nonzero()[0].tolist()
        raise OneShotError(f"{name}: non-finite weight {W[bad[0], bad[1]].item()} at {bad} — the checkpoint is corrupt")
    hinv_diag, dead = hinv
    kept = select_groups(group_saliency(weight_saliency(W, hinv_diag, dead)), n_kept)
    groups = W.reshape(n, k // fmt.GROUP_SIZE, fmt.GROUP_SIZE)
    sel = torch.gather(groups, 1, kept[:, :, None].expand(-1, -1, fmt.GROUP_SIZE))
    q, z, d = quantize_groups_torch(sel, bits)
    return CompressedLinear(name, k, kept.to(torch.int32).numpy(), q.numpy(), z.numpy(), d.numpy(), bits)


def output_error(W: torch.Tensor, H: torch.Tensor, cl: CompressedLinear) -> tuple[float, float]:
    """(tr(D H D^T), tr(W H W^T)) with D = W - W_hat: the layer's squared output error on the
    calibration inputs, and its output energy (float32 products, float64 sums)."""
    H32 = H.to(torch.float32)
    W = W.detach().to(torch.float32)
    D = W - cl.dequantize()
    return (float(((D @ H32) * D).sum(dtype=torch.float64)), float(((W @ H32) * W).sum(dtype=torch.float64)))


def relative_output_error(W: torch.Tensor, H: torch.Tensor, cl: CompressedLinear) -> float:
    """Share of the layer's output energy lost, tr(D H D^T) / tr(W H W^T) (a diagnostic)."""
    err, energy = output_error(W, H, cl)
    return err / energy if energy > 0 else 0.0


# --- error-compensated one-shot (SparseGPT / GPTQ on the row-balanced group mask) -----------------

CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)   # shrink factors of a group's min-max range tried
ADAPTIVE_MASK = True


def _cholesky_inverse_upper(H: torch.Tensor, damp: float, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """U (float32, upper triangular) with U^T U = (H_damped)^-1, and the mask of dead inputs.

    SparseGPT's/GPTQ's factor: row j of U holds, from j on, how removing/quantizing input j moves
    the inputs after it (the OBS update with inputs < j already fixed), and U_jj^2 is
    [H_{j:,j:}^-1]_jj, the denominator of input j's OBS error w^2 / U_jj^2."""
    L, dead = dampened_cholesky(H, damp, name)
    # each K x K float64 intermediate is freed as soon as the next exists: with H (the caller's)
    # at most three are alive (24 K^2 bytes; for down_proj of a 7B shape, K = 11008, 2.9 GB)
    inv = torch.cholesky_inverse(L)
    del L
    U, info = torch.linalg.cholesky_ex(inv, upper=True)
    del inv
    if int(info) != 0:
        raise OneShotError(f"{name}: the inverse Hessian lost positive definiteness in float64 "
                           f"(damp={damp}) — raise --damp")
    return U.to(torch.float32), dead


def obs_group_saliency(W: torch.Tensor, U: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """OBS cost of pruning each group of 16, [N, K/16]: sum_j w_j^2 / U_jj^2 (SparseGPT's score)."""
    s = W.square() / torch.diagonal(U).square()[None, :]
    s[:, dead] = 0.0
    n, k = s.shape
    return s.reshape(n, k // fmt.GROUP_SIZE, fmt.GROUP_SIZE).sum(dim=-1)


def _group_params(x: torch.Tensor, grid=CLIP_GRID, weight: torch.Tensor | None = None, bits: int = fmt.BITS
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero point z and scale d (float32 holding the fp16 value) of groups x [N, 16]: the codec's
    min-max rule on the range shrunk by the factor of `grid` with the smallest squared error,
    each column weighted by `weight` [16] (its input energy H_jj: a column whose input is large —
    a massive activation's — is never clipped for the sake of the others); factor 1.0 is exactly
    codec.quantize_groups."""
    best_err = best_z = best_d = None
    w = torch.ones(x.shape[-1]) if weight is None else weight
    for f in grid:
        _, z, d = quantize_groups_torch(x * f if f != 1.0 else x, bits)
        zf, df = z.to(torch.float32), d.to(torch.float32)
        err = ((x - _fake_quant(x, zf, df, bits)).square() * w).sum(dim=-1)
        if best_err is None:
            best_err, best_z, best_d = err, zf, df
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_z = torch.where(better, zf, best_z)
            best_d = torch.where(better, df, best_d)
    return best_z, best_d


def _codes(x: torch.Tensor, z: torch.Tensor, d: torch.Tensor, bits: int = fmt.BITS) -> torch.Tensor:
    """`bits`-bit codes of x [..., m] on the grid (z [...], d [...]); 0 where d == 0 (as the codec)."""
    safe = torch.where(d == 0, torch.ones_like(d), d)
    q = torch.clamp(torch.round(x / safe[..., None]) + z[..., None], 0, fmt.qmax_of(bits))
    return torch.where((d == 0)[..., None], torch.zeros_like(q), q)


def _fake_quant(x, z, d, bits: int = fmt.BITS):
    return (_codes(x, z, d, bits) - z[..., None]) * d[..., None]


class _threads:
    """Runs a with-block with n torch threads (None: unchanged)."""

    def __init__(self, n):
        self.n, self.old = n, None

    def __enter__(self):
        if self.n is not None:
            self.old = torch.get_num_threads()
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        if self.old is not None:
            torch.set_num_threads(self.old)


def _obs_columns(W1, E1, U1, i1, keep, Q, Z, D, clip_grid, hdiag, bits) -> None:
    """The column loop of one block of columns (compress_linear_obs), in place."""
    g = fmt.GROUP_SIZE
    for i in range(W1.shape[1]):
        col = i1 + i
        grp = col // g
        if col % g == 0:
            z, d = _group_params(W1[:, i:i + g], clip_grid, hdiag[col:col + g], bits)
            Z[:, grp], D[:, grp] = z, d
            zg, dg, kg = z, d, keep[:, grp]
        w = W1[:, i]
        q = _codes(w[:, None], zg, dg, bits)[:, 0]
        deq = torch.where(kg, (q - zg) * dg, torch.zeros_like(w))
        Q[:, col] = q
        err = (w - deq) / U1[i, i]
        W1[:, i:].sub_(err[:, None] * U1[i, i:][None, :])
        W1[:, i] = deq
        E1[:, i] = err


def compress_linear_obs(W: torch.Tensor, H: torch.Tensor, n_kept: int, damp: float, name: str = "?",
                        blocksize: int = 128, clip_grid=CLIP_GRID, adaptive: bool = ADAPTIVE_MASK,
                        chol: tuple[torch.Tensor, torch.Tensor] | None = None,
                        bits: int = fmt.BITS) -> tuple[CompressedLinear, float]:
    """Prunes and quantizes W [N, K] jointly with Optimal-Brain-Surgeon error compensation.

    The mask (every row keeps its n_kept groups of highest OBS saliency) is fixed first; then the
    columns are visited left to right in blocks of `blocksize`: a group's 4-bit grid is chosen
    (min-max, best clip of `clip_grid`) when its first column comes up, from the weights as updated
    so far; each column is rounded to that grid (or set to 0 in pruned groups) and its error is
    pushed onto the columns not yet visited through row j of U (U^T U = H^-1) — SparseGPT's and
    GPTQ's update, here with the gqsa4 format's static 16-weight groups. The stored codes are the
    ones the loop rounded to, so `CompressedLinear.dequantize()` is exactly the compensated W."""
    W0 = W.detach().to(torch.float32)
    W = W0.clone()
    n, k = W.shape
    g = fmt.GROUP_SIZE
    if not bool(torch.isfinite(W).all()):
        bad = (~torch.isfinite(W)).nonzero()[0].tolist()
        raise OneShotError(f"{name}: non-finite weight {W[bad[0], bad[1]].item()} at {bad} — the checkpoint is corrupt")
    if k % g:
        raise OneShotError(f"{name}: width {k} is not a multiple of {g}")
    U, dead = chol if chol is not None else _cholesky_inverse_upper(H, damp, name)
    W[:, dead] = 0.0
    hdiag = torch.diagonal(H).to(torch.float32).clamp_min(0) + 1e-12
    ngroups = k // g
    kept = select_groups(obs_group_saliency(W, U, dead).to(torch.float64), n_kept)      # [N, n_kept]
    keep = torch.zeros(n, ngroups, dtype=torch.bool)
    keep.scatter_(1, kept, True)
    Q = torch.zeros(n, k, dtype=torch.float32)         # the 4-bit codes of every column (0 if pruned)
    Z = torch.zeros(n, ngroups, dtype=torch.float32)
    D = torch.zeros(n, ngroups, dtype=torch.float32)
    bs = max(g, (blocksize // g) * g)
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        if adaptive:
            # SparseGPT's adaptive mask: which of this block's groups a row keeps is re-chosen from
            # the weights as updated so far; how many it keeps here stays the up-front mask's count,
            # so every row still keeps n_kept groups in all
            g1, g2 = i1 // g, i2 // g
            count = keep[:, g1:g2].sum(dim=1, keepdim=True)
            sal = (W1.square() / torch.diagonal(U1).square()[None, :]).reshape(n, g2 - g1, g).sum(-1)
            rank = torch.argsort(torch.argsort(sal, dim=1, descending=True, stable=True), dim=1)
            keep[:, g1:g2] = rank < count
        with _threads(1 if W1.numel() < (1 << 20) else None):   # tiny ops: threads only cost
            _obs_columns(W1, E1, U1, i1, keep, Q, Z, D, clip_grid, hdiag, bits)
        W[:, i1:i2] = W1
        if i2 < k:
            W[:, i2:] -= E1 @ U[i1:i2, i2:]
    kept = torch.arange(ngroups).expand(n, -1)[keep].reshape(n, n_kept)   # row-major: sorted per row
    idx = kept[:, :, None].expand(-1, -1, g)
    q = torch.gather(Q.reshape(n, ngroups, g), 1, idx).to(torch.uint8)
    z = torch.gather(Z, 1, kept).to(torch.uint8)
    d = torch.gather(D, 1, kept).to(torch.float16)
    cl = CompressedLinear(name, k, kept.to(torch.int32).numpy(), q.numpy(), z.numpy(), d.numpy(), bits)
    return cl, relative_output_error(W0, H, cl)


def apply_compressed(model: torch.nn.Module, compressed: dict[str, CompressedLinear]) -> None:
    """Writes each CompressedLinear's dequantized weight into the model's module of that name."""
    with torch.no_grad():
        for name, cl in compressed.items():
            mod = model.get_submodule(name)
            w = cl.dequantize()
            if tuple(mod.weight.shape) != tuple(w.shape):
                raise OneShotError(f"{name}: module weight {tuple(mod.weight.shape)} vs compressed {tuple(w.shape)}")
            mod.weight.copy_(w)


# --- the block-wise driver -----------------------------------------------------------------------

class _Stop(Exception):
    pass


def _block_input_hessian(layer, hooked: str, hidden, kwargs, name: str) -> torch.Tensor:
    """H = 2/n X^T X of the input of `layer.hooked` over all batches; the block's forward stops
    right after that linear's input is seen."""
    mod = layer.get_submodule(hooked)
    acc = HessianAccumulator(mod.in_features, name)

    def hook(m, args):
        acc.add(args[0])
        raise _Stop

    h = mod.register_forward_pre_hook(hook)
    try:
        for x, kw in zip(hidden, kwargs):
            try:
                layer(x, **kw)
            except _Stop:
                pass
    finally:
        h.remove()
    return acc.H


def _block_input_pair(layer, float_layer, hooked: str, hidden, fhidden, kwargs, name: str):
    """(H, G): H = 2/n X^T X of the input X of `layer.hooked` on the compressed chain `hidden`, and
    G = 2/n X^T F with F the same linear's input in the float block `float_layer` on the float
    chain `fhidden` (row for row the same tokens). Both forwards stop at the linear."""
    width = layer.get_submodule(hooked).in_features
    H = torch.zeros(width, width, dtype=torch.float64)
    G = torch.zeros(width, width, dtype=torch.float64)
    seen = {}

    def grab(key):
        def hook(m, args):
            seen[key] = args[0].detach().reshape(-1, width).to(torch.float32)
            raise _Stop
        return hook

    hs = [layer.get_submodule(hooked).register_forward_pre_hook(grab("q")),
          float_layer.get_submodule(hooked).register_forward_pre_hook(grab("f"))]
    n = 0
    try:
        for x, xf, kw in zip(hidden, fhidden, kwargs):
            for mod, inp in ((layer, x), (float_layer, xf)):
                try:
                    mod(inp, **kw)
                except _Stop:
                    pass
            xq, xfl = seen.pop("q"), seen.pop("f")
            H += (xq.T @ xq).to(torch.float64)
            G += (xq.T @ xfl).to(torch.float64)
            n += xq.shape[0]
    finally:
        for h in hs:
            h.remove()
    if n == 0:
        raise OneShotError(f"{name}: no calibration tokens reached the layer")
    return H * (2.0 / n), G * (2.0 / n)


def float_target_weight(W: torch.Tensor, H: torch.Tensor, G: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """The weight whose output on the compressed input X best matches W's output on the float
    input F (least squares, with the pass's dampening): W' = W + W (G^T - H) H_d^-1, H_d^-1 = U^T U.
    With X = F (nothing lost before this linear) G = H and W' = W exactly, so minimising
    ||X W'^T - X W_hat^T|| (what the OBS pass does) minimises ||F W^T - X W_hat^T||."""
    W64 = W.detach().to(torch.float64)
    M = W64 @ (G.T - H)
    U64 = U.to(torch.float64)
    return (W64 + (M @ U64.T) @ U64).to(torch.float32)


# --- the block-wise passes ------------------------------------------------------------------------
#
# Both passes (the one-shot compression and the allocation's sensitivity probe) walk the decoder
# block by block and ask a *block source* for each block: `ModelBlocks` over a model held whole in
# memory, or `streamed.StreamedModel`, which reads each block from the checkpoint when the pass
# reaches it and frees it after. The per-block work (`compress_block`, `sensitivity_block`) is the
# same code for both, so a streamed conversion computes exactly what the whole-model one does.


@dataclass
class ChainState:
    """Where a block-wise pass stands: the next block to process and the inputs it receives, per
    batch of windows. `hidden` is the chain the pass calibrates on; `fhidden` the float model's own
    chain, carried only with CompressionConfig.target "float". A pass resumes from it."""

    block: int
    hidden: list
    fhidden: list | None = None


@dataclass
class BlockResult:
    """The one-shot result of one decoder block."""

    index: int
    linears: dict[str, CompressedLinear]
    rel_errors: dict[str, float]


class ModelBlocks:
    """The decoder blocks of a model held whole in memory, as the block-wise passes ask for them
    (`streamed.StreamedModel` is the same three members over a checkpoint read block by block)."""

    def __init__(self, model, info):
        layers = getattr(getattr(model, "model", None), "layers", None)
        if layers is None or len(layers) != info.n_layers:
            raise OneShotError(f"{info.architecture}: expected model.model.layers with {info.n_layers} decoder "
                               f"layers — unsupported model structure")
        self.model, self.layers, self.n_layers = model, layers, info.n_layers

    def layer0_inputs(self, windows: torch.Tensor, bs: int):
        return _layer0_inputs(self.model, windows, bs)

    @contextlib.contextmanager
    def block(self, i: int):
        """Block i, the model's own module: what a pass does to it stays in the model."""
        yield self.layers[i]


def as_blocks(model, info):
    """A block source for `model`: an HF model (torch module) is wrapped in ModelBlocks; a block
    source (streamed.StreamedModel) is returned as it is."""
    return ModelBlocks(model, info) if isinstance(model, torch.nn.Module) else model


def compress_block(layer, i: int, state: ChainState, kwargs, cfg, kept_of) -> tuple[BlockResult, ChainState]:
    """Compresses the seven linears of decoder block i (`layer`, which ends holding the compressed
    weights) calibrated on `state` (its inputs); returns them and the next block's inputs.
    kept_of(name, linear) -> groups each row keeps."""
    hidden, fhidden = state.hidden, state.fhidden
    res = BlockResult(i, {}, {})

    def compress_group(group, H, fn, aux):
        for lin in group:
            name = f"model.layers.{i}.{lin}"
            mod = layer.get_submodule(lin)
            cl, rel = fn(mod.weight, H, kept_of(name, lin), cfg.damp, name, aux)
            mod.weight.copy_(cl.dequantize())
            res.linears[name] = cl
            res.rel_errors[name] = rel

    if cfg.method == "obs" and fhidden is not None:
        # GPTAQ: each linear is asked for the float model's output on the float input
        float_layer = copy.deepcopy(layer)
        for hooked, group in _INPUT_GROUPS:
            where = f"model.layers.{i}.{hooked}"
            H, G = _block_input_pair(layer, float_layer, hooked, hidden, fhidden, kwargs, where)
            chol = _cholesky_inverse_upper(H, cfg.damp, where)
            compress_group(group, H, lambda W, H, k, dp, n, aux: compress_linear_obs(
                float_target_weight(W, H, aux[1], aux[0][0]), H, k, dp, n, chol=aux[0], bits=cfg.bits), (chol, G))
            del H, G, chol
        dense_out = None
        fhidden = [layer_output(float_layer(h, **kw)) for h, kw in zip(fhidden, kwargs)]
        del float_layer
    elif cfg.method == "obs":
        # true-sequential (GPTQ): each input group's Hessian is taken with the linears before
        # it in the block already compressed, so o_proj compensates what q/k/v lost, and so on
        for hooked, group in _INPUT_GROUPS:
            where = f"model.layers.{i}.{hooked}"
            H = _block_input_hessian(layer, hooked, hidden, kwargs, where)
            compress_group(group, H, lambda W, H, k, dp, n, aux: compress_linear_obs(W, H, k, dp, n, chol=aux,
                                                                                     bits=cfg.bits),
                           _cholesky_inverse_upper(H, cfg.damp, where))
            del H
        dense_out = None
    else:
        accs, dense_out = _dense_pass(layer, i, hidden, kwargs)
        for hooked, group in _INPUT_GROUPS:
            H = accs.pop(hooked).H
            compress_group(group, H, lambda W, H, k, dp, n, aux: compress_linear(W, H, k, dp, n, hinv=aux,
                                                                                 bits=cfg.bits),
                           hessian_inverse_diag(H, cfg.damp, f"model.layers.{i}.{hooked}"))
            del H

    if cfg.sequential or dense_out is None:
        hidden = [layer_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs)]
    else:
        hidden = dense_out
    return res, ChainState(i + 1, hidden, fhidden)


def compress_blocks(model, info, windows: torch.Tensor, cfg, batch_size: int = 8, progress: bool = True,
                    keep: dict[str, int] | None = None, resume: ChainState | None = None):
    """The one-shot pass as a generator: (BlockResult, ChainState after it) block by block.

    model: an HF model (compressed in place) or a block source (`as_blocks`); resume: the state a
    previous run of the same pass stopped at (its blocks < resume.block are not redone)."""
    from tqdm.auto import tqdm

    blocks = as_blocks(model, info)
    windows = torch.as_tensor(windows, dtype=torch.long)
    bs = max(1, min(int(batch_size), windows.shape[0]))
    uniform = {lin: fmt.kept_groups(info.linear_shape(lin)[1], cfg.sparsity) for lin in _LINEARS}

    def kept_of(name: str, lin: str) -> int:
        return int(keep[name]) if keep is not None and name in keep else uniform[lin]

    # embed: run the model until decoder layer 0, recording what it receives (under no_grad, not
    # inference mode: a streamed source materializes the embeddings there)
    hidden, kwargs = blocks.layer0_inputs(windows, bs)
    if resume is None:
        asym = getattr(cfg, "target", "layer") == "float" and cfg.sequential
        state = ChainState(0, hidden, [h.clone() for h in hidden] if asym else None)
    else:
        state = resume
    del hidden
    bar = tqdm(range(state.block, info.n_layers), desc="GQSA one-shot", unit="block", disable=not progress)
    for i in bar:
        with blocks.block(i) as layer, torch.inference_mode():
            res, state = compress_block(layer, i, state, kwargs, cfg, kept_of)
        bar.set_postfix(rel_err=f"{np.mean(list(res.rel_errors.values())):.4f}")
        yield res, state


def compress_model(model, info, windows: torch.Tensor, cfg, batch_size: int = 8,
                   progress: bool = True, keep: dict[str, int] | None = None) -> CompressionResult:
    """Compresses every decoder linear of `model` block by block (see module docstring).

    cfg: a CompressionConfig (sparsity, damp, sequential); batch_size: windows per forward pass
    (affects speed and memory only; H is the same up to float rounding)."""
    t0 = time.time()
    windows = torch.as_tensor(windows, dtype=torch.long)
    nsamples, seqlen = windows.shape
    result = CompressionResult(linears={}, rel_errors={}, seconds=0.0, nsamples=nsamples, seqlen=seqlen)
    for res, _ in compress_blocks(model, info, windows, cfg, batch_size=batch_size, progress=progress, keep=keep):
        result.linears.update(res.linears)
        result.rel_errors.update(res.rel_errors)
    result.seconds = time.time() - t0
    return result


# --- sensitivity probe for the bit allocation ----------------------------------------------------

def _dense_pass(layer, i: int, hidden, kwargs):
    """Runs block i on its inputs as it is; returns the Hessian accumulator of each of its four
    distinct linear inputs ({hooked linear: HessianAccumulator}) and the block's outputs."""
    accs, hooks = {}, []
    for hooked, _group in _INPUT_GROUPS:
        mod = layer.get_submodule(hooked)
        acc = HessianAccumulator(mod.in_features, f"model.layers.{i}.{hooked}")
        accs[hooked] = acc
        hooks.append(mod.register_forward_pre_hook(lambda m, args, acc=acc: acc.add(args[0])))
    try:
        dense_out = [layer_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs)]
    finally:
        for hk in hooks:
            hk.remove()
    return accs, dense_out


def _layer0_inputs(model, windows: torch.Tensor, bs: int, device: torch.device | None = None):
    """What decoder layer 0 receives, as per-batch lists (hidden states [bs, seq, width], keyword
    arguments): training.capture_layer_inputs cut into batches of `bs` windows."""
    hidden, kwargs = capture_layer_inputs(model, windows, batch_size=bs, device=device)
    hidden = list(hidden.split(bs))
    return hidden, [kwargs] * len(hidden)


def sensitivity_block(layer, i: int, hidden, kwargs, cfg, levels, n_probe_batches: int):
    """The sensitivity curves of block i's seven linears (`sensitivity_curves`) and the block's
    dense outputs (the next block's inputs). `layer` is left as it was."""
    from .allocation import TensorCurve, level_kept

    accs, dense_out = _dense_pass(layer, i, hidden, kwargs)
    ref = dense_out[:n_probe_batches]
    # the residual stream's mean square after this block (positions >= 1: the first token's
    # massive activation would otherwise set the scale of every later block)
    energy = sum(float(r[:, 1:].double().square().sum()) for r in ref) / sum(r[:, 1:].numel() for r in ref)
    curves = []
    for hooked, group in _INPUT_GROUPS:
        # the probe needs only diag(H^-1): H is factored in its own memory and diag(H^-1) solved a
        # slab of columns at a time, so each group adds no K x K matrix to the four Hessians
        # (memory._probe_working_set)
        L, dead = dampened_cholesky_(accs.pop(hooked).H, cfg.damp, f"model.layers.{i}.{hooked}")
        hinv = (inverse_diag_from_cholesky(L), dead)
        del L
        for lin in group:
            name = f"model.layers.{i}.{lin}"
            mod = layer.get_submodule(lin)
            w0 = mod.weight.detach().clone()
            kept = level_kept(mod.in_features, levels)
            errs = []
            try:
                for k in kept:
                    mod.weight.copy_(saliency_round(w0, hinv, k, name, cfg.bits).dequantize())
                    se = 0.0
                    n = 0
                    for r, h, kw in zip(ref, hidden, kwargs):
                        out = layer_output(layer(h, **kw))
                        se += float((out - r).double().square().sum())
                        n += out.numel()
                    errs.append(se / n)
            finally:
                mod.weight.copy_(w0)
            curves.append(TensorCurve(name, mod.out_features, mod.in_features, kept, tuple(errs), energy))
    return curves, dense_out


def sensitivity_blocks(model, info, windows: torch.Tensor, cfg, levels=None, probe: int = 4,
                       batch_size: int = 4, progress: bool = True, resume: ChainState | None = None):
    """The sensitivity probe as a generator: (curves of block i, ChainState after it) block by
    block (`sensitivity_curves`); model / resume as for `compress_blocks`."""
    from tqdm.auto import tqdm

    from .allocation import LEVELS

    levels = LEVELS if levels is None else levels
    blocks = as_blocks(model, info)
    windows = torch.as_tensor(windows, dtype=torch.long)
    bs = max(1, min(int(batch_size), windows.shape[0]))
    n_probe_batches = max(1, -(-min(probe, windows.shape[0]) // bs))
    hidden, kwargs = blocks.layer0_inputs(windows, bs)
    state = ChainState(0, hidden) if resume is None else resume
    del hidden
    bar = tqdm(range(state.block, info.n_layers), desc="GQSA sensitivity", unit="block", disable=not progress)
    for i in bar:
        with blocks.block(i) as layer, torch.inference_mode():
            curves, dense_out = sensitivity_block(layer, i, state.hidden, kwargs, cfg, levels, n_probe_batches)
        state = ChainState(i + 1, dense_out)
        yield curves, state


def sensitivity_curves(model, info, windows: torch.Tensor, cfg, levels=None, probe: int = 4,
                       batch_size: int = 4, progress: bool = True):
    """For every decoder linear, the error its block's output takes when that tensor alone is
    pruned to each keep level (allocation.LEVELS) with the fast saliency mask and 4-bit rounding:
    mean squared difference to the float block output on the first `probe` windows (the block's
    inputs are the float model's, the Hessians come from all `windows`). Returns a list of
    allocation.TensorCurve. The model is left unchanged."""
    return [c for curves, _ in sensitivity_blocks(model, info, windows, cfg, levels=levels, probe=probe,
                                                 batch_size=batch_size, progress=progress) for c in curves]
