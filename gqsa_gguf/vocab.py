"""Tokenizer of a Hugging Face checkpoint, as GGUF `tokenizer.*` metadata for llama.cpp.

In:  a checkpoint folder (tokenizer.json, tokenizer_config.json, optional chat_template.jinja,
     or a SentencePiece tokenizer.model), the model's vocab_size, an optional pre-tokenizer name.
Out: `read_vocab(...)` -> `Vocab` (tokens, token types, scores, tokenizer model, pre-tokenizer,
     special ids / add_bos / merges / chat template through gguf-py's SpecialVocab);
     `Vocab.add_to(writer)` writes them into a gguf.GGUFWriter.

Two tokenizer families:
  * byte-level BPE (tokenizer.json with a BPE model and a ByteLevel step): `tokenizer.ggml.model`
    = "gpt2", with merges and a `tokenizer.ggml.pre` naming llama.cpp's pre-tokenizer regexes;
  * SentencePiece (LLaMA-1/2 `tokenizer.model`): "llama", with scores, no merges, no pre.

`tokenizer.ggml.pre` is detected from the *structure* of tokenizer.json's pre_tokenizer (not from a
hash of a tokenization), so a re-saved or extended vocabulary still detects:
  smollm     Digits(individual) -> ByteLevel(use_regex)            SmolLM / SmolLM2
  qwen2      Split(Qwen2 regex, single \\p{N}) -> ByteLevel          Qwen2 / Qwen2.5
  llama-bpe  Split(LLaMA-3 regex, \\p{N}{1,3}) -> ByteLevel          LLaMA-3.x
  gpt-2      ByteLevel(use_regex) alone                             GPT-2 style
Anything else raises VocabError asking for --tokenizer-pre; an explicit name always wins.

Invariants: the token list has exactly vocab_size entries (ids the tokenizer lacks become
"[PAD<id>]" of type UNUSED, as llama.cpp's converter does); a tokenizer id >= vocab_size raises.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import gguf
from gguf import TokenType

from .errors import GQSAError

__all__ = ["VocabError", "Vocab", "read_vocab", "detect_pre_tokenizer", "KNOWN_PRE"]

# The split regexes of the Qwen2 and LLaMA-3 tokenizers (they differ only in how digits group).
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
KNOWN_PRE = ("smollm", "qwen2", "llama-bpe", "gpt-2")


class VocabError(GQSAError, ValueError):
    """The tokenizer cannot be exported; the message says which file/field and how to fix it."""


def _steps(pre) -> list[dict]:
    if pre is None:
        return []
    if pre.get("type") == "Sequence":
        out = []
        for p in pre.get("pretokenizers", []):
            out += _steps(p)
        return out
    return [pre]


def _regex(step: dict) -> str | None:
    pat = step.get("pattern") or {}
    return pat.get("Regex") if isinstance(pat, dict) else None


def detect_pre_tokenizer(tokenizer_json: dict, where: str = "tokenizer.json") -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json (see module docstring)."""
    steps = _steps(tokenizer_json.get("pre_tokenizer"))
    kinds = [s.get("type") for s in steps]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        rx = _regex(steps[0])
        if rx == _QWEN2_REGEX:
            return "qwen2"
        if rx == _LLAMA3_REGEX:
            return "llama-bpe"
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    summary = ", ".join(f"{k}" + (f"({_regex(s)[:40]!r}...)" if _regex(s) else "") for k, s in zip(kinds, steps))
    raise VocabError(f"{where}: cannot identify the pre-tokenizer [{summary or 'none'}] — pass "
                     f"--tokenizer-pre NAME with llama.cpp's name for it (known here: {', '.join(KNOWN_PRE)})")


@dataclass
class Vocab:
    model: str                          # tokenizer.ggml.model: "gpt2" or "llama"
    pre: str | None                     # tokenizer.ggml.pre (gpt2 only)
    pre_source: str                     # "detected" / "--tokenizer-pre" / "n/a"
    tokens: list[str]
    toktypes: list[int]
    scores: list[float] | None
    special: gguf.SpecialVocab
    add_bos: bool
    notes: list[str] = field(default_factory=list)

    def add_to(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        if self.pre is not None:
            w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.toktypes)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        logging.getLogger("gguf.vocab").setLevel(logging.WARNING)
        self.special.add_to_gguf(w, quiet=True)
        if "bos" not in self.special.add_special_token:
            w.add_add_bos_token(self.add_bos)


def _pad(tokens: dict[int, tuple[str, int, float]], vocab_size: int, where: Path) -> tuple[list, list, list]:
    too_big = sorted(i for i in tokens if i >= vocab_size)
    if too_big:
        raise VocabError(f"{where}: token id(s) {too_big[:5]} >= the model's vocab_size {vocab_size} — the "
                         f"tokenizer does not belong to this model")
    toks, types, scores = [], [], []
    for i in range(vocab_size):
        text, ttype, score = tokens.get(i, (f"[PAD{i}]", TokenType.UNUSED, -1000.0))
        toks.append(text)
        types.append(int(ttype))
        scores.append(float(score))
    return toks, types, scores


def _bpe(folder: Path, tj: dict, vocab_size: int, tokenizer_pre: str | None) -> Vocab:
    where = folder / "tokenizer.json"
    model = tj.get("model") or {}
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise VocabError(f"{where}: the BPE model has no vocabulary")
    tokens: dict[int, tuple[str, int, float]] = {}
    for text, i in vocab.items():
        tokens[int(i)] = (text, TokenType.NORMAL, 0.0)
    for at in tj.get("added_tokens", []):
        i, text = int(at["id"]), at["content"]
        tokens[i] = (text, TokenType.CONTROL if at.get("special") else TokenType.USER_DEFINED, 0.0)
    toks, types, _ = _pad(tokens, vocab_size, where)
    if tokenizer_pre is not None:
        pre, src = tokenizer_pre, "--tokenizer-pre"
    else:
        pre, src = detect_pre_tokenizer(tj, str(where)), "detected"
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise VocabError(f"{where}: the BPE tokenizer has no merges — llama.cpp cannot tokenize without them")
    return Vocab("gpt2", pre, src, toks, types, None, special, add_bos=False)


def _spm(folder: Path, vocab_size: int, tokenizer_pre: str | None) -> Vocab:
    try:
        sp = gguf.vocab.SentencePieceVocab(folder)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        raise VocabError(f"{folder}: cannot read the SentencePiece tokenizer.model ({e})") from None
    tokens = {i: (text.decode("utf-8"), ttype, score) for i, (text, score, ttype) in enumerate(sp.all_tokens())}
    toks, types, scores = _pad(tokens, vocab_size, folder / "tokenizer.model")
    special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=vocab_size)
    v = Vocab("llama", None, "n/a", toks, types, scores, special, add_bos=True)
    if tokenizer_pre is not None:
        v.notes.append(f"--tokenizer-pre {tokenizer_pre} ignored: SentencePiece tokenizers have no pre-tokenizer")
    return v


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VocabError(f"{path}: cannot read it: {e}") from None


def read_vocab(folder: str | Path, vocab_size: int, tokenizer_pre: str | None = None) -> Vocab:
    """The tokenizer of checkpoint `folder` as GGUF metadata (see module docstring)."""
    folder = Path(folder)
    tj_path = folder / "tokenizer.json"
    tj = _read_json(tj_path) if tj_path.is_file() else None
    if tj is not None:
        mtype = (tj.get("model") or {}).get("type")
        byte_level = any(s.get("type") == "ByteLevel" for s in _steps(tj.get("pre_tokenizer"))) or \
            (tj.get("decoder") or {}).get("type") == "ByteLevel"
        if mtype == "BPE" and byte_level:
            v = _bpe(folder, tj, vocab_size, tokenizer_pre)
        elif (folder / "tokenizer.model").is_file():
            v = _spm(folder, vocab_size, tokenizer_pre)
        else:
            raise VocabError(f"{tj_path}: tokenizer model '{mtype}' without a byte-level step, and no "
                             f"SentencePiece tokenizer.model — only byte-level BPE and SentencePiece "
                             f"tokenizers are supported")
    elif (folder / "tokenizer.model").is_file():
        v = _spm(folder, vocab_size, tokenizer_pre)
    else:
        raise VocabError(f"{folder}: no tokenizer.json or tokenizer.model — the GGUF needs the model's "
                         f"tokenizer; copy the tokenizer files into the checkpoint folder")

    tc_path = folder / "tokenizer_config.json"
    if tc_path.is_file():
        tc = _read_json(tc_path)
        if isinstance(tc.get("add_bos_token"), bool):
            v.add_bos = tc["add_bos_token"]
    if v.special.chat_template is None:
        v.notes.append("no chat template in the tokenizer files: `gqsa-gguf chat` will fall back to "
                       "llama-cpp-python's default format")
    return v
