"""Perplexity of a GQSA GGUF through llama.cpp and through PyTorch, on identical token windows.

In:  a GGUF path; an evaluation text source (default "debian:debian-handbook", different
     Debian packages than the calibration default "debian:calib-mix"); window length; optionally
     a float checkpoint folder.
Out: `evaluate(...)` -> `EvalReport` with one `PerplexityResult` per backend:
       llama.cpp   the GGUF run by the patched llama.cpp (logits of every position)
       torch-gguf  the PyTorch model rebuilt from the GGUF (`gguf_model.model_from_gguf`)
       torch-float the float checkpoint (with --model)
     `perplexity_torch` / `perplexity_llama` are the two kernels of the protocol.

Protocol (the same for every backend, so numbers compare one to one): the text is tokenized ONCE
(by the GGUF's own tokenizer in llama.cpp, or by the checkpoint's HF tokenizer with --no-llama),
cut into consecutive non-overlapping windows of `seqlen` tokens without BOS, and each window is
scored independently: the NLL of tokens 1..T-1 given their prefix, summed in float64 over all
windows; ppl = exp(total NLL / predicted tokens).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from .config import DEFAULT_EVAL_TEXT

__all__ = ["PerplexityResult", "EvalReport", "perplexity_torch", "perplexity_llama", "load_llama", "gguf_perplexities",
           "evaluate", "window_nll"]


@dataclass
class PerplexityResult:
    backend: str
    nll: float                  # summed negative log-likelihood (nats)
    tokens: int                 # predicted tokens
    seconds: float

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens)


@dataclass
class EvalReport:
    gguf: str
    text: str
    windows: int
    seqlen: int
    results: list[PerplexityResult] = field(default_factory=list)

    def get(self, backend: str) -> PerplexityResult | None:
        return next((r for r in self.results if r.backend == backend), None)

    def format(self) -> str:
        lines = [f"perplexity of {self.gguf}", f"  text: {self.text}; {self.windows} windows x {self.seqlen} tokens "
                 f"(same token ids for every backend)"]
        for r in self.results:
            lines.append(f"  {r.backend:<12} ppl {r.ppl:10.4f}   ({r.tokens} tokens, {r.seconds:.1f} s)")
        a, b = self.get("llama.cpp"), self.get("torch-gguf")
        if a and b:
            lines.append(f"  llama.cpp / torch-gguf = {a.ppl / b.ppl:.4f}")
        return "\n".join(lines)


def window_nll(logits: np.ndarray, tokens: np.ndarray) -> float:
    """Summed NLL of tokens[1:] under logits[:-1] (float64 log-softmax); logits [T, V]."""
    x = np.asarray(logits[:-1], dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(x - m).sum(axis=-1)))
    picked = x[np.arange(x.shape[0]), np.asarray(tokens[1:])]
    return float((lse - picked).sum())


def perplexity_torch(model, windows, batch_size: int = 4, progress: bool = True,
                     backend: str = "torch") -> PerplexityResult:
    import torch
    from tqdm.auto import tqdm

    t0 = time.time()
    nll, n = 0.0, 0
    w = torch.as_tensor(windows, dtype=torch.long)
    with torch.inference_mode():
        for i in tqdm(range(0, w.shape[0], batch_size), desc=f"ppl {backend}", disable=not progress):
            b = w[i:i + batch_size]
            logits = model(input_ids=b, use_cache=False).logits.to(torch.float64)
            lp = torch.log_softmax(logits[:, :-1], dim=-1)
            nll -= float(lp.gather(-1, b[:, 1:, None]).sum())
            n += b.shape[0] * (b.shape[1] - 1)
    return PerplexityResult(backend, nll, n, time.time() - t0)


def load_llama(gguf_path, n_ctx: int, threads: int | None = None, logits_all: bool = True, seed: int = 0):
    """A llama_cpp.Llama on the patched libraries; a refused file raises runtime.ModelLoadError saying why
    (llama.cpp's own error, our reader's diagnosis, or how to get a patched library)."""
    from .runtime import load_model

    kw = dict(n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=logits_all, verbose=False, seed=seed)
    if threads:
        kw.update(n_threads=threads, n_threads_batch=threads)
    return load_model(gguf_path, **kw)


def perplexity_llama(llm, windows, progress: bool = True, backend: str = "llama.cpp") -> PerplexityResult:
    from tqdm.auto import tqdm

    t0 = time.time()
    nll, n = 0.0, 0
    w = np.asarray(windows, dtype=np.int64)
    for row in tqdm(w, desc=f"ppl {backend}", disable=not progress):
        llm.reset()
        llm.eval([int(t) for t in row])
        logits = np.array(llm.scores[: len(row)], dtype=np.float32)
        nll += window_nll(logits, row)
        n += len(row) - 1
    return PerplexityResult(backend, nll, n, time.time() - t0)


def gguf_perplexities(gguf, windows, llm=None, use_llama: bool = True, use_torch: bool = True,
                      threads: int | None = None, progress: bool = True) -> list[PerplexityResult]:
    """The GGUF's perplexity on `windows` [n, seqlen] through the patched llama.cpp (`llm`, or one
    loaded here) and through the PyTorch model rebuilt from the file: the llama.cpp-vs-PyTorch check."""
    results = []
    if use_llama:
        if llm is None:
            llm = load_llama(gguf, n_ctx=int(windows.shape[1]), threads=threads)
        results.append(perplexity_llama(llm, np.asarray(windows), progress=progress))
        del llm
    if use_torch:
        from .gguf_model import model_from_gguf
        m, _ = model_from_gguf(gguf)
        results.append(perplexity_torch(m, windows, progress=progress, backend="torch-gguf"))
        del m
    return results


def evaluate(gguf, text: str = DEFAULT_EVAL_TEXT, seqlen: int = 512, max_windows: int | None = 16,
             model: str | None = None, use_llama: bool = True, use_torch: bool = True,
             threads: int | None = None, progress: bool = True) -> EvalReport:
    """See the module docstring. Raises the pipeline's errors (CalibError, ModelError, ...)."""
    from . import calib
    from .config import ConfigError

    if not os.path.isfile(gguf):
        raise FileNotFoundError(f"GGUF file '{gguf}' does not exist")
    if seqlen < 2:
        raise ConfigError(f"--seqlen {seqlen}: a window needs at least 2 tokens")
    if not use_llama and model is None:
        raise ConfigError("--no-llama needs --model FOLDER: without llama.cpp the text is tokenized by the "
                          "checkpoint's tokenizer")
    body, desc = calib.load_text(text)

    llm = None
    if use_llama:
        llm = load_llama(gguf, n_ctx=seqlen, threads=threads)
        ids = np.asarray(llm.tokenize(body.encode("utf-8"), add_bos=False, special=False), dtype=np.int64)
    else:
        from . import model_io
        ids = calib.tokenize(model_io.load_tokenizer(model_io.resolve_model(model)), body)
    windows = calib.eval_windows(ids, seqlen, max_windows)
    report = EvalReport(gguf=str(gguf), text=desc, windows=int(windows.shape[0]), seqlen=seqlen)

    report.results += gguf_perplexities(gguf, windows, llm=llm, use_llama=use_llama, use_torch=use_torch,
                                        progress=progress)
    del llm
    if model is not None:
        from . import model_io
        info = model_io.inspect_checkpoint(model_io.resolve_model(model))
        m = model_io.load_model(info)
        report.results.append(perplexity_torch(m, windows, progress=progress, backend="torch-float"))
    return report
