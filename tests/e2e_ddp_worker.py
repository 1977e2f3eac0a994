"""torchrun worker for tests/test_e2e.py: one E2E-OQP step on the tiny model, data parallel.

Usage: torchrun --nproc_per_node N tests/e2e_ddp_worker.py OUT.pt   (rank 0 saves scales/zeros).
With a plain `python` (WORLD_SIZE unset) it runs the same step in one process.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gqsa_gguf.e2e import E2EConfig, close_distributed, frozen_from_oneshot, init_distributed, run_e2e  # noqa: E402
from gqsa_gguf.fakequant import gqs_modules  # noqa: E402
from tiny_llama import tiny_model, tiny_oneshot, tiny_windows  # noqa: E402


def main(out: str) -> None:
    torch.set_num_threads(1)
    rank, world = init_distributed("cpu")
    model = tiny_model()
    windows = tiny_windows()
    frozen_from_oneshot(model, tiny_oneshot(model, windows))
    # step_in_backward off: the one-process run keeps its gradients to be compared (under torchrun
    # the step is after the all_reduce anyway)
    cfg = E2EConfig(epochs=1, batch_size=4, micro_batch=1, lr_scale=1e-3, lr_zero=1e-1, progress=False,
                    step_in_backward=False)
    rep = run_e2e(model, windows, cfg, log=lambda s: None, max_steps=1)
    if rank == 0:
        mods = gqs_modules(model).items()
        state = {f"{n}.{k}": getattr(m, k).detach().clone() for n, m in mods for k in ("scale", "zero")}
        # gradients of the step (left by the last step): Adam's first step is nearly sign(grad),
        # so the reduced gradients are what really tells a correct all_reduce from a wrong one
        state.update({f"{n}.{k}.grad": getattr(m, k).grad.clone() for n, m in mods for k in ("scale", "zero")})
        torch.save({"state": state, "loss": rep.step_loss, "world": world,
                    "lr": {"scale": cfg.lr_scale, "zero": cfg.lr_zero}}, out)
    close_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
