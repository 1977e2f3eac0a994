"""What the block-wise stages share: devices and autocast, deterministic seeding, NaN/Inf guards
(BQPO, E2E-OQP), and the one way to capture the inputs of decoder layer 0 and read a decoder
layer's output (`capture_layer_inputs`, `layer_output`: the one-shot pass, the sensitivity probe
and BQPO).

In:  a device string ("cpu", "cuda", "cuda:1"), an autocast choice ("none", "bf16", "fp16"),
     seeds; a HF causal LM and token windows.
Out: `resolve_device`, `autocast(device, amp)`, `seeded(seed, *keys)` (a torch.Generator and the
     global RNGs set from (seed, keys) — the same keys give the same streams in an interrupted and
     an uninterrupted run), `check_finite(...)` raising `TrainingError` naming the stage, block and
     step, `capture_layer_inputs(model, windows)` -> (hidden float32 [n, seq, width], kwargs),
     `layer_output(out)` -> the hidden states of a decoder layer's return value.

Invariants: autocast is refused on the CPU (fp32 there: the CPU has no fast bf16 and exactness
with the file is only promised in fp32); the layer keyword arguments captured are batch
independent (rotary tables with batch 1, no dense mask), or capture raises.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from pathlib import Path

import numpy as np
import torch

from .errors import GQSAError

__all__ = ["TrainingError", "AMP_CHOICES", "resolve_device", "resolve_amp", "cpu_has_native_bf16", "autocast",
           "seeded", "check_finite",
           "capture_layer_inputs", "layer_output", "decoder_layers", "to_device"]

AMP_CHOICES = ("none", "bf16", "fp16")


class TrainingError(GQSAError, RuntimeError):
    """Training cannot continue (non-finite loss or weights, bad settings, bad model structure)."""


def resolve_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise TrainingError(f"--device {device!r} is not a torch device ({e}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"--device {device}: CUDA is not available in this torch build/machine — use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise TrainingError(f"--device {device}: only cpu and cuda are supported")
    return dev


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 in hardware (x86: AMX-BF16 or AVX512-BF16; Arm: the BF16
    extension), read from /proc/cpuinfo's flags. Elsewhere bf16 autocast is emulated and slower
    than fp32, so "auto" keeps fp32 there."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags = set(value.split())
            return bool(flags & {"amx_bf16", "avx512_bf16", "bf16"})
    return False


def resolve_amp(amp: str, device: str | torch.device) -> str:
    """The autocast a run really uses: "auto" is bf16 where the device multiplies bf16 natively (a
    CUDA GPU that supports it, a CPU with AMX/AVX512-BF16 or Arm BF16) and "none" (fp32) elsewhere;
    any other value is returned as given (check_amp validates it)."""
    if amp != "auto":
        return amp
    dev = torch.device(device)
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "none"
    return "bf16" if cpu_has_native_bf16() else "none"


def check_amp(amp: str, device: torch.device) -> None:
    if amp not in AMP_CHOICES:
        raise TrainingError(f"--amp {amp!r}: choose one of {', '.join(AMP_CHOICES)}")
    if amp == "fp16" and device.type != "cuda":
        raise TrainingError("--amp fp16 needs a CUDA device (fp16 autocast with loss scaling is GPU-only) — "
                            "use --amp bf16 or none on the CPU")


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def seeded(seed: int, *keys) -> torch.Generator:
    """Seeds Python, NumPy and torch from (seed, keys) and returns a CPU generator for shuffles."""
    s = int.from_bytes(hashlib.sha256(repr((int(seed),) + tuple(keys)).encode()).digest()[:8], "little") >> 1
    random.seed(s)
    np.random.seed(s % (2 ** 32))
    torch.manual_seed(s)
    g = torch.Generator()
    g.manual_seed(s)
    return g


def check_finite(where: str, loss: torch.Tensor | None = None, params=()) -> None:
    """Raises TrainingError if the loss or any parameter (name, tensor) is NaN/Inf."""
    if loss is not None and not bool(torch.isfinite(loss).all()):
        raise TrainingError(f"{where}: loss is {loss.item()} — training diverged; lower the learning rates "
                            f"or resume from the last checkpoint")
    for name, p in params:
        if not bool(torch.isfinite(p).all()):
            bad = int((~torch.isfinite(p)).sum())
            raise TrainingError(f"{where}: parameter {name} has {bad} non-finite values — training diverged; "
                                f"lower the learning rates or resume from the last checkpoint")


def to_device(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def decoder_layers(model) -> torch.nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise TrainingError(f"{type(model).__name__}: expected decoder layers at model.model.layers "
                            f"(LLaMA/Qwen2 structure) — unsupported model")
    return layers


def layer_output(out) -> torch.Tensor:
    """The hidden states of a decoder layer's return value (a tensor, or a tuple led by one)."""
    return out[0] if isinstance(out, (tuple, list)) else out


class _Stop(Exception):
    pass


class _Catcher(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.attention_type = getattr(layer, "attention_type", None)
        self.hidden, self.kwargs = None, None

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise TrainingError("decoder layer called with positional arguments besides hidden_states; "
                                "this transformers version is not supported")
        self.hidden, self.kwargs = hidden_states.detach(), kwargs
        raise _Stop


def capture_layer_inputs(model, windows: torch.Tensor, batch_size: int = 8,
                         device: torch.device | None = None):
    """Runs the model up to decoder layer 0 on every window: (hidden float32 [n, seq, width] on the
    CPU, layer kwargs on `device`). The kwargs come from a 1-window call and are checked to carry no
    batch-sized tensor, so they serve any batch size."""
    layers = decoder_layers(model)
    dev = device or next(model.parameters()).device
    windows = torch.as_tensor(windows, dtype=torch.long)
    catcher = _Catcher(layers[0])
    layers[0] = catcher
    out = []
    try:
        with torch.no_grad():
            try:
                model.model(input_ids=windows[:1].to(dev), use_cache=False)
            except _Stop:
                pass
            kwargs = {k: v for k, v in catcher.kwargs.items() if k not in ("past_key_values", "use_cache")}
            for i in range(0, windows.shape[0], batch_size):
                try:
                    model.model(input_ids=windows[i:i + batch_size].to(dev), use_cache=False)
                except _Stop:
                    pass
                out.append(catcher.hidden.to("cpu", torch.float32))
    finally:
        layers[0] = catcher.layer

    def _batch_free(v):
        if isinstance(v, torch.Tensor):
            return v.dim() == 0 or v.shape[0] == 1
        if isinstance(v, (tuple, list)):
            return all(_batch_free(x) for x in v)
        return True

    for k, v in kwargs.items():
        if not _batch_free(v):
            raise TrainingError(f"decoder layer keyword '{k}' depends on the batch (shape "
                                f"{getattr(v, 'shape', '?')}); load the model with attn_implementation='sdpa'")
    return torch.cat(out), kwargs
