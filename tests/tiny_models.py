"""Tiny LLaMA / Qwen2 checkpoints on disk (safetensors + a tiny byte-level BPE tokenizer) for the
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


def make_checkpoint(folder: Path, kind: str = "llama", seed: int = 0, tie: bool | None = None,
                    init_std: float = 0.08, hidden: int = HIDDEN, ffn: int = FFN, pad_vocab: int = 0,
                    arch_override: str | None = None) -> Path:
    """Writes a random tiny checkpoint folder and returns it.

    kind: "llama" (LlamaForCausalLM, tied embeddings by default) or "qwen2" (Qwen2ForCausalLM with
    q/k/v biases, untied head by default). pad_vocab: extra vocabulary rows the tokenizer lacks.
    """
    import torch
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(kind)
    vocab = tok.get_vocab_size() + pad_vocab
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                  initializer_range=init_std, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=2)
    if kind == "llama":
        cfg = transformers.LlamaConfig(tie_word_embeddings=True if tie is None else tie, rope_theta=10000.0, **common)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(tie_word_embeddings=False if tie is None else tie, rope_theta=1000000.0,
                                       use_sliding_window=False, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():              # non-trivial norms and biases, so a mix-up would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
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


def token_windows(folder: Path, n: int = 4, seqlen: int = 48, seed: int = 0):
    """Deterministic token windows of the tiny text (cycled), LongTensor [n, seqlen]."""
    import numpy as np
    import torch
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(Path(folder) / "tokenizer.json")).encode(_TEXT * 8).ids
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - seqlen, size=n)
    return torch.tensor(np.stack([ids[s:s + seqlen] for s in starts]), dtype=torch.long)
