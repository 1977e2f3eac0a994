"""How close a compressed file's chat answers stay to the float model's (a script, not a test).

    python benchmarks/chat_fidelity.py FILE.gguf [FILE.gguf ...] [--model FOLDER] [--threads 2]
                                       [--out-dir chat-fidelity-out] [--show 6]

Perplexity on plain text says little about chat: the default model's trained W4S50 file scores
3.9x F16 on the handbook but answered the demo's question off topic. This measures the chat
behaviour instead, on QUESTIONS written for it (general knowledge, how-to, writing, code) that no
calibration or training window contains (the converter's chat windows are calibration text or
what the float model writes itself):

1. the float model (PyTorch, float32) answers each question greedily (at most 80 tokens), in its
   chat template with its default system prompt; its log-probabilities over the answer tokens are
   kept (cached in --out-dir/reference.json, keyed by the model folder);
2. each GGUF, through the patched llama.cpp, reads the same prompt + answer tokens (teacher
   forcing); per answer token, KL(float || file) of the next-token distributions and whether the
   two agree on the most likely token;
3. printed: the mean KL over all answer tokens (nats/token), the top-1 agreement, and the file's
   own greedy answers to the first --show questions.

Lower KL = the file continues the float model's answers more like the float model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gqsa_gguf import model_io                              # noqa: E402
from gqsa_gguf.evaluate import load_llama                   # noqa: E402

QUESTIONS = (
    "Explain in two sentences why the sky is blue.",
    "What is the capital of France?",
    "Write a Python function that adds two numbers.",
    "Give me three tips for staying healthy.",
    "What is photosynthesis?",
    "How do I boil an egg?",
    "Why do we have seasons on Earth?",
    "Write a short poem about the ocean.",
    "What is the difference between a virus and a bacterium?",
    "Summarize the plot of Cinderella in three sentences.",
    "How does a rainbow form?",
    "What are the benefits of reading books?",
    "Explain what a computer program is to a child.",
    "Name three planets in our solar system.",
    "What should I pack for a weekend camping trip?",
    "Why is exercise good for the brain?",
    "Translate 'good morning' into Spanish.",
    "What causes earthquakes?",
    "Give me a recipe idea for a quick vegetarian dinner.",
    "How can I improve my sleep?",
    "What is gravity?",
    "Write a haiku about autumn leaves.",
    "How do bees make honey?",
    "What is the largest mammal on Earth?",
)
MAX_ANSWER = 80


def reference(folder: Path, out_dir: Path, threads: int) -> list[dict]:
    """The float model's greedy answers and their per-token log-probabilities (cached)."""
    import torch
    import transformers

    key = hashlib.sha256(json.dumps([str(folder.resolve()), QUESTIONS, MAX_ANSWER]).encode()).hexdigest()[:16]
    cache = out_dir / "reference.json"
    if cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("key") == key:
            return data["answers"]
    torch.set_num_threads(threads)
    tok = model_io.load_tokenizer(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    answers = []
    for q in QUESTIONS:
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            full = model.generate(ids, max_new_tokens=MAX_ANSWER, do_sample=False)
            logp = torch.log_softmax(model(full).logits[0].float(), -1)
        n = ids.shape[1]
        answers.append({"question": q, "prompt_tokens": n, "ids": full[0].tolist(),
                        "answer": tok.decode(full[0, n:], skip_special_tokens=True),
                        "logp": logp[n - 1:full.shape[1] - 1].numpy().astype(np.float16).tolist()})
        print(f"float: {q} -> {answers[-1]['answer'][:120]!r}", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "answers": answers}))
    return answers


def fidelity(path: str, answers: list[dict], threads: int, show: int) -> dict:
    import torch

    llm = load_llama(path, n_ctx=512, threads=threads)
    kls, agree, n = [], 0, 0
    for a in answers:
        llm.reset()
        llm.eval(a["ids"][:-1])
        scores = np.array(llm.scores[a["prompt_tokens"] - 1:len(a["ids"]) - 1], dtype=np.float32)
        lq = torch.log_softmax(torch.from_numpy(scores), -1)
        lp = torch.tensor(a["logp"], dtype=torch.float32)
        kl = (lp.exp() * (lp - lq)).sum(-1)
        kls.append(kl)
        agree += int((lq.argmax(-1) == lp.argmax(-1)).sum())
        n += kl.numel()
    said = []
    for a in answers[:show]:
        out = llm.create_chat_completion(messages=[{"role": "user", "content": a["question"]}],
                                         max_tokens=60, temperature=0.0)
        said.append((a["question"], out["choices"][0]["message"]["content"]))
    return {"file": path, "kl": float(torch.cat(kls).mean()), "top1": agree / n, "tokens": n, "said": said}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf", nargs="+")
    ap.add_argument("--model", default=None, help="the float checkpoint the files came from (default: the "
                                                  "embedded default model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", default="chat-fidelity-out")
    ap.add_argument("--show", type=int, default=6, help="greedy answers printed per file")
    a = ap.parse_args()
    folder = model_io.resolve_model(a.model)
    answers = reference(folder, Path(a.out_dir), a.threads)
    print(f"{len(answers)} questions, {sum(len(x['logp']) for x in answers)} answer tokens of the float model "
          f"({folder.name})")
    for path in a.gguf:
        r = fidelity(path, answers, a.threads, a.show)
        print(f"{path}: chat KL {r['kl']:.4f} nats/token, top-1 agreement {r['top1']:.1%} ({r['tokens']} tokens)")
        for q, s in r["said"]:
            print(f"    {q} -> {' '.join(s.split())[:160]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
