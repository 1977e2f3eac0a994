"""Mistral (MistralForCausalLM) -> llama.cpp's `llama` graph: LLaMA's layout (names, shapes,
interleaved-RoPE q/k permutation, no biases) plus sliding-window attention.

The pinned llama.cpp's `llama` graph reads no sliding-window key: it attends to the whole context.
Over at most `sliding_window` tokens, sliding-window and full attention are the same computation,
so the file declares that many tokens of context (llama.cpp's n_ctx_train) and the summary says so;
a longer context would silently change what the model computes. A file rebuilds to a LLaMA.
"""

from .llama import Llama
from . import register


@register
class Mistral(Llama):
    hf_architectures = ("MistralForCausalLM",)
    hf_config_class = "MistralConfig"
    rope_types = ("default",)
    rebuilds_gguf = False          # a Mistral GGUF is a `llama` GGUF; the Llama layout rebuilds it

    def _window(self, cfg: dict) -> int | None:
        w = cfg.get("sliding_window")
        return w if isinstance(w, int) and not isinstance(w, bool) and w < cfg["max_position_embeddings"] else None

    def check_hf_config(self, cfg: dict) -> str | None:
        w = cfg.get("sliding_window")
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w <= 0):
            return f"sliding_window = {w!r} must be a positive integer or null"
        return super().check_hf_config(cfg)

    def context_length(self, cfg: dict) -> int:
        return self._window(cfg) or cfg["max_position_embeddings"]

    def notes(self, cfg: dict) -> list[str]:
        w = self._window(cfg)
        if w is None:
            return []
        return [f"{self.name}: sliding_window {w} < max_position_embeddings {cfg['max_position_embeddings']}; "
                f"llama.cpp's llama graph attends to the whole context, so the file declares a {w}-token context, "
                f"within which full and sliding-window attention agree"]
