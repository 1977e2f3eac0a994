"""Hessian-based saliency of weight groups and the per-row group mask (paper §3.1-3.2, Eq. 4).

In:  calibration activations X of one linear layer (rows = tokens, columns = its K inputs);
     its weight W [N, K].
Out: `HessianAccumulator` -> H = 2/n * sum_t x_t x_t^T  (float64 [K, K]);
     `hessian_inverse_diag(H, damp)` -> diag(H_damped^-1) (float64 [K]) via Cholesky;
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

__all__ = ["SaliencyError", "HessianAccumulator", "dampened_cholesky", "hessian_inverse_diag",
           "inverse_diag_from_cholesky", "weight_saliency", "group_saliency", "select_groups"]


class SaliencyError(GQSAError, RuntimeError):
    """The Hessian of a layer could not be inverted, or inputs have the wrong shape."""


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
        self.H.add_((x2.T @ x2).to(torch.float64), alpha=2.0 / total)
        self.n = total


def dampened_cholesky(H: torch.Tensor, damp: float, name: str = "?") -> tuple[torch.Tensor, torch.Tensor]:
    """L (float64, lower) with L L^T = H + damp*mean(diag H)*I, and the mask of dead inputs.

    Dead inputs (H_jj == 0: the input was always zero) get H_jj = 1 first so the matrix stays
    positive definite (as GPTQ does); callers give their weights saliency 0.
    """
    H = H.to(torch.float64).clone()
    diag = torch.diagonal(H)
    dead = diag == 0
    if bool(dead.all()):
        raise SaliencyError(f"{name}: every input of the layer was zero on the calibration data — the "
                            f"saliency is undefined; use more or different calibration text")
    diag[dead] = 1.0
    H += torch.eye(H.shape[0], dtype=H.dtype) * (damp * float(diag.mean()))
    L, info = torch.linalg.cholesky_ex(H)
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
    # H^-1 = L^-T L^-1, so [H^-1]_jj = sum_i (L^-1)_ij^2: one triangular solve, no full inverse
    # (torch.cholesky_inverse is several times slower on the CPU).
    Linv = torch.linalg.solve_triangular(L, torch.eye(L.shape[0], dtype=L.dtype), upper=False)
    return Linv.square().sum(dim=0)


def weight_saliency(W: torch.Tensor, hinv_diag: torch.Tensor, dead: torch.Tensor | None = None) -> torch.Tensor:
    """s_ij = w_ij^2 / [H^-1]_jj (paper Eq. 4), float64 [N, K]; 0 for dead inputs."""
    s = W.to(torch.float64).square() / hinv_diag.to(torch.float64)[None, :]
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
