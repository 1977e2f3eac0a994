"""gqsa-gguf: GQSA (group quantization + group sparsity) compression of Hugging Face LLMs into
GGUF files that a patched llama.cpp runs.

The package is laid out one module per pipeline stage; `format` holds the constants of the
on-disk format (docs/FORMAT.md) and is the single source of truth for the Python side.
"""

__version__ = "0.1.0"
