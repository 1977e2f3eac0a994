"""Calibration (and evaluation) text, and its cutting into token windows.

In:  a text source string — a local text file; a folder (every *.txt below it, sorted by path);
     "debian:<name>" (a Debian-package text from `textdata`, the default "debian:calib-mix");
     or a `datasets` name "NAME[:CONFIG]" (only where a dataset hub is reachable and the
     `datasets` package is installed) — and a tokenizer.
Out: `load_text(source)` -> (text, description);
     `calibration_windows(token_ids, nsamples, seqlen, seed)` -> LongTensor [nsamples, seqlen],
     windows starting at uniformly random offsets (GPTQ's sampling), reproducible from the seed;
     `chat_windows(tokenizer, token_ids, nsamples, seqlen, seed)` -> LongTensor [nsamples, seqlen],
     conversations in the tokenizer's chat template whose turns are chunks of the text;
     `eval_windows(token_ids, seqlen, max_windows)` -> LongTensor [n, seqlen], consecutive
     non-overlapping windows from the start of the text (the same for every backend).

Invariants: an empty text, or one shorter than a single window, raises `CalibError` saying which
source and how to fix it; nothing is silently padded or truncated.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import GQSAError

__all__ = ["CalibError", "load_text", "tokenize", "calibration_windows", "chat_windows", "eval_windows"]


class CalibError(GQSAError, ValueError):
    """Calibration/evaluation text is missing, empty, unreadable or too short."""


def _read_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CalibError(f"text file '{path}' is not UTF-8 ({e}) — convert it with iconv first") from None
    except OSError as e:
        raise CalibError(f"cannot read text file '{path}': {e}") from None


def load_text(source: str) -> tuple[str, str]:
    """Returns (text, human-readable description of where it came from)."""
    from . import textdata

    if source.startswith("debian:"):
        name = source.split(":", 1)[1]
        try:
            path = textdata.text_path(name)
        except textdata.TextDataError as e:
            raise CalibError(str(e)) from None
        text, desc = _read_file(path), f"{source} (Debian package {textdata.SOURCES[name][0]})"
    else:
        p = Path(source).expanduser()
        if p.is_file():
            text, desc = _read_file(p), f"file {p}"
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*.txt") if f.is_file())
            if not files:
                raise CalibError(f"calibration folder '{p}' holds no *.txt files — put plain-text files in it "
                                 f"or pass a single file")
            text = "\n\n".join(_read_file(f) for f in files)
            desc = f"folder {p} ({len(files)} .txt files)"
        elif p.exists():
            raise CalibError(f"calibration source '{p}' is neither a regular file nor a folder")
        else:
            text, desc = _load_datasets(source)
    if not text.strip():
        raise CalibError(f"the calibration text from {desc} is empty — give a file with real text "
                         f"(or leave --calib out for the default Debian text)")
    return text, desc


def _load_datasets(source: str) -> tuple[str, str]:
    looks_like_path = source.startswith((".", "/", "~")) or source.endswith(".txt")
    if looks_like_path:
        raise CalibError(f"calibration text '{source}' does not exist — check the path")
    try:
        import datasets  # type: ignore
    except ImportError:
        raise CalibError(f"--calib '{source}' is not a local file or folder, and the 'datasets' package is not "
                         f"installed to load it by name — pass a text file, a folder of .txt files, or "
                         f"'debian:janeaustenr'") from None
    name, _, cfg = source.partition(":")
    try:
        ds = datasets.load_dataset(name, cfg or None, split="train")
    except Exception as e:       # hub unreachable, unknown name, ...: say so, never fall back silently
        raise CalibError(f"could not load the dataset '{source}' ({type(e).__name__}: {e}) — without a "
                         f"reachable dataset hub pass a local text file with --calib FILE") from None
    if "text" not in ds.column_names:
        raise CalibError(f"dataset '{source}' has no 'text' column (columns: {ds.column_names})")
    return "\n\n".join(t for t in ds["text"] if t), f"dataset {source} (train split)"


def tokenize(tokenizer, text: str) -> np.ndarray:
    """Token ids of `text` without special tokens (no BOS), int64 [L]. Long texts are tokenized
    in paragraph-aligned chunks so fast tokenizers stay fast; chunks end just after a blank line,
    where the byte-level pre-tokenizers split anyway (at most a run of 3+ newlines is tokenized
    differently at a seam)."""
    chunks, step, i = [], 200_000, 0
    while i < len(text):
        j = min(len(text), i + step)
        if j < len(text):
            k = text.rfind("\n\n", i, j)
            j = k + 2 if k > i else j
        chunks.append(text[i:j])
        i = j
    ids: list[int] = []
    for c in chunks:
        ids.extend(tokenizer(c, add_special_tokens=False, verbose=False)["input_ids"])
    return np.asarray(ids, dtype=np.int64)


def calibration_windows(token_ids, nsamples: int, seqlen: int, seed: int):
    """nsamples windows of seqlen tokens at random offsets (numpy Generator seeded with `seed`)."""
    import torch

    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.size < seqlen:
        raise CalibError(f"the calibration text has {ids.size} tokens, fewer than one window of --seqlen "
                         f"{seqlen} — give more text or a smaller --seqlen")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, ids.size - seqlen + 1, size=nsamples)
    windows = np.stack([ids[s:s + seqlen] for s in starts])
    return torch.from_numpy(windows)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_windows(tokenizer, token_ids, nsamples: int, seqlen: int, seed: int, turn=(32, 192)):
    """nsamples windows of seqlen tokens, each a conversation in the tokenizer's chat template
    (its default system prompt included) whose user and assistant turns are chunks of `turn`
    tokens of the calibration text at random offsets, cut to seqlen tokens. Distilling on them
    keeps what an instruct model does right after its chat markers (where the assistant's reply
    starts, where a turn ends), which plain text never shows."""
    import torch

    if not has_chat_template(tokenizer):
        raise CalibError("the tokenizer has no chat template: chat-formatted calibration windows need one "
                         "(use --e2e-chat-share 0 for a base model)")
    ids = np.asarray(token_ids, dtype=np.int64)
    lo, hi = turn
    if ids.size < hi:
        raise CalibError(f"the calibration text has {ids.size} tokens, fewer than one chat turn of {hi}")
    rng = np.random.default_rng([int(seed), 1])
    out = []
    for _ in range(nsamples):
        messages, toks = [], []
        while len(toks) < seqlen:
            for role in ("user", "assistant"):
                n = int(rng.integers(lo, hi + 1))
                s = int(rng.integers(0, ids.size - n + 1))
                messages.append({"role": role, "content": tokenizer.decode(ids[s:s + n].tolist()).strip()})
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            toks = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        out.append(toks[:seqlen])
    return torch.tensor(out, dtype=torch.long)


def eval_windows(token_ids, seqlen: int, max_windows: int | None = None):
    """Consecutive non-overlapping windows of seqlen tokens from the start (the tail that does not
    fill a window is dropped, as in the usual perplexity protocol)."""
    import torch

    ids = np.asarray(token_ids, dtype=np.int64)
    n = ids.size // seqlen
    if n == 0:
        raise CalibError(f"the evaluation text has {ids.size} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return torch.from_numpy(ids[: n * seqlen].reshape(n, seqlen).copy())
