"""Hessian-based saliency of weight groups and the per-row group mask (paper §3.1-3.2, Eq. 4).

In:  calibration activations X of one linear layer (rows = tokens, columns = its K inputs);
     its weight W [N, K].
Out: `HessianAccumulator` -> H = 2/n * sum_t x_t x_t^T  (float64 [K, K]);
     `hessian_inverse_diag(H, damp)` -> diag(H_damped^-1) (float64 [K]) via Cholesky;
     `dampened_cholesky_(H, damp)` -> its Cholesky factor written into H's own memory (H given up);
     `weight_saliency(W, hinv_diag)` -> s_ij = w_ij^2 / [H^-1]_jj   (paper Eq. 4);
     `group_saliency(s)` -> mean of s over each group of 16 consecutive inputs, [N, K/16];
     `select_groups(gs, n_kept)` -> LongTensor [N, n_kept]: per output row the n_kept most
     salient groups, indices sorted ascending (as the gqsa4 format stores them).

Invariants: every row keeps exactly n_kept distinct groups; ties are broken towards the lower group
index (a stable sort), so the mask is deterministic; an input that never fired (H_jj = 0) gets
saliency 0, so its groups are pruned first.

Why Eq. 4 uses the inverse Hessian: w^2 / [H^-1]_jj is the increase of the layer's squared output
error when w alone is removed and the others are optimally adjusted (Optimal Brain Surgeon); it
weighs a weight by how strongly its input is excited, not just by its magnitude. Dampening
H + damp * mean(diag H) * I (GPTQ/SparseGPT, damp = 1 %) keeps the inverse finite for inputs
with (near-)zero variance.
"""

from __future__ import annotations

import torch

from . import format as fmt
from .errors import GQSAError

__all__ = ["SaliencyError", "HessianAccumulator", "dampened_cholesky", "dampened_cholesky_", "hessian_inverse_diag",
           "inverse_diag_from_cholesky", "weight_saliency", "group_saliency", "select_groups"]


class SaliencyError(GQSAError, RuntimeError):
    """The Hessian of a layer could not be inverted, or inputs have the wrong shape."""


# elements of the float64 slabs the K x K helpers below work in (64 MB): bounded temporaries
# instead of K x K ones (the streamed conversion's memory budget, memory.py)
_SLAB = 1 << 23


def _rows_per_slab(width: int) -> int:
    return max(1, _SLAB // max(1, width))


class HessianAccumulator:
    """Running H = 2/n * X^T X over all tokens seen (float64; each batch's product in float32)."""

    def __init__(self, width: int, name: str = "?"):
        self.width = int(width)
        self.name = name
        self.H = torch.zeros(self.width, self.width, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """x: [..., width] activations; every leading index is one token."""
        if x.shape[-1] != self.width:
            raise SaliencyError(f"{self.name}: activations have width {x.shape[-1]}, expected {self.width}")
        x2 = x.detach().reshape(-1, self.width).to(torch.float32)
        m = x2.shape[0]
        if m == 0:
            return
        total = self.n + m
        self.H.mul_(self.n / total)
        xx = x2.T @ x2
        # widened to float64 a slab of rows at a time: no K x K float64 temporary beside H (the same
        # element-wise sums as one `add_` of the whole product)
        rows = _rows_per_slab(self.width)
        for r0 in range(0, self.width, rows):
            self.H[r0:r0 + rows].add_(xx[r0:r0 + rows].to(torch.float64), alpha=2.0 / total)
        self.n = total


def dampened_cholesky(H: torch.Tensor, damp: float, name: str = "?") -> tuple[torch.Tensor, torch.Tensor]:
    """L (float64, lower) with L L^T = H + damp*mean(diag H)*I, and the mask of dead inputs; H is
    left as it was (`dampened_cholesky_` factors a float64 copy of it).

    Dead inputs (H_jj == 0: the input was always zero) get H_jj = 1 first so the matrix stays
    positive definite (as GPTQ does); callers give their weights saliency 0.
    """
    return dampened_cholesky_(H.to(torch.float64, memory_format=torch.contiguous_format, copy=True), damp, name)


def dampened_cholesky_(H: torch.Tensor, damp: float, name: str = "?") -> tuple[torch.Tensor, torch.Tensor]:
    """`dampened_cholesky` in H's own memory: H (float64 [K, K], contiguous; the caller gives it up)
    is overwritten and L is returned as a view of it, so no second K x K matrix is made. The same
    factor, bit for bit: the same dampening, and LAPACK's factorization of the same lower triangle
    (mirrored into the upper one first, as the factor is written column-major into H's memory)."""
    if H.dtype != torch.float64 or H.ndim != 2 or H.shape[0] != H.shape[1] or not H.is_contiguous():
        raise SaliencyError(f"{name}: in-place factoring needs a contiguous square float64 matrix, got "
                            f"{H.dtype} {tuple(H.shape)}")
    diag = torch.diagonal(H)
    dead = diag == 0
    if bool(dead.all()):
        raise SaliencyError(f"{name}: every input of the layer was zero on the calibration data — the "
                            f"saliency is undefined; use more or different calibration text")
    diag[dead] = 1.0
    diag.add_(damp * float(diag.mean()))
    k = H.shape[0]
    rows = _rows_per_slab(k)
    for r0 in range(0, k, rows):
        r1 = min(k, r0 + rows)
        H[r0:r1, r1:].copy_(H[r1:, r0:r1].mT)
        d = H[r0:r1, r0:r1]
        d.copy_(torch.tril(d) + torch.tril(d, -1).mT)
    L = H.mT                                    # column-major, as torch.linalg.cholesky writes its result
    info = torch.empty((), dtype=torch.int32)
    torch.linalg.cholesky_ex(L, out=(L, info))
    if int(info) != 0:
        raise SaliencyError(f"{name}: the dampened Hessian is not positive definite (Cholesky failed at "
                            f"column {int(info) - 1}, damp={damp}) — raise --damp (e.g. 0.1) or use more "
                            f"calibration samples")
    return L, dead


def hessian_inverse_diag(H: torch.Tensor, damp: float, name: str = "?") -> tuple[torch.Tensor, torch.Tensor]:
    """diag of (H + damp*mean(diag H)*I)^-1 via Cholesky, float64 [K]; and the mask of dead inputs
    (`dampened_cholesky`)."""
    L, dead = dampened_cholesky(H, damp, name)
    return inverse_diag_from_cholesky(L), dead


def inverse_diag_from_cholesky(L: torch.Tensor) -> torch.Tensor:
    """diag((L L^T)^-1), float64 [K], from the lower Cholesky factor L (`dampened_cholesky`).
    A caller that holds H only through an accumulator can drop it between the two steps, so H, L
    and the inverse are never alive together (the streamed conversion's memory budget)."""
    # H^-1 = L^-T L^-1, so [H^-1]_jj = sum_i (L^-1)_ij^2: triangular solves, no full inverse
    # (torch.cholesky_inverse is several times slower on the CPU); L^-1 a slab of columns at a time
    # (the same as one solve of the whole identity, to float64 rounding), never K x K beside L
    k = L.shape[0]
    cols = _rows_per_slab(k)
    out = torch.empty(k, dtype=L.dtype)
    for j0 in range(0, k, cols):
        j1 = min(k, j0 + cols)
        eye = torch.zeros(k, j1 - j0, dtype=L.dtype)
        eye[j0:j1].fill_diagonal_(1.0)
        out[j0:j1] = torch.linalg.solve_triangular(L, eye, upper=False).square().sum(dim=0)
    return out


def weight_saliency(W: torch.Tensor, hinv_diag: torch.Tensor, dead: torch.Tensor | None = None) -> torch.Tensor:
    """s_ij = w_ij^2 / [H^-1]_jj (paper Eq. 4), float64 [N, K]; 0 for dead inputs."""
    s = W.to(torch.float64, copy=True)          # squared and divided in place: one N x K float64
    s.square_().div_(hinv_diag.to(torch.float64)[None, :])
    if dead is not None and bool(dead.any()):
        s[:, dead] = 0.0
    return s


def group_saliency(s: torch.Tensor, group_size: int = fmt.GROUP_SIZE) -> torch.Tensor:
    """Mean saliency of each group of `group_size` consecutive inputs: [N, K] -> [N, K/group_size]."""
    n, k = s.shape
    if k % group_size:
        raise SaliencyError(f"width {k} is not a multiple of the group size {group_size}")
    return s.reshape(n, k // group_size, group_size).mean(dim=-1)


def select_groups(gs: torch.Tensor, n_kept: int) -> torch.Tensor:
    """The n_kept most salient groups of each row, sorted ascending, int64 [N, n_kept]."""
    n, g = gs.shape
    if not 1 <= n_kept <= g:
        raise SaliencyError(f"n_kept = {n_kept} must be in 1..{g}")
    order = torch.sort(gs, dim=1, descending=True, stable=True).indices[:, :n_kept]
    return torch.sort(order, dim=1).values
