"""The streamed training (issue 16): BQPO and E2E-OQP on a checkpoint read a decoder block at a time,
without a float32 copy of the whole model.

In:  a `streamed.StreamedModel` (the checkpoint, one float32 block at a time), the one-shot result as
     a `streamed.BlockStore` (gqsa4 rows on disk), training windows, a `BQPOConfig` / `E2EConfig`.
Out: `run_bqpo_streamed(...)` -> (a BlockStore of the trained blocks, `bqpo.BQPOReport`);
     `float_final_hidden(...)` -> the float model's final hidden states on the E2E-OQP windows;
     `student_model(...)` -> the E2E-OQP student; `run_e2e_streamed(...)` -> (student, `e2e.E2EReport`);
     `put_blocks(student, store)` writes the trained linears back as gqsa4 rows, a block at a time.

BQPO: per block i, the float block read from the checkpoint gives the target (config.target:
"float-block", the float block applied to the compressed chain's input, or "float-chain", the float
model's own chain, carried along); a copy of that block with its linears as `GQSLinear` (from the
one-shot rows) is trained by `bqpo.train_block` — the loop run_bqpo runs on a model in memory — then
frozen and written to the output BlockStore with its float scales and zeros (E2E-OQP continues from
those, as it does after the whole-model BQPO). Holds: two float32 blocks, the two chains.

E2E-OQP: the student is the meta-device model of the StreamedModel with the embeddings, head and
norms (and biases) read in float32 and every decoder linear a `fakequant.PackedGQSLinear` (codes two
to a byte, the weight expanded per call and never saved); each decoder layer runs under activation
checkpointing (non-reentrant), so the backward keeps only the layers' inputs and recomputes one layer
at a time. The teacher is no model: one streamed float pass over the E2E-OQP windows keeps the
float model's final hidden states (fp16 by default), and each step's teacher logits are recomputed
from them through the float final norm and the (frozen) head (`e2e.HiddenStateTeacher`). The
training loop, loss, optimizer, checkpoints and resume are `e2e.run_e2e`'s, unchanged; one epoch
gives the whole-model path's scales and zeros to float tolerance (tests/test_streamed_train.py).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .training import TrainingError, autocast, check_amp, layer_output, resolve_amp, resolve_device, to_device

__all__ = ["float_final_hidden", "student_model", "run_e2e_streamed", "run_bqpo_streamed", "put_blocks",
           "checkpoint_layers"]


def float_final_hidden(source, windows: torch.Tensor, batch_size: int, device="cpu", amp: str = "none",
                       dtype: torch.dtype = torch.float16, progress: bool = False) -> torch.Tensor:
    """The float model's hidden states after its last decoder layer (before the final norm) on every
    window, [n, seqlen, hidden] in `dtype`: one pass over the checkpoint, a block at a time, under
    the autocast the teacher would run with."""
    from tqdm.auto import tqdm

    device = resolve_device(str(device))
    hidden, kwargs = source.layer0_inputs(torch.as_tensor(windows, dtype=torch.long), batch_size)
    last = source.n_layers - 1
    final = torch.empty(sum(h.shape[0] for h in hidden), *hidden[0].shape[1:], dtype=dtype)
    for i in tqdm(range(source.n_layers), desc="E2E-OQP teacher (float pass)", unit="block", disable=not progress,
                  leave=False):
        with source.block(i) as layer, torch.no_grad():
            layer.to(device)
            row = 0
            for b, (h, kw) in enumerate(zip(hidden, kwargs)):
                with autocast(device, amp):
                    out = layer_output(layer(h.to(device), **to_device(kw, device))).to("cpu", torch.float32)
                if i < last:
                    hidden[b] = out
                else:                          # the last block's outputs go straight to `final`
                    final[row:row + out.shape[0]] = out
                    row += out.shape[0]
                    hidden[b] = None
    return final


def checkpoint_layers(model) -> None:
    """Runs every decoder layer of `model` under activation checkpointing (non-reentrant) when
    gradients are on: the forward keeps only each layer's input, the backward recomputes the layer."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.model.layers:
        fwd = layer.forward

        def forward(*args, _fwd=fwd, **kwargs):
            if not torch.is_grad_enabled():
                return _fwd(*args, **kwargs)
            return checkpoint(_fwd, *args, use_reentrant=False, **kwargs)

        layer.forward = forward


def _set_tensor(model, name: str, t: torch.Tensor) -> None:
    mod, _, attr = name.rpartition(".")
    parent = model.get_submodule(mod)
    setattr(parent, attr, torch.nn.Parameter(t.to(torch.float32), requires_grad=False))


def student_model(source, store, checkpointed: bool = True):
    """The E2E-OQP student over `source` (streamed.StreamedModel; its meta model becomes the student):
    embeddings, head, final norm and every block's norms in float32 from the checkpoint, every
    decoder linear a PackedGQSLinear from `store` (its float scales and zeros where the store has
    them: after BQPO), each layer checkpointed (`checkpoint_layers`) if `checkpointed`."""
    from .fakequant import PackedGQSLinear, swap_linear

    info, model, ck = source.info, source.model, source.ckpt
    layout = info.layout
    _set_tensor(model, "model.embed_tokens.weight", ck.embeddings())
    if info.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    else:
        _set_tensor(model, "lm_head.weight", ck.head(False))
    _set_tensor(model, "model.norm.weight", ck.final_norm())
    for i in range(info.n_layers):
        layer = model.model.layers[i]
        for sub, full in ck.block_names(i).items():
            if sub.rpartition(".")[0] not in layout.linears:
                _set_tensor(model, full, ck.tensor(full))
        for lin in layout.linears:
            name = f"model.layers.{i}.{lin}"
            bias = ck.tensor(f"{name}.bias") if f"{lin}.bias" in layout.block_tensors else None
            scale, zero = store.qparams(name)
            swap_linear(layer, lin, PackedGQSLinear.from_packed(store[name], bias, scale, zero))
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if meta:
        raise TrainingError(f"E2E-OQP (streamed): {meta[:4]} were not read from the checkpoint — this "
                            f"architecture has tensors the layout does not name")
    model.requires_grad_(False)
    model.eval()
    if checkpointed:
        checkpoint_layers(model)
    return model


def run_e2e_streamed(source, store, windows: torch.Tensor, cfg, batch_size: int = 8, log=print,
                     hidden_dtype: torch.dtype = torch.float16, max_steps: int | None = None,
                     checkpointed: bool = True):
    """E2E-OQP over a checkpoint read block by block (module docstring): -> (student, E2EReport).
    `batch_size`: windows per forward of the teacher's float pass; `checkpointed`: the decoder
    layers under activation checkpointing (memory.e2e_checkpointing decides for the converter)."""
    from .e2e import HiddenStateTeacher, run_e2e

    teacher = None
    if cfg.loss == "kd":
        t = time.time()
        amp = resolve_amp(cfg.amp, cfg.device)
        hidden = float_final_hidden(source, windows, batch_size, cfg.device, amp, hidden_dtype, cfg.progress)
        log(f"E2E-OQP: the float model's final hidden states on {hidden.shape[0]} windows "
            f"({hidden.numel() * hidden.element_size() / 1e9:.2f} GB, {hidden.dtype}) in {time.time() - t:.1f} s")
    student = student_model(source, store, checkpointed)
    if cfg.loss == "kd":
        teacher = HiddenStateTeacher(copy.deepcopy(student.model.norm), student.lm_head, hidden)
    report = run_e2e(student, windows, cfg, log=log, teacher=teacher, max_steps=max_steps)
    return student.cpu(), report


def put_blocks(model, store, rel_errors: dict | None = None) -> None:
    """Writes the trained linears of `model` (PackedGQSLinear / FrozenGQSLinear) into `store` a block
    at a time, with their float scales and zeros."""
    from .fakequant import gqs_modules
    from .oneshot import BlockResult

    mods = gqs_modules(model)
    for i in range(len(model.model.layers)):
        names = [n for n in mods if n.startswith(f"model.layers.{i}.")]
        store.put(BlockResult(i, {n: mods[n].to_compressed() for n in names},
                              {n: (rel_errors or {}).get(n, float("nan")) for n in names}),
                  qparams={n: (mods[n].scale.detach().cpu(), mods[n].zero.detach().cpu()) for n in names})


# --- BQPO -------------------------------------------------------------------------------------------

BQPO_STATE = "bqpo.ckpt"


def run_bqpo_streamed(source, store, windows: torch.Tensor, cfg, out_folder: Path, fingerprint: str,
                      checkpointing: bool = False, log=print):
    """BQPO over a checkpoint read block by block (module docstring). Each trained block goes to a
    BlockStore in `out_folder` (with its float scales and zeros); with `checkpointing` the chains and
    the report are saved after every block there (bqpo.ckpt) and cfg.resume continues after the last
    finished block. -> (the output BlockStore, BQPOReport)."""
    from . import bqpo, streamed
    from .oneshot import BlockResult

    info = source.info
    device = resolve_device(cfg.device)
    cfg = dataclasses.replace(cfg, amp=resolve_amp(cfg.amp, device))
    check_amp(cfg.amp, device)
    windows = torch.as_tensor(windows, dtype=torch.long)
    fp = ckpt.run_fingerprint("bqpo-streamed", cfg.fingerprint_dict(), fingerprint)
    out = streamed.BlockStore(out_folder, fp, info.n_layers, info.layout.linears)
    state_path = Path(out_folder) / BQPO_STATE if checkpointing else None
    report = bqpo.BQPOReport()
    start = 0
    if cfg.resume and state_path is not None and state_path.exists():
        meta, payload = ckpt.load(state_path, expect={"stage": "bqpo-streamed", "fingerprint": fp})
        start = int(meta["next_block"])
        if not out.complete(start):
            raise ckpt.CheckpointError(f"{state_path}: blocks 0..{start - 1} are done but their files are not all "
                                       f"there — delete {out_folder} to start BQPO over")
        xf, xq = payload["xf"], payload["xq"]
        report.loss_before, report.loss_after = list(payload["loss_before"]), list(payload["loss_after"])
        report.seconds = list(payload["seconds"])
        log(f"BQPO: resumed from {state_path} after block {start - 1}")
    hidden, kw = source.layer0_inputs(windows if start == 0 else windows[:1], cfg.batch_size)
    kwargs = to_device(kw[0], device)
    if start == 0:
        xf = torch.cat(hidden)
        del hidden
        xq = xf.clone()
    else:
        del hidden
    report.resumed_from = start
    for i in range(start, info.n_layers):
        with source.block(i) as layer_f:
            layer_f.to(device)
            layer_q = copy.deepcopy(layer_f)
            layer_q.requires_grad_(False)
            compressed = {lin: store[f"model.layers.{i}.{lin}"].unpack() for lin in info.layout.linears}
            before, after, seconds = bqpo.train_block(i, info.n_layers, layer_f, layer_q, compressed, xf, xq, kwargs,
                                                      cfg, device, log)
        mods = {f"model.layers.{i}.{lin}": layer_q.get_submodule(lin) for lin in info.layout.linears}
        out.put(BlockResult(i, {n: m.to_compressed() for n, m in mods.items()}, {n: after for n in mods}),
                qparams={n: (m.scale.detach().cpu(), m.zero.detach().cpu()) for n, m in mods.items()})
        del layer_q
        report.loss_before.append(before)
        report.loss_after.append(after)
        report.seconds.append(seconds)
        if state_path is not None:
            ckpt.save(state_path, {"stage": "bqpo-streamed", "fingerprint": fp, "next_block": i + 1},
                      {"xf": xf, "xq": xq, "loss_before": report.loss_before, "loss_after": report.loss_after,
                       "seconds": report.seconds})
    return out, report
