"""BQPO — Block Quantization-Pruning Optimization (paper §3.3): block-wise training of GQS layers.

In:  the float HF model (its original weights: the targets; the trained weights start at the
     one-shot result's dequantized values, `GQSLinear.from_oneshot`), the
     one-shot result `{HF linear name: oneshot.CompressedLinear}` (masks, z, d), calibration windows
     LongTensor [nsamples, seqlen], a `BQPOConfig` (config.py; re-exported here).
Out: `run_bqpo(...)` -> (`quant_model`, `BQPOReport`): a copy of the model whose decoder linears are
     `fakequant.FrozenGQSLinear` (frozen q, trainable scale/zero: E2E-OQP's input;
     `compressed_from_model` turns it into the CompressedLinears export writes), and per-block MSE
     before/after and times.

For each decoder block i, one at a time:
    target     Y_i = float block_i(Xq_i)        (target="float-block", the default), or
               Y_i = float block_i(X_i)         X_0 = embeddings, X_{i+1} = Y_i   (target="float-chain")
    prediction P_i = GQS block_i(Xq_i)          Xq_0 = X_0, Xq_{i+1} = trained block_i(Xq_i)
    loss       MSE(P_i, Y_i), AdamW; trainable: the block's kept float weights (lr_weight), scales
               (lr_scale), zero points (lr_zero); norms, biases and everything else frozen; fp32
               (bf16/fp16 autocast only on CUDA).
The group masks never change (GQSLinear has no pruned weights to revive). After training, the
block's integer codes are frozen (`GQSLinear.to_frozen`, same forward bit for bit) and it produces
Xq_{i+1}. BQPO runs as its own pass after the one-shot pass (the masks come from one-shot's
sequential calibration), so the one-shot result stays a checkpoint of its own.

Caching: X (float chain, overwritten in place by the targets Y) and Xq (compressed chain,
overwritten in place by the next block's inputs) are nsamples x seqlen x width float32 each —
128 x 512 x 576 x 4 B = 151 MB for SmolLM2-135M — kept in memory, or with cache="disk" in two
np.memmap files under the checkpoint folder (or a temp folder).

Checkpoints (`checkpoint_dir`): after every block, atomically, `bqpo.ckpt` with the frozen state of
blocks <= i, both activation caches and the loss log; `resume=True` continues after the last
finished block. Every block's shuffling and RNGs are seeded from (seed, block), so a resumed run
equals an uninterrupted one bit for bit (tested). A NaN/Inf loss or weight raises TrainingError
naming the block, epoch and step.
"""

from __future__ import annotations

import dataclasses
import copy
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from .arch import LINEARS
from .config import BQPOConfig
from .fakequant import GQSLinear, FrozenGQSLinear, gqs_modules, swap_linear
from .training import (TrainingError, autocast, capture_layer_inputs, check_amp, check_finite, resolve_amp,
                       decoder_layers, layer_output, resolve_device, seeded)

__all__ = ["BQPOConfig", "BQPOReport", "run_bqpo", "compressed_from_model", "freeze_model"]

CKPT_NAME = "bqpo.ckpt"


@dataclass
class BQPOReport:
    loss_before: list[float] = field(default_factory=list)    # per block, MSE on the report windows
    loss_after: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    resumed_from: int = 0                                      # first block trained by this process

    def summary(self) -> str:
        lines = ["block  mse_before   mse_after   ratio   seconds"]
        for i, (b, a, s) in enumerate(zip(self.loss_before, self.loss_after, self.seconds)):
            lines.append(f"{i:5d}  {b:10.4g}  {a:10.4g}  {a / b if b else float('nan'):6.3f}  {s:8.1f}")
        return "\n".join(lines)


class _Cache:
    """float32 [n, seq, width] activations in memory or in an np.memmap file."""

    def __init__(self, init: torch.Tensor, folder: Path | None, name: str):
        if folder is None:
            self.t = init.clone()
        else:
            folder.mkdir(parents=True, exist_ok=True)
            mm = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=np.float32,
                                           shape=tuple(init.shape))
            self.t = torch.from_numpy(mm)
            self.t.copy_(init)

    def __len__(self):
        return self.t.shape[0]


def _fingerprint(cfg: BQPOConfig, model, compressed, windows) -> str:
    parts = [cfg.fingerprint_dict(), model.config.to_dict(), windows]
    for name in sorted(compressed):
        cl = compressed[name]
        parts += [name, cl.indices, cl.q, cl.z, cl.d]
    return ckpt.run_fingerprint(*parts)


def _mse_pass(layer, xin: torch.Tensor, target: torch.Tensor, kwargs, bs, device, amp,
              head: int, write_back: bool = False) -> float:
    """Mean MSE of layer(xin) vs target over the first `head` windows; with write_back, the layer
    runs on every window and its outputs overwrite xin."""
    total = 0.0
    end = len(xin) if write_back else min(head, len(xin))
    with torch.no_grad():
        for i in range(0, end, bs):
            x = xin[i:i + bs].to(device)
            with autocast(device, amp):
                y = layer_output(layer(x, **kwargs)).float()
            if i < head:
                k = min(bs, head - i)
                total += F.mse_loss(y[:k], target[i:i + k].to(device), reduction="sum").item()
            if write_back:
                xin[i:i + bs] = y.cpu()
    return total / target[:head].numel()


def _float_pass(layer, x: torch.Tensor, kwargs, bs, device) -> None:
    with torch.no_grad():
        for i in range(0, len(x), bs):
            x[i:i + bs] = layer_output(layer(x[i:i + bs].to(device), **kwargs)).float().cpu()


def freeze_model(model) -> None:
    """Replaces every GQSLinear of `model` by its FrozenGQSLinear (frozen integer codes)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, GQSLinear):
            swap_linear(model, name, m.to_frozen())


def compressed_from_model(model) -> dict:
    """{HF linear name: oneshot.CompressedLinear} of every GQS layer: what export writes."""
    return {name: m.to_compressed() for name, m in gqs_modules(model).items()}


def _block_state(model, i: int) -> dict:
    prefix = f"model.layers.{i}."
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k.startswith(prefix)}


def _install_frozen(model, compressed, i: int, state: dict, device) -> None:
    """Rebuilds block i of the quant model as FrozenGQSLinears from a checkpointed state."""
    layer = decoder_layers(model)[i]
    for lin in LINEARS:
        name = f"model.layers.{i}.{lin}"
        old = layer.get_submodule(lin)
        bias = getattr(old, "bias", None)
        fz = FrozenGQSLinear.from_compressed(compressed[name], bias).to(device)
        swap_linear(layer, lin, fz)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ckpt.CheckpointError(f"checkpoint block {i}: unexpected keys {unexpected[:3]}")


def train_block(i: int, n_layers: int, layer_f, layer_q, compressed: dict, xf: torch.Tensor, xq: torch.Tensor,
                kwargs, cfg: BQPOConfig, device, log=print) -> tuple[float, float, float]:
    """Trains decoder block i (see the module docstring): `layer_f` the float block, `layer_q` the
    block to train (its seven linears are replaced by GQSLinear from `compressed` {linear: one-shot
    CompressedLinear}, and frozen at the end), xf / xq the float and compressed chains (xf ends
    holding the block's targets, xq the next block's inputs). cfg.amp must be resolved
    (training.resolve_amp). The one loop of the whole-model and the streamed BQPO.
    -> (MSE before, MSE after, seconds)."""
    from tqdm.auto import tqdm

    t0 = time.time()
    bs = cfg.batch_size
    n = len(xf)
    steps_per_epoch = (n + bs - 1) // bs
    gen = seeded(cfg.seed, "bqpo", i)
    if cfg.target == "float-block":
        xf.copy_(xq)                                              # float block on Xq_i
    _float_pass(layer_f, xf, kwargs, bs, device)                 # xf now holds the targets Y_i

    params_w, params_s, params_z = [], [], []
    for lin in LINEARS:
        fl = layer_f.get_submodule(lin)
        g = GQSLinear.from_oneshot(compressed[lin], None if fl.bias is None else fl.bias.detach().cpu()).to(device)
        swap_linear(layer_q, lin, g)
        params_w.append(g.weight)
        params_s.append(g.scale)
        params_z.append(g.zero)
    named = [(n_, p) for n_, p in layer_q.named_parameters() if p.requires_grad]
    groups = [{"params": params_w, "lr": cfg.lr_weight}, {"params": params_s, "lr": cfg.lr_scale},
              {"params": params_z, "lr": cfg.lr_zero}]
    opt = torch.optim.AdamW([g_ for g_ in groups if g_["lr"] > 0], weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None

    before = _mse_pass(layer_q, xq, xf, kwargs, bs, device, cfg.amp, cfg.report_windows)
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc=f"BQPO block {i}/{n_layers}", unit="step",
               disable=not cfg.progress, leave=False)
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        for step in range(steps_per_epoch):
            idx = perm[step * bs:(step + 1) * bs]
            x, y = xq[idx].to(device), xf[idx].to(device)
            with autocast(device, cfg.amp):
                out = layer_output(layer_q(x, **kwargs)).float()
            loss = F.mse_loss(out, y)
            where = f"BQPO block {i} epoch {epoch} step {step}"
            check_finite(where, loss)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            check_finite(where, None, named)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4g}")
    bar.close()

    freeze_model(layer_q)                                         # freeze q: same forward, bit-exact
    after = _mse_pass(layer_q, xq, xf, kwargs, bs, device, cfg.amp, cfg.report_windows,
                      write_back=True)                              # xq <- Xq_{i+1}
    seconds = time.time() - t0
    log(f"BQPO block {i}: mse {before:.4g} -> {after:.4g} ({after / before if before else 0:.3f}x) "
        f"in {seconds:.1f} s")
    return before, after, seconds


def run_bqpo(float_model, compressed: dict, windows: torch.Tensor, cfg: BQPOConfig,
             on_block_end: Callable[[int], None] | None = None, log: Callable[[str], None] = print):
    """Trains every decoder block of a copy of `float_model` (see module docstring).

    `float_model` is not modified. `compressed` must hold all seven linears of every block.
    `on_block_end(i)` is called after block i's checkpoint is written (tests use it to interrupt)."""
    device = resolve_device(cfg.device)
    cfg = dataclasses.replace(cfg, amp=resolve_amp(cfg.amp, device))
    check_amp(cfg.amp, device)
    layers_f = decoder_layers(float_model)
    n_layers = len(layers_f)
    for i in range(n_layers):
        for lin in LINEARS:
            if f"model.layers.{i}.{lin}" not in compressed:
                raise TrainingError(f"BQPO: no one-shot result for model.layers.{i}.{lin} — run the one-shot "
                                    f"pass on the whole model first")
    windows = torch.as_tensor(windows, dtype=torch.long)
    fp = _fingerprint(cfg, float_model, compressed, windows)
    ck_path = Path(cfg.checkpoint_dir) / CKPT_NAME if cfg.checkpoint_dir else None
    bs = cfg.batch_size

    float_model.to(device)
    quant_model = copy.deepcopy(float_model)
    for p in quant_model.parameters():
        p.requires_grad_(False)
    layers_q = decoder_layers(quant_model)

    x0, kwargs = capture_layer_inputs(float_model, windows, batch_size=bs, device=device)
    tmpdir = None
    cache_dir = None
    if cfg.cache == "disk":
        if cfg.checkpoint_dir:
            cache_dir = Path(cfg.checkpoint_dir) / "bqpo-cache"
        else:
            tmpdir = tempfile.TemporaryDirectory(prefix="gqsa-bqpo-")
            cache_dir = Path(tmpdir.name)
    xf = _Cache(x0, cache_dir, "float_chain").t        # X_i, then overwritten by Y_i
    xq = _Cache(x0, cache_dir, "quant_chain").t        # Xq_i
    del x0

    report = BQPOReport()
    start = 0
    if cfg.resume and ck_path is not None and ck_path.exists():
        meta, payload = ckpt.load(ck_path, expect={"stage": "bqpo", "fingerprint": fp})
        start = int(meta["next_block"])
        for i in range(start):
            _install_frozen(quant_model, compressed, i, payload["blocks"][i], device)
        xf.copy_(payload["xf"])
        xq.copy_(payload["xq"])
        report.loss_before, report.loss_after = list(payload["loss_before"]), list(payload["loss_after"])
        report.seconds = list(payload["seconds"])
        log(f"BQPO: resumed from {ck_path} after block {start - 1}")
    elif cfg.resume:
        log(f"BQPO: --resume given but no checkpoint at {ck_path}; starting from block 0")
    report.resumed_from = start
    block_states = [payload["blocks"][i] for i in range(start)] if start else []

    for i in range(start, n_layers):
        compressed_i = {lin: compressed[f"model.layers.{i}.{lin}"] for lin in LINEARS}
        before, after, seconds = train_block(i, n_layers, layers_f[i], layers_q[i], compressed_i, xf, xq, kwargs,
                                             cfg, device, log)
        report.loss_before.append(before)
        report.loss_after.append(after)
        report.seconds.append(seconds)

        block_states.append(_block_state(quant_model, i))
        if ck_path is not None:
            ckpt.save(ck_path, {"stage": "bqpo", "fingerprint": fp, "next_block": i + 1, "n_layers": n_layers},
                      {"blocks": block_states, "xf": xf, "xq": xq, "loss_before": report.loss_before,
                       "loss_after": report.loss_after, "seconds": report.seconds})
        if on_block_end is not None:
            on_block_end(i)

    if tmpdir is not None:
        del xf, xq
        tmpdir.cleanup()
    return quant_model, report
