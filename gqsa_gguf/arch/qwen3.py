"""Qwen3 (Qwen3ForCausalLM) -> llama.cpp's `qwen3` graph.

Qwen2's NeoX RoPE (q/k rows keep their order) without q/k/v biases, and an RMSNorm over each head
of q and of k before RoPE (`self_attn.q_norm` / `k_norm`, [head_dim] weights, kept in f32); the
head size is its own hyper-parameter (head_dim * n_head may differ from the hidden size).
"""

from . import DecoderLayout, block_tensors_with, register


@register
class Qwen3(DecoderLayout):
    hf_architectures = ("Qwen3ForCausalLM",)
    gguf_arch = "qwen3"
    hf_config_class = "Qwen3Config"
    block_tensors = block_tensors_with({"self_attn.q_norm.weight": "attn_q_norm.weight",
                                        "self_attn.k_norm.weight": "attn_k_norm.weight"},
                                       after="self_attn.o_proj.weight")

    def check_hf_config(self, cfg: dict) -> str | None:
        if cfg.get("attention_bias"):
            return "Qwen3 with attention_bias is not supported (llama.cpp's qwen3 graph has no q/k/v biases)"
        return None

    def hf_config_from_gguf(self, common: dict, head_dim: int, theta: float):
        import transformers

        return transformers.Qwen3Config(head_dim=head_dim, rope_theta=theta, attention_bias=False,
                                        use_sliding_window=False, **common)
