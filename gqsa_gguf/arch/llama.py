"""LLaMA (LlamaForCausalLM: LLaMA 1-3, SmolLM2, ...) -> llama.cpp's `llama` graph.

Interleaved RoPE in llama.cpp, so q/k rows are permuted; no biases; plain RoPE or LLaMA-3.1's
'llama3' frequency scaling (written as a `rope_freqs.weight` tensor).
"""

from . import DecoderLayout, register


@register
class Llama(DecoderLayout):
    hf_architectures = ("LlamaForCausalLM",)
    gguf_arch = "llama"
    hf_config_class = "LlamaConfig"
    rope_types = ("default", "llama3")
    rope_permuted = True

    def check_hf_config(self, cfg: dict) -> str | None:
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            return "LLaMA with attention_bias/mlp_bias is not supported"
        return None
