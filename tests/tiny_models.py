"""Tiny checkpoints of the gqsa_gguf/arch architectures on disk (safetensors + a tiny byte-level BPE tokenizer) for the
convert/export/end-to-end tests.

Not a test module: imported by tests/test_cli_args.py, test_export.py and test_end_to_end.py.
Everything is built from fixed seeds and a fixed text, so every run makes the same files.

The tokenizers are trained here with the `tokenizers` library on a short public-domain English
text, with the pre-tokenizer structure of the real families (LLaMA-3's split regex for the LLaMA
model, Qwen2's for the Qwen2 one), so tokenizer.ggml.pre detection is exercised too.
"""

from __future__ import annotations

import json
from pathlib import Path

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2

_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
    "in want of a wife. However little known the feelings or views of such a man may be on his first "
    "entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that "
    "he is considered the rightful property of some one or other of their daughters. The package manager "
    "installs 1024 files in 3 seconds; run apt-get update, then apt-get install, and check the logs.\n\n"
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition, seemed to "
    "unite some of the best blessings of existence; and had lived nearly twenty-one years in the world "
    "with very little to distress or vex her.\n"
)

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _tokenizer(kind: str, vocab_size: int = 400):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from gqsa_gguf.vocab import _LLAMA3_REGEX, _QWEN2_REGEX

    tok = Tokenizer(models.BPE())
    regex = {"llama": _LLAMA3_REGEX, "qwen2": _QWEN2_REGEX}[kind]
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_TEXT] * 4, trainer)
    return tok


def text() -> str:
    return _TEXT


_KINDS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def make_checkpoint(folder: Path, kind: str = "llama", seed: int = 0, tie: bool | None = None,
                    init_std: float = 0.08, hidden: int = HIDDEN, ffn: int = FFN, pad_vocab: int = 0,
                    arch_override: str | None = None, train_steps: int = 0,
                    group_sparsity: float | None = None, llama3_rope: bool = False,
                    config: dict | None = None, tokenizer: str = "llama") -> Path:
    """Writes a random tiny checkpoint folder and returns it.

    kind: "llama" (LlamaForCausalLM, tied embeddings by default) or "qwen2" (Qwen2ForCausalLM with
    q/k/v biases, untied head by default), or any HF architecture name gqsa_gguf.arch knows, built
    from its layout's config class with `config` on top of the tiny sizes (tokenizer: the
    pre-tokenizer family, "llama" or "qwen2"). pad_vocab: extra vocabulary rows the tokenizer lacks.
    llama3_rope: LLaMA-3.1's 'llama3' RoPE frequency scaling (LLaMA only).
    train_steps: Adam steps of next-token training on the tiny text, so the model predicts with
    confidence like a real LM (a random model's near-tied logits make top-1 comparisons a coin toss).
    group_sparsity: train with that fraction of 16-weight groups of every decoder linear row held at
    zero, so one-shot GQSA at the same sparsity only has to quantize and the compressed model
    stays as confident as the float one.
    """
    import torch
    import transformers

    from gqsa_gguf import arch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(kind if kind in _KINDS else tokenizer)
    vocab = tok.get_vocab_size() + pad_vocab
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                  initializer_range=init_std, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=2)
    if kind == "llama":
        rope = {"rope_type": "default", "rope_theta": 10000.0}
        if llama3_rope:          # LLaMA-3.1 style scaling, short original context so it matters here
            rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
        cfg = transformers.LlamaConfig(tie_word_embeddings=True if tie is None else tie, rope_parameters=rope, **common)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(tie_word_embeddings=False if tie is None else tie, rope_theta=1000000.0,
                                       use_sliding_window=False, **common)
    else:
        layout = arch.for_hf(kind)
        cfg = getattr(transformers, layout.hf_config_class)(tie_word_embeddings=bool(tie), **common, **(config or {}))
    model = getattr(transformers, _KINDS.get(kind, kind))(cfg)
    with torch.no_grad():              # non-trivial norms and biases, so a mix-up would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    if train_steps:
        _train(model, tok, train_steps, seed, group_sparsity=group_sparsity)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "add_bos_token": False, "chat_template": CHATML,
        "model_max_length": 256}, indent=1))
    if arch_override is not None:
        cj = json.loads((folder / "config.json").read_text())
        cj["architectures"] = [arch_override]
        (folder / "config.json").write_text(json.dumps(cj, indent=1))
    return folder


def _group_masks(model, sparsity: float, g) -> dict:
    """A random per-row mask of 16-weight groups for every decoder linear, keeping
    format.kept_groups(K, sparsity) groups per row (so one-shot GQSA at that sparsity can be exact)."""
    import torch

    from gqsa_gguf import format as fmt

    masks = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            n, k = mod.weight.shape
            n_kept = fmt.kept_groups(k, sparsity)
            order = torch.argsort(torch.rand(n, k // 16, generator=g), dim=1)[:, :n_kept]
            m = torch.zeros(n, k // 16)
            m.scatter_(1, order, 1.0)
            masks[name] = (mod, m.repeat_interleave(16, dim=1))
    return masks


def _train(model, tok, steps: int, seed: int, seqlen: int = 64, batch: int = 8,
           group_sparsity: float | None = None) -> None:
    import torch

    ids = torch.tensor(tok.encode(_TEXT * 8).ids, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    masks = _group_masks(model, group_sparsity, g) if group_sparsity else {}
    with torch.no_grad():
        for mod, m in masks.values():
            mod.weight.mul_(m)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)           # tiny matmuls: one thread is faster, and immune to a busy CPU
    try:
        _steps(model, opt, ids, steps, g, seqlen, batch, masks)
    finally:
        torch.set_num_threads(threads)
    model.eval()


def _steps(model, opt, ids, steps, g, seqlen, batch, masks):
    import torch

    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seqlen, (batch,), generator=g)
        x = torch.stack([ids[s:s + seqlen] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for mod, m in masks.values():
                mod.weight.mul_(m)


_CACHE: dict = {}


def checkpoint(kind: str = "llama", **kw) -> Path:
    """make_checkpoint, memoized per process in a temporary folder (removed at exit)."""
    import atexit
    import shutil
    import tempfile

    key = (kind, json.dumps(kw, sort_keys=True))          # kw may hold dicts (config=...)
    if key not in _CACHE:
        if "root" not in _CACHE:
            _CACHE["root"] = Path(tempfile.mkdtemp(prefix="gqsa-tiny-"))
            atexit.register(shutil.rmtree, _CACHE["root"], True)
        _CACHE[key] = make_checkpoint(_CACHE["root"] / f"{kind}-{len(_CACHE)}", kind, **kw)
    return _CACHE[key]


def calib_file(folder: Path) -> Path:
    """A calibration text file next to a checkpoint folder (the tiny text, repeated)."""
    p = Path(folder).parent / (Path(folder).name + "-calib.txt")
    if not p.exists():
        p.write_text(_TEXT * 20, encoding="utf-8")
    return p


def token_windows(folder: Path, n: int = 4, seqlen: int = 48, seed: int = 0):
    """Deterministic token windows of the tiny text (cycled), LongTensor [n, seqlen]."""
    import numpy as np
    import torch
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(Path(folder) / "tokenizer.json")).encode(_TEXT * 8).ids
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - seqlen, size=n)
    return torch.tensor(np.stack([ids[s:s + seqlen] for s in starts]), dtype=torch.long)


def llama_cpp_logits(llama_cpp, path, windows):
    """The patched llama.cpp's logits at every position of every window, float32 [n * seqlen, vocab]."""
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=windows.shape[1], n_batch=windows.shape[1],
                          n_ubatch=windows.shape[1], logits_all=True, verbose=False)
    out = []
    for row in windows:
        llm.reset()
        llm.eval([int(t) for t in row])
        out.append(np.array(llm.scores[: len(row)], dtype=np.float32))
    return np.concatenate(out)


def logits_agreement(llama_cpp, path, windows) -> tuple[float, float]:
    """(NMSE, top-1 agreement) of llama.cpp's logits against PyTorch's on the model rebuilt from
    the same file (gguf_model.model_from_gguf)."""
    import torch

    from gqsa_gguf.gguf_model import model_from_gguf

    got = llama_cpp_logits(llama_cpp, path, windows)
    model, _ = model_from_gguf(path)
    with torch.no_grad():
        ref = model(input_ids=windows).logits.reshape(-1, got.shape[-1]).numpy()
    return float(((got - ref) ** 2).sum() / (ref ** 2).sum()), float((got.argmax(-1) == ref.argmax(-1)).mean())
