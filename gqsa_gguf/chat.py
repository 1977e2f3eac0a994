"""`gqsa-gguf chat`: streaming chat with a GQSA GGUF through the patched llama.cpp.

In:  a GGUF path; either a one-shot `prompt` or an interactive session on stdin.
Out: the assistant's replies streamed to `out` as they are generated; `chat()` returns the last
     reply (the one-shot form's answer).

The file's own chat template (`tokenizer.chat_template`, written by `export` from the
checkpoint's tokenizer_config / chat_template.jinja) formats the conversation: llama-cpp-python
picks it up from the GGUF metadata when no chat_format is given. Interactive commands: an empty
line or EOF quits, `/reset` forgets the history.
"""

from __future__ import annotations

import sys
from typing import TextIO

__all__ = ["chat", "stream_reply"]


def stream_reply(llm, messages: list[dict], max_tokens: int, temperature: float, seed: int,
                 out: TextIO) -> str:
    """Generates one assistant reply to `messages`, writing it to `out` piece by piece."""
    parts = []
    for chunk in llm.create_chat_completion(messages=messages, stream=True, max_tokens=max_tokens,
                                            temperature=temperature, seed=seed):
        delta = chunk["choices"][0].get("delta", {})
        piece = delta.get("content")
        if piece:
            parts.append(piece)
            out.write(piece)
            out.flush()
    out.write("\n")
    out.flush()
    return "".join(parts)


def chat(gguf, prompt: str | None = None, system: str | None = None, max_tokens: int = 256,
         temperature: float = 0.7, seed: int = 0, n_ctx: int = 2048, threads: int | None = None,
         out: TextIO = sys.stdout, inp: TextIO = sys.stdin) -> str:
    import os

    from .evaluate import load_llama

    if not os.path.isfile(gguf):
        raise FileNotFoundError(f"GGUF file '{gguf}' does not exist")
    llm = load_llama(gguf, n_ctx=n_ctx, threads=threads, logits_all=False, seed=seed)
    base = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        return stream_reply(llm, base + [{"role": "user", "content": prompt}], max_tokens, temperature, seed, out)

    history = list(base)
    reply = ""
    interactive = inp.isatty()
    if interactive:
        out.write(f"chatting with {gguf} (empty line or Ctrl-D quits, /reset clears the history)\n")
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        line = inp.readline()
        if not line or not line.strip():
            break
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            history = list(base)
            out.write("(history cleared)\n")
            continue
        history.append({"role": "user", "content": text})
        reply = stream_reply(llm, history, max_tokens, temperature, seed, out)
        history.append({"role": "assistant", "content": reply})
    return reply
