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


def chat_windows(tokenizer, token_ids, nsamples: int, seqlen: int, seed: int, turn=(32, 192), reply=None,
                 ask=None):
    """nsamples windows of seqlen tokens, each a conversation in the tokenizer's chat template
    (its default system prompt included) whose user and assistant turns are chunks of `turn` tokens
    of the calibration text at random offsets, cut to seqlen tokens. With `reply`, the first
    assistant turn of every window is what the model itself answers to the first user turn:
    reply(conversations) -> one answer string per conversation (a list of messages ending with the
    user's turn), called once for all windows; later turns are text again (generation is the slow
    part). With `ask` too, the first user turn is not text either: ask(n) -> n user messages (the
    model's own questions, calib.model_questions). Distilling on them keeps what an instruct model
    does right after its chat markers (where the assistant's reply starts, where a turn ends),
    which plain text never shows; with the model's own answers, also how it answers; with its own
    questions, to what it is asked."""
    import torch

    if ask is not None and reply is None:
        raise CalibError("chat windows: the model's own questions (ask) need its answers (reply) too")
    if not has_chat_template(tokenizer):
        raise CalibError("the tokenizer has no chat template: chat-formatted calibration windows need one "
                         "(use --e2e-chat-share 0 for a base model)")
    ids = np.asarray(token_ids, dtype=np.int64)
    lo, hi = turn
    if ids.size < hi:
        raise CalibError(f"the calibration text has {ids.size} tokens, fewer than one chat turn of {hi}")
    rng = np.random.default_rng([int(seed), 1])

    def chunk() -> str:
        n = int(rng.integers(lo, hi + 1))
        s = int(rng.integers(0, ids.size - n + 1))
        return tokenizer.decode(ids[s:s + n].tolist()).strip()

    def tokens(messages) -> list[int]:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    convs = [[] for _ in range(nsamples)]
    if reply is not None:
        # the first exchange of every window: a user turn of the text, the model's answer to it
        if ask is not None:
            asked = ask(nsamples)
            if len(asked) != nsamples:
                raise CalibError(f"chat questions: {len(asked)} questions for {nsamples} conversations")
            convs = [[{"role": "user", "content": str(q).strip()}] for q in asked]
        else:
            convs = [[{"role": "user", "content": chunk()}] for _ in range(nsamples)]
        answers = reply(convs)
        if len(answers) != nsamples:
            raise CalibError(f"chat replies: {len(answers)} answers for {nsamples} conversations")
        for messages, answer in zip(convs, answers):
            messages.append({"role": "assistant", "content": str(answer).strip()})
    out = []
    for messages in convs:
        toks = tokens(messages) if messages else []
        while len(toks) < seqlen:                  # (the rest of) the window: turns of the text
            for role in ("user", "assistant"):
                messages.append({"role": role, "content": chunk()})
            toks = tokens(messages)
        out.append(toks[:seqlen])
    return torch.tensor(out, dtype=torch.long)


def _sampler(model, tokenizer, seed: int, what: str, amp: str, progress: bool, batch_size: int = 32):
    """generate(prompts, max_new_tokens, temperature, top_p, stop) -> the sampled continuations of
    the prompt strings (batches of `batch_size` padded on the left, under `amp` autocast, seeded
    from (seed, call, batch) so that a run repeats itself), decoded without special tokens."""
    import torch
    from tqdm.auto import tqdm

    from .training import autocast

    calls = [0]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate(prompts: list[str], max_new_tokens: int, temperature: float, top_p: float,
                 stop: list[int] | None = None) -> list[str]:
        out: list[str] = []
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            for b in tqdm(range(0, len(prompts), batch_size), desc=f"{what} (float model)", unit="batch",
                          disable=not progress):
                enc = tokenizer(prompts[b:b + batch_size], return_tensors="pt", padding=True,
                                add_special_tokens=False).to(model.device)
                torch.manual_seed(int(np.random.default_rng([int(seed), 2, calls[0], b]).integers(1 << 62)))
                kw = {"eos_token_id": stop} if stop else {}
                with torch.no_grad(), autocast(model.device, amp):
                    gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True,
                                         temperature=temperature, top_p=top_p, top_k=0, pad_token_id=pad, **kw)
                new = gen[:, enc["input_ids"].shape[1]:]
                out += [tokenizer.decode(r, skip_special_tokens=True) for r in new]
        finally:
            tokenizer.padding_side = side
        calls[0] += 1
        return out

    return generate


def model_replies(model, tokenizer, seed: int, max_new_tokens: int = 128, batch_size: int = 32,
                  temperature: float = 0.7, top_p: float = 0.9, amp: str = "none", progress: bool = False):
    """A `reply` for chat_windows: the model answers each conversation (its chat template with
    the generation prompt), sampled at `temperature` / `top_p`, batches of `batch_size` padded on
    the left, under `amp` autocast (training.autocast), seeded from (seed, call, batch) so a run
    repeats itself."""
    generate = _sampler(model, tokenizer, seed, "chat replies", amp, progress, batch_size)

    def reply(conversations) -> list[str]:
        prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                   for c in conversations]
        return generate(prompts, max_new_tokens, temperature, top_p)

    return reply


_SENTINEL = "\u2063\u2063"          # invisible separators: text no template adds or changes


def user_turn_prefix(tokenizer) -> tuple[str, str]:
    """(what the chat template writes before a first user message — its default system prompt
    included —, what it writes right after one): the prompt under which the model writes a user
    turn, and the text that ends it."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False)
    if text.count(_SENTINEL) != 1:
        raise CalibError("the chat template does not show a user message as it was given: the model "
                         "cannot write user turns with it (use --e2e-chat-replies text or model)")
    before, after = text.split(_SENTINEL)
    return before, after


def model_questions(model, tokenizer, seed: int, max_new_tokens: int = 64, batch_size: int = 32,
                    temperature: float = 0.9, top_p: float = 0.95, amp: str = "none", progress: bool = False):
    """An `ask` for chat_windows: the model writes the first user turn of each conversation
    itself, sampled from its chat template up to the start of a user message (the text that ends a
    user turn stops it, or `max_new_tokens`). An instruct model has seen many user turns; what it
    writes there are the requests it was tuned on (questions, instructions, tasks with their text),
    with no text of ours in them — data-free distillation data, as in LLM-QAT."""
    generate = _sampler(model, tokenizer, seed + 1, "chat questions", amp, progress, batch_size)
    before, after = user_turn_prefix(tokenizer)
    end = tokenizer(after, add_special_tokens=False)["input_ids"][:1]
    stop = sorted({*end, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])})

    def ask(n: int) -> list[str]:
        asked = generate([before] * n, max_new_tokens, temperature, top_p, stop=stop)
        return [q.strip() or "Hello!" for q in asked]

    return ask


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
