"""One-shot GQSA compression: decide, for every decoder linear, which groups survive and their
4-bit codes (paper §3.1-3.2; the BQPO / E2E-OQP training of §3.3-3.4 comes later).

In:  a float32 HF causal LM (LLaMA / Qwen2), its `ModelInfo`, calibration windows
     LongTensor [nsamples, seqlen], a `CompressionConfig`.
Out: `compress_model(...)` -> `CompressionResult` with one `CompressedLinear` per decoder linear
     (q, k, v, o, gate, up, down of every layer), keyed by HF module name, e.g.
     "model.layers.3.self_attn.q_proj". The model is modified in place: on return each of those
     linears holds exactly the dequantized compressed weight (`CompressedLinear.dequantize()`).

`CompressedLinear` is the seam between deciding and storing: kept group indices, q, z, d and the
logical width, in HF row order. Packing into gqsa4 bytes (and llama.cpp's q/k row permutation)
is `export`'s job.

Order of work (the GPTQ/SparseGPT block-wise scheme): the calibration windows are embedded once;
then for each decoder block: (1) run the block on its inputs with hooks accumulating H = 2XX^T/n
for the four distinct linear inputs (q/k/v share the attention input, gate/up the MLP input);
(2) compress its seven linears from W and H (Eq. 4 saliency -> per-row mask -> min-max 4-bit);
(3) with `sequential=True` (default) run the now-compressed block again, and its outputs are the
next block's inputs, so later blocks are calibrated on the activations they will really see
(GPTQ's sequential mode); with `sequential=False` the dense outputs of step (1) are used instead.
Within a block all seven linears see the block's dense inputs (no intra-block re-run): one extra
pass per block instead of four.

Invariants: quantization is bit-exact with `codec.quantize_groups` (tested); every row keeps
exactly `format.kept_groups(K, sparsity)` groups, sorted; non-finite weights raise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import format as fmt
from .saliency import (HessianAccumulator, group_saliency, hessian_inverse_diag, select_groups,
                       weight_saliency)

__all__ = ["CompressedLinear", "CompressionResult", "OneShotError", "quantize_groups_torch",
           "dequantize_groups_torch", "compress_linear", "compress_model", "apply_compressed",
           "decoder_linear_names"]

_FP16_MAX = 65504.0
_FP16_MIN_SUBNORMAL = 2.0 ** -24

# linears that share one input: the first is hooked, its H serves the group
_INPUT_GROUPS = (
    ("self_attn.q_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.o_proj", ("self_attn.o_proj",)),
    ("mlp.gate_proj", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.down_proj", ("mlp.down_proj",)),
)
_LINEARS = tuple(n for _, group in _INPUT_GROUPS for n in group)


class OneShotError(RuntimeError):
    """Compression could not proceed (bad weights, unexpected model structure)."""


@dataclass(frozen=True, eq=False)
class CompressedLinear:
    """One compressed linear W[N, K] in HF row order.

    indices int32 [N, n_kept]: kept group numbers per row, strictly increasing, < K/16
    q uint8 [N, n_kept, 16]: 4-bit codes 0..15; z uint8 [N, n_kept]: zero points 0..15
    d float16 [N, n_kept]: scales;  w = (q - z) * d inside kept groups, 0 elsewhere.
    """

    name: str
    width: int
    indices: np.ndarray
    q: np.ndarray
    z: np.ndarray
    d: np.ndarray

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

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n_kept / (self.width // fmt.GROUP_SIZE)

    def permute_rows(self, perm: np.ndarray) -> "CompressedLinear":
        """Rows reordered: row r of the result is row perm[r] of self (rows are independent)."""
        return CompressedLinear(self.name, self.width, self.indices[perm], self.q[perm], self.z[perm],
                                self.d[perm])

    def dequantize(self) -> torch.Tensor:
        """float32 [N, width], exact (the same values as codec.dequantize of the packed rows)."""
        vals = dequantize_groups_torch(torch.from_numpy(self.q), torch.from_numpy(self.z),
                                       torch.from_numpy(self.d))
        out = torch.zeros(self.rows, self.width // fmt.GROUP_SIZE, fmt.GROUP_SIZE, dtype=torch.float32)
        idx = torch.from_numpy(self.indices.astype(np.int64))[:, :, None].expand(-1, -1, fmt.GROUP_SIZE)
        out.scatter_(1, idx, vals)
        return out.reshape(self.rows, self.width)


@dataclass
class CompressionResult:
    linears: dict[str, CompressedLinear]
    rel_errors: dict[str, float]          # tr(D H D^T) / tr(W H W^T), D = W - W_hat: output error share
    seconds: float
    nsamples: int
    seqlen: int
    notes: list[str] = field(default_factory=list)


# --- min-max quantization, bit-exact with codec.quantize_groups ----------------------------------

def quantize_groups_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max 4-bit quantization of groups x [..., 16] (docs/FORMAT.md "Reference quantizer").

    Returns q uint8 [..., 16], z uint8 [...], d float16 [...] — bit-exact with
    codec.quantize_groups: the same float32 operations in the same order, fp16 rounding to nearest
    even, torch.round = rint (half to even).
    """
    if x.shape[-1] != fmt.GROUP_SIZE:
        raise ValueError(f"quantize_groups_torch needs groups of {fmt.GROUP_SIZE} in the last axis, got {tuple(x.shape)}")
    x = x.to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise OneShotError("non-finite weight in a group to quantize — the model has NaN/inf weights")
    lo = torch.clamp(x.amin(dim=-1), max=0.0)            # the range always contains 0
    hi = torch.clamp(x.amax(dim=-1), min=0.0)
    s = (hi - lo) / torch.tensor(float(fmt.QMAX), dtype=torch.float32)
    d = s.to(torch.float16)                              # RNE; overflow -> inf
    d = torch.where((s > 0) & (d == 0), torch.tensor(_FP16_MIN_SUBNORMAL, dtype=torch.float16), d)
    d = torch.where(d > _FP16_MAX, torch.tensor(_FP16_MAX, dtype=torch.float16), d)
    d = torch.where(s == 0, torch.tensor(0.0, dtype=torch.float16), d)
    df = d.to(torch.float32)
    zero = df == 0
    safe = torch.where(zero, torch.ones_like(df), df)
    z = torch.clamp(torch.round(-lo / safe), 0, fmt.QMAX)
    z = torch.where(zero, torch.zeros_like(z), z)
    q = torch.clamp(torch.round(x / safe[..., None]) + z[..., None], 0, fmt.QMAX)
    q = torch.where(zero[..., None], torch.zeros_like(q), q)
    return q.to(torch.uint8), z.to(torch.uint8), d


def dequantize_groups_torch(q: torch.Tensor, z: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """(q - z) * d in float32, [..., 16]; exact (5-bit integer times an fp16)."""
    return (q.to(torch.float32) - z.to(torch.float32)[..., None]) * d.to(torch.float32)[..., None]


# --- one linear ------------------------------------------------------------------------------------

def compress_linear(W: torch.Tensor, H: torch.Tensor, n_kept: int, damp: float, name: str = "?",
                    hinv: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[CompressedLinear, float]:
    """Compresses W [N, K] given its input Hessian H [K, K]; returns (result, relative output error).

    hinv: `hessian_inverse_diag(H, damp)` if already computed (linears sharing an input share it).
    """
    W = W.detach().to(torch.float32)
    n, k = W.shape
    if not bool(torch.isfinite(W).all()):
        bad = (~torch.isfinite(W)).nonzero()[0].tolist()
        raise OneShotError(f"{name}: non-finite weight {W[bad[0], bad[1]].item()} at {bad} — the checkpoint is corrupt")
    hinv_diag, dead = hinv if hinv is not None else hessian_inverse_diag(H, damp, name)
    kept = select_groups(group_saliency(weight_saliency(W, hinv_diag, dead)), n_kept)
    groups = W.reshape(n, k // fmt.GROUP_SIZE, fmt.GROUP_SIZE)
    sel = torch.gather(groups, 1, kept[:, :, None].expand(-1, -1, fmt.GROUP_SIZE))
    q, z, d = quantize_groups_torch(sel)
    cl = CompressedLinear(name, k, kept.to(torch.int32).numpy(), q.numpy(), z.numpy(), d.numpy())
    # share of the layer's output energy lost: tr(D H D^T) / tr(W H W^T) (a diagnostic; float32)
    H32 = H.to(torch.float32)
    D = W - cl.dequantize()
    denom = float(((W @ H32) * W).sum(dtype=torch.float64))
    rel = float(((D @ H32) * D).sum(dtype=torch.float64)) / denom if denom > 0 else 0.0
    return cl, rel


def decoder_linear_names(n_layers: int) -> list[str]:
    return [f"model.layers.{i}.{lin}" for i in range(n_layers) for lin in _LINEARS]


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


class _Catcher(torch.nn.Module):
    """Stands in for decoder layer 0 to record its inputs (hidden states and keyword arguments)."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer
        self.attention_type = getattr(layer, "attention_type", None)
        self.captured: list[tuple[torch.Tensor, dict]] = []

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise OneShotError("decoder layer called with positional arguments besides hidden_states; "
                               "this transformers version is not supported by the block-wise calibration")
        self.captured.append((hidden_states.detach(), kwargs))
        raise _Stop


def _layer_out(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def compress_model(model, info, windows: torch.Tensor, cfg, batch_size: int = 8,
                   progress: bool = True) -> CompressionResult:
    """Compresses every decoder linear of `model` block by block (see module docstring).

    cfg: a CompressionConfig (sparsity, damp, sequential); batch_size: windows per forward pass
    (affects speed and memory only; H is the same up to float rounding)."""
    from tqdm.auto import tqdm

    t0 = time.time()
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or len(layers) != info.n_layers:
        raise OneShotError(f"{info.architecture}: expected model.model.layers with {info.n_layers} decoder "
                           f"layers — unsupported model structure")
    windows = torch.as_tensor(windows, dtype=torch.long)
    nsamples, seqlen = windows.shape
    bs = max(1, min(int(batch_size), nsamples))
    batches = [windows[i:i + bs] for i in range(0, nsamples, bs)]

    n_kept = {lin: fmt.kept_groups(info.linear_shape(lin)[1], cfg.sparsity) for lin in _LINEARS}
    result = CompressionResult(linears={}, rel_errors={}, seconds=0.0, nsamples=nsamples, seqlen=seqlen)

    with torch.inference_mode():
        # 1. embed: run the model until decoder layer 0, recording what it receives
        catcher = _Catcher(layers[0])
        layers[0] = catcher
        try:
            for b in batches:
                try:
                    inner(input_ids=b, use_cache=False)
                except _Stop:
                    pass
        finally:
            layers[0] = catcher.layer
        if len(catcher.captured) != len(batches):
            raise OneShotError("could not capture the inputs of decoder layer 0")
        hidden = [h for h, _ in catcher.captured]
        kwargs = [kw for _, kw in catcher.captured]

        bar = tqdm(range(info.n_layers), desc="GQSA one-shot", unit="block", disable=not progress)
        for i in bar:
            layer = layers[i]
            accs = {}
            hooks = []
            for hooked, _group in _INPUT_GROUPS:
                mod = layer.get_submodule(hooked)
                acc = HessianAccumulator(mod.in_features, f"model.layers.{i}.{hooked}")
                accs[hooked] = acc
                hooks.append(mod.register_forward_pre_hook(lambda m, args, acc=acc: acc.add(args[0])))
            try:
                dense_out = [_layer_out(layer(h, **kw)) for h, kw in zip(hidden, kwargs)]
            finally:
                for hk in hooks:
                    hk.remove()

            errs = []
            for hooked, group in _INPUT_GROUPS:
                H = accs[hooked].H
                hinv = hessian_inverse_diag(H, cfg.damp, f"model.layers.{i}.{hooked}")
                for lin in group:
                    name = f"model.layers.{i}.{lin}"
                    mod = layer.get_submodule(lin)
                    cl, rel = compress_linear(mod.weight, H, n_kept[lin], cfg.damp, name, hinv=hinv)
                    mod.weight.copy_(cl.dequantize())
                    result.linears[name] = cl
                    result.rel_errors[name] = rel
                    errs.append(rel)
            del accs

            if cfg.sequential:
                hidden = [_layer_out(layer(h, **kw)) for h, kw in zip(hidden, kwargs)]
                del dense_out
            else:
                hidden = dense_out
            bar.set_postfix(rel_err=f"{np.mean(errs):.4f}")

    result.seconds = time.time() - t0
    return result
