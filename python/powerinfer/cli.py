"""The ``powerinfer`` command line."""
from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any, Optional, Sequence, TextIO

from .units import parse_size

if TYPE_CHECKING:
    from .llama import Llama

from .format import ACTIVATIONS


def _cmd_make_test_model(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .testmodels import PRESETS, Sparsity, write_test_model

    sparsity = Sparsity(active_fraction=args.active_fraction, skew=args.skew, locality=args.locality)
    with tqdm(total=1, unit="tensor", desc=f"writing {os.path.basename(args.output)}",
              disable=args.quiet) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        path = write_test_model(args.output, preset=args.preset, wtype=args.type, sparsity=sparsity,
                                seed=args.seed, progress=progress)
    shape = PRESETS[args.preset]
    print(f"{path}: {os.path.getsize(path) / 2**30:.2f} GiB, {shape.n_layer} layers, "
          f"n_embd {shape.n_embd}, n_ff {shape.n_ff}, {args.type}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    from tqdm import tqdm

    threads = args.threads or max(1, os.cpu_count() or 1)
    modes = ([m.strip() for m in args.modes.split(",") if m.strip()] if args.modes
             else list(bench.default_modes(args.model)))
    total = len(modes) * args.repetitions
    with tqdm(total=total, unit="run", desc="benchmarking", delay=1.0, disable=args.quiet) as bar:
        def progress(i: int, mode: str) -> None:  # called as run i starts: the ones before it are done
            bar.update(i - bar.n)
            bar.set_postfix_str(mode)

        rows = bench.run(args.model, modes=modes, threads=threads, n_prompt=args.n_prompt,
                         n_gen=args.n_gen, reps=args.repetitions, seed=args.seed, source=args.source,
                         tg_text=args.tg_text, progress=progress)
        bar.update(total - bar.n)
    print(bench.format_table(args.model, rows, threads))
    return 0


# CATS (arXiv 2404.08763) and TEAL (arXiv 2408.14690) find about half of a 7B SiLU model's MLP
# activations can be dropped by magnitude at little cost, without training; a converted silu/gelu
# model without a threshold would not be sparse at all.
DEFAULT_TARGET_SPARSITY = 0.5
# Tokens of the calibration pass that sets |f(gate)| thresholds: Gemma 3 270M's thresholds for
# 50% sparsity move by under 1% from 2048 to 8192 tokens.
CALIBRATION_TOKENS = 4096


def _calibrate(args: argparse.Namespace, model: str, target: float, part: Optional[str] = None) -> dict[int, float]:
    """Per-layer |f(gate)| thresholds for `target` sparsity, on the calibration text's `part`."""
    from tqdm import tqdm

    from .calibration import calibration_texts
    from .profile import calibrate_thresholds

    tokens = min(args.tokens, CALIBRATION_TOKENS)
    with tqdm(total=tokens, unit="tok", desc="calibrating thresholds", disable=args.quiet) as bar:
        return calibrate_thresholds(model, calibration_texts(args.calibration, part=part), target,
                                    max_tokens=tokens, threads=args.threads, progress=bar.update)


def _cmd_profile(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .calibration import calibration_texts
    from .profile import profile_model

    thresholds = None
    if args.target_sparsity is not None:
        _check_sparsity(args.target_sparsity)
        thresholds = _calibrate(args, args.model, args.target_sparsity)
    with tqdm(total=args.tokens, unit="tok", desc="profiling", disable=args.quiet) as bar:
        prof = profile_model(args.model, calibration_texts(args.calibration),
                             max_tokens=args.tokens, n_ctx=args.ctx_size, threads=args.threads,
                             max_samples=args.samples, thresholds=thresholds,
                             target_sparsity=args.target_sparsity if thresholds else float("nan"),
                             progress=bar.update)
    print(prof.summary())
    if args.output:
        prof.save(args.output)
        print(f"wrote {args.output}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from . import pwri

    if not pwri.is_pwri(args.model):
        return _convert(args, args.model)
    # A PowerInfer (PWRI) file brings its predictors and down_t: profile an ordinary GGUF of the
    # same model for the hot-first order, then convert with those instead of training
    with tempfile.TemporaryDirectory(dir=Path(args.output).resolve().parent, prefix=".powerinfer-import-") as tmp:
        plain = pwri.to_plain_gguf(args.model, Path(tmp) / "plain.gguf")
        return _convert(args, str(plain), pwri_source=args.model)


def _check_sparsity(target: float) -> None:
    if not 0.0 <= target < 1.0:
        raise ValueError(f"--target-sparsity must be in [0, 1), got {target}")


def _target_sparsity(args: argparse.Namespace, activation: str) -> Optional[float]:
    """The sparsity to calibrate thresholds for: --target-sparsity, by default DEFAULT_TARGET_SPARSITY
    for thresholded silu/gelu layers; None for the ReLU family, which is sparse by its activation
    (asking for a target there is an error rather than a silently ignored option)."""
    from .format import THRESHOLDED

    if activation not in THRESHOLDED:
        if args.target_sparsity is not None:
            raise ValueError(f"--target-sparsity applies to silu_threshold / gelu_threshold layers; {activation} "
                             f"is a ReLU-family activation, sparse by itself")
        return None
    target = DEFAULT_TARGET_SPARSITY if args.target_sparsity is None else args.target_sparsity
    _check_sparsity(target)
    return target


def _convert(args: argparse.Namespace, model: str, pwri_source: str | None = None) -> int:
    import math

    from tqdm import tqdm

    from .calibration import calibration_texts
    from .format import FormatError, convert, fingerprint, resolve_activation
    from .profile import ModelProfile, profile_model

    train = args.predictors and pwri_source is None
    samples = args.samples if train else 0
    activation = args.activation
    if pwri_source is not None and activation == "auto":
        activation = "relu"  # PowerInfer's sparse models (ReluLLaMA, ProSparse) are ReLU
    activation = resolve_activation(model, activation)
    target = _target_sparsity(args, activation)
    thresholds: Optional[dict[int, float]] = None
    if args.profile:
        prof = ModelProfile.load(args.profile)
        if prof.fingerprint and prof.fingerprint != fingerprint(model):
            raise FormatError(f"profile {args.profile} was made for another model ({prof.model_path})")
        if target is not None and not (prof.thresholded and math.isclose(prof.target_sparsity, target)):
            made = f"for sparsity {prof.target_sparsity}" if prof.thresholded else "without thresholds"
            raise FormatError(f"profile {args.profile} was made {made}; {activation} layers at sparsity {target} "
                              f"need: powerinfer profile --target-sparsity {target} --samples N")
        if target is None and prof.thresholded:
            raise FormatError(f"profile {args.profile} counts |f(gate)| > threshold as active; {activation} layers "
                              f"need a profile made without --target-sparsity")
        thresholds = prof.thresholds() if target is not None else None
    else:
        if target is not None:
            thresholds = _calibrate(args, model, target, part="train")
        with tqdm(total=args.tokens, unit="tok", desc="profiling", disable=args.quiet) as bar:
            prof = profile_model(model, calibration_texts(args.calibration, part="train"),
                                 max_tokens=args.tokens, threads=args.threads, max_samples=samples,
                                 thresholds=thresholds, target_sparsity=target if target is not None else math.nan,
                                 progress=bar.update)
    if train and not all(len(layer.samples_x) for layer in prof.layers):
        raise FormatError("the profile holds no samples: profile with --samples, or convert without --profile")
    small = max(256, args.tokens // 8)

    def other_profile(part: str, samples: bool = True) -> ModelProfile:
        with tqdm(total=small, unit="tok", desc=f"{part} profile", disable=args.quiet) as bar:
            return profile_model(model, calibration_texts(args.calibration, part=part), max_tokens=small,
                                 threads=args.threads, max_samples=small if samples else 0,
                                 thresholds=thresholds, progress=bar.update)

    # held-out text: the measured sparsity of every file, and the predictors' quality
    held = other_profile("held_out", samples=train or pwri_source is not None)
    predictors = None
    down_t = None
    if pwri_source is not None:
        from . import pwri
        from .predictor import evaluate

        predictors = {}
        for il, p in pwri.predictors(pwri_source).items():
            layer = held.layers[il]
            predictors[il] = (p, evaluate(p, layer.samples_x, layer.samples_active))
        down_t = pwri.down_t_rows(pwri_source)
    elif args.predictors:
        from .gguf_io import gate_matrices
        from .predictor import train_layer_predictors

        validation = other_profile("validation")
        ffn_bytes = _ffn_bytes(model)
        with tqdm(total=len(prof.layers), unit="layer", desc="training predictors", disable=args.quiet) as bar:
            predictors = train_layer_predictors(prof.layers, validation.layers, held.layers,
                                                ffn_bytes, gates=gate_matrices(model),
                                                progress=lambda _: bar.update(1))
    sparsity = {il: layer.inactive_fraction(activation) for il, layer in enumerate(held.layers)}
    with tqdm(total=1, unit="step", desc="writing bundles", disable=args.quiet) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        out = convert(model, args.output, prof.frequencies(), profile_tokens=prof.tokens,
                      predictors=predictors, activation=activation, thresholds=thresholds, sparsity=sparsity,
                      down_t=down_t, identity=pwri_source, progress=progress)
    print(out.summary())
    if target is not None:
        print(f"powerinfer: {activation} layers thresholded for {target:.0%} sparsity. What that costs depends on "
              f"the model (Gemma 3 270M at 50%: +27% perplexity); measure it with `powerinfer sparse-quality "
              f"{args.output}`, choose with --target-sparsity.", file=sys.stderr)
    return 0


def _ffn_bytes(model: str) -> dict[int, int]:
    """Bytes of each layer's gate, up and down weights."""
    import re

    from . import _core

    sizes: dict[int, int] = {}
    for t in _core.read_gguf_header(model, ["general.architecture"])["tensors"]:
        m = re.match(r"^blk\.(\d+)\.ffn_(gate|up|down)\.weight$", t["name"])
        if m:
            sizes[int(m.group(1))] = sizes.get(int(m.group(1)), 0) + t["nbytes"]
    return sizes


def _cmd_compare(args: argparse.Namespace) -> int:
    from .quality import against_stock

    a = against_stock(args.source, args.model, args.prompt, args.tokens, n_ctx=args.ctx_size,
                      n_threads=args.threads, verbose=False, seed=0)
    print(f"{args.model} vs {args.source} in stock llama-cpp-python, teacher-forced over "
          f"{a.tokens} positions: top-1 agreement {a.top1:.4f}, KL mean {a.kl_mean:.3g} max {a.kl_max:.3g} nats, "
          f"max |logit difference| {a.max_abs_diff:.3g}")
    return 0


def _cmd_sparse_quality(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .calibration import calibration_texts
    from .quality import open_sparse_switch, sparse_cost

    llm, set_sparse = open_sparse_switch(args.model, args.mode, source=args.source, n_ctx=args.ctx_size,
                                         n_threads=args.threads, n_threads_batch=args.threads)
    try:
        with tqdm(total=args.tokens, unit="tok", desc="comparing", disable=args.quiet) as bar:
            c = sparse_cost(llm, set_sparse, calibration_texts(args.calibration, part="held_out"),
                            max_tokens=args.tokens, window=args.ctx_size, decode=args.mode != "emulate",
                            progress=bar.update)
    finally:
        llm.close()
    how = {"predicted": "sparse decode (predictors where they save work)",
           "predictor": "sparse decode, every layer's predictor used",
           "oracle": "sparse decode, every gate row computed (thresholds alone)",
           "emulate": "thresholds applied to the dense engine through cb_eval (thresholds alone)"}[args.mode]
    print(f"{args.model}: {how}, {c.tokens} held-out positions: perplexity dense {c.perplexity_dense:.4f}, "
          f"sparse {c.perplexity_sparse:.4f} ({c.perplexity_sparse / c.perplexity_dense - 1:+.2%}); "
          f"top-1 agreement {c.top1:.4f}; KL mean {c.kl_mean:.3g} max {c.kl_max:.3g} nats")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .format import PowerInferFile

    print(PowerInferFile.open(args.model).summary())
    return 0


class _LoadProgress:
    """A progress bar for llama.cpp's model load, shown if the load takes over a second.

    llama-cpp-python points file descriptor 2 at /dev/null while it loads (unless verbose), so
    the bar writes to a duplicate of the terminal's stderr taken before.
    """

    def __init__(self, path: str, enabled: bool) -> None:
        self._label = f"loading {os.path.basename(path)}"
        self._enabled = enabled
        self._bar: Any = None
        self._stream: Optional[TextIO] = None

    def __enter__(self) -> "_LoadProgress":
        if self._enabled:
            sys.stderr.flush()
            self._stream = os.fdopen(os.dup(sys.stderr.fileno()), "w")
        return self

    def __call__(self, fraction: float) -> None:
        if self._stream is None:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=100, desc=self._label, unit="%", file=self._stream, delay=1.0,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}]")
        self._bar.update(round(fraction * 100) - self._bar.n)

    def __exit__(self, *_: object) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._stream is not None:
            self._stream.close()


def _open_model(args: argparse.Namespace) -> "Llama":
    """powerinfer.Llama for the run / chat / serve options in `args`."""
    from .llama import Llama

    chat_format = getattr(args, "chat_format", None)
    if chat_format is not None:
        from llama_cpp import llama_chat_format

        try:  # before loading: a typo should not cost a model load
            llama_chat_format.get_chat_completion_handler(chat_format)
        except Exception as exc:
            raise ValueError(str(exc)) from None
    try:
        with _LoadProgress(args.model, enabled=not (args.quiet or args.verbose)) as progress:
            llm = Llama(args.model, n_ctx=args.ctx_size, n_threads=args.threads, ffn_on_disk=args.ffn_on_disk,
                        memory_budget=args.memory_budget, verbose=args.verbose, load_progress=progress,
                        chat_format=chat_format, sparse=False if args.dense else None)
    except NotImplementedError as exc:
        if args.memory_budget is None:
            raise
        raise NotImplementedError("--memory-budget is not available yet: it arrives with the neuron cache. "
                                  "Use --ffn-on-disk to keep FFN weights out of memory.") from exc
    if hasattr(args, "chat_format") and args.chat_format is None and "tokenizer.chat_template" not in llm.metadata:
        print(f"powerinfer: warning: {os.path.basename(args.model)} has no chat template; chat uses "
              f"llama-cpp-python's fallback format ({llm.chat_format}). Choose one with --chat-format.",
              file=sys.stderr)
    return llm


def _cmd_run(args: argparse.Namespace) -> int:
    llm = _open_model(args)
    for chunk in llm(args.prompt, max_tokens=args.n_predict, temperature=args.temperature,
                     seed=args.seed, stream=True):
        sys.stdout.write(chunk["choices"][0]["text"])
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        for key, value in llm.powerinfer_stats().items():
            print(f"{key}: {value}", file=sys.stderr)
    elif args.summary:
        s = llm.powerinfer_stats()
        where = "disk" if s["ffn_on_disk"] else "RAM"
        print(f"[PowerInfer backend: {s['ffn_matmuls']} FFN matmuls over {s['ffn_graphs']} layer "
              f"passes, {s['ffn_seconds']:.2f} s in FFN, weights in {where}, "
              f"{s['ffn_bytes_read'] / 2**20:.0f} MiB read]", file=sys.stderr)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from .chat import chat_loop

    llm = _open_model(args)
    return chat_loop(llm, sys.stdin, sys.stdout, system=args.system, max_tokens=args.n_predict,
                     temperature=args.temperature, seed=args.seed)


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve  # before loading: a missing server dependency fails at once

    llm = _open_model(args)
    name = args.alias or os.path.basename(args.model)
    print(f"powerinfer: serving {name} at http://{args.host}:{args.port}/v1 "
          f"(metrics at /metrics); Ctrl-C stops", file=sys.stderr)
    serve(llm, name, host=args.host, port=args.port, model_path=args.model,
          log_level="info" if args.verbose else "warning")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .models import gemma3_270m

    path = gemma3_270m()
    print(f"model: {path}", file=sys.stderr)
    run_args = argparse.Namespace(model=str(path), prompt=args.prompt, n_predict=args.n_predict,
                                  ctx_size=1024, threads=args.threads, ffn_on_disk=args.ffn_on_disk,
                                  memory_budget=None, temperature=0.0, seed=0, verbose=False,
                                  quiet=False, stats=False, summary=True)
    return _cmd_run(run_args)


def build_parser() -> argparse.ArgumentParser:
    from .testmodels import PRESETS, TYPES

    parser = argparse.ArgumentParser(prog="powerinfer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-test-model", help="write a synthetic GGUF model with planted sparsity")
    p.add_argument("output", help="path of the .gguf file to write")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--type", choices=sorted(TYPES), default="f16", help="weight type")
    p.add_argument("--active-fraction", type=float, default=0.1,
                   help="mean fraction of FFN neurons active per token (default 0.1)")
    p.add_argument("--skew", type=float, default=1.0, help="power-law skew of neuron frequency")
    p.add_argument("--locality", type=float, default=0.5, help="token-to-token correlation, 0..1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_make_test_model)

    p = sub.add_parser("bench", help="pp/tg tokens per second, stock llama-cpp-python vs PowerInfer")
    p.add_argument("model")
    p.add_argument("-p", "--n-prompt", type=int, default=512)
    p.add_argument("-n", "--n-gen", type=int, default=128)
    p.add_argument("-r", "--repetitions", type=int, default=3)
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("--modes", default=None,
                   help="comma list of stock, ram, disk (GGUF models; default all three) or stock, dense, "
                        "sparse (PowerInfer models; default all three)")
    p.add_argument("--source", default=None,
                   help="for a PowerInfer model: the GGUF it was converted from, which stock runs")
    p.add_argument("--tg-text", action=argparse.BooleanOptionalAction, default=None,
                   help="tg decodes the model's greedy continuation of a text prompt instead of random "
                        "tokens (default for PowerInfer models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("profile", help="measure per-neuron FFN activation frequencies on calibration text")
    p.add_argument("model")
    p.add_argument("--calibration", default=None,
                   help="text file (paragraphs); default: generated from Python stdlib docstrings")
    p.add_argument("--tokens", type=int, default=16384, help="calibration tokens to run (default 16384)")
    p.add_argument("--samples", type=int, default=0, help="(input, active set) samples to keep per layer")
    p.add_argument("--target-sparsity", type=float, default=None, metavar="S",
                   help="first calibrate per-layer |f(gate)| thresholds (f: the graph's silu/gelu) so that a "
                        "fraction S of activations is at or below them, then count and sample active sets "
                        "as |f(gate)| > threshold")
    p.add_argument("-c", "--ctx-size", type=int, default=512)
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("-o", "--output", default=None, help="write the profile (.npz)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_profile)

    p = sub.add_parser("convert", help="write a PowerInfer model (neuron bundles, hot-first) from a GGUF")
    p.add_argument("model", help="source GGUF")
    p.add_argument("output", help="PowerInfer model to write")
    p.add_argument("--profile", default=None, help="a profile from `powerinfer profile -o` (else profile now)")
    p.add_argument("--calibration", default=None, help="text file for profiling (default: stdlib docstrings)")
    p.add_argument("--tokens", type=int, default=16384, help="calibration tokens when profiling")
    p.add_argument("--samples", type=int, default=4096, help="samples per layer for predictor training")
    p.add_argument("--no-predictors", dest="predictors", action="store_false",
                   help="skip predictor training (ReLU-family activity is gate > 0)")
    p.add_argument("--activation", default="auto", choices=("auto",) + ACTIVATIONS,
                   help="what the FFN computes (auto: declared by the file, relu for PowerInfer (PWRI) "
                        "files, else the architecture's silu/gelu, thresholded)")
    p.add_argument("--target-sparsity", type=float, default=None, metavar="S",
                   help=f"silu_threshold / gelu_threshold layers: calibrate each layer's |f(gate)| threshold so "
                        f"that a fraction S of activations is dropped on calibration text (default "
                        f"{DEFAULT_TARGET_SPARSITY}); an error for ReLU-family layers")
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("compare", help="agreement of a converted model with its source in stock llama-cpp-python")
    p.add_argument("source", help="source GGUF (run by stock llama-cpp-python)")
    p.add_argument("model", help="model run by powerinfer.Llama (e.g. the converted file)")
    p.add_argument("-p", "--prompt", default="The quick brown fox")
    p.add_argument("-n", "--tokens", type=int, default=256, help="greedy tokens generated by stock")
    p.add_argument("-c", "--ctx-size", type=int, default=512)
    p.add_argument("-t", "--threads", type=int, default=None)
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("sparse-quality", help="what sparse decode costs: dense vs sparse on held-out text",
                       description="Perplexity of held-out calibration text under dense and sparse decode of "
                                   "one converted model, and the sparse model's top-1 agreement and KL "
                                   "divergence with dense, teacher-forced.")
    p.add_argument("model", help="a PowerInfer model from `powerinfer convert`")
    p.add_argument("--mode", choices=("predicted", "predictor", "oracle", "emulate"), default="predicted",
                   help="the sparse side: predicted (decode as generation runs it, default), predictor (every "
                        "layer's predictor used), oracle (every gate row computed), emulate (the dense engine with thresholded-out activations "
                        "zeroed, batched: quick, and independent of the sparse engine)")
    p.add_argument("--source", default=None,
                   help="--mode emulate: run the GGUF the model was converted from, with its thresholds")
    p.add_argument("--calibration", default=None, help="text file whose held-out part is used (default: "
                                                       "stdlib docstrings)")
    p.add_argument("--tokens", type=int, default=4096, help="held-out tokens to evaluate (default 4096)")
    p.add_argument("-c", "--ctx-size", type=int, default=256, help="window of each evaluation (default 256)")
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_sparse_quality)

    p = sub.add_parser("inspect", help="show the layout of a PowerInfer model")
    p.add_argument("model")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("run", help="generate text from a prompt (streamed)")
    p.add_argument("model", help="GGUF model (or a PowerInfer model from `powerinfer convert`)")
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=-1)
    p.add_argument("--stats", action="store_true", help="print backend counters at the end")
    _add_model_options(p)
    p.set_defaults(func=_cmd_run, summary=False)

    p = sub.add_parser("chat", help="chat with a model in the terminal (its GGUF chat template)",
                       description="Interactive chat: one message per line on stdin, replies streamed. "
                                   "/reset clears the conversation; /exit, end of input or Ctrl-C ends it.")
    p.add_argument("model", help="GGUF model (or a PowerInfer model from `powerinfer convert`)")
    p.add_argument("--system", default=None, help="system message")
    _add_chat_format_option(p)
    p.add_argument("-n", "--n-predict", type=int, default=None,
                   help="maximum tokens per reply (default: until the model stops or the context is full)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=-1)
    _add_model_options(p)
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)",
                       description="Serve one model over the OpenAI API: /v1/completions, /v1/chat/completions "
                                   "(streaming with stream=true), /v1/models, /health, and Prometheus "
                                   "metrics at /metrics. Requests are answered one at a time, in order.")
    p.add_argument("model", help="GGUF model (or a PowerInfer model from `powerinfer convert`)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--alias", default=None, help="model id for clients (default: the file name)")
    _add_chat_format_option(p)
    _add_model_options(p, ctx_size=4096)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("demo", help="generate text with Gemma 3 270M through the PowerInfer backend")
    p.add_argument("-p", "--prompt", default="The three most useful things to know about the Python language are")
    p.add_argument("-n", "--n-predict", type=int, default=64)
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("--ffn-on-disk", action="store_true")
    p.set_defaults(func=_cmd_demo)
    return parser


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_chat_format_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chat-format", default=None, metavar="NAME",
                   help="a llama-cpp-python chat format (chatml, gemma, llama-3, ...) instead of the "
                        "chat template stored in the model file")


def _add_model_options(p: argparse.ArgumentParser, ctx_size: int = 2048) -> None:
    """Options shared by the commands that load a model for generation."""
    p.add_argument("-c", "--ctx-size", type=int, default=ctx_size, help=f"context length (default {ctx_size})")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: llama.cpp's choice)")
    p.add_argument("--ffn-on-disk", action="store_true",
                   help="keep FFN weights in the model file and read them when used")
    p.add_argument("--memory-budget", type=_size, default=None, metavar="SIZE",
                   help="memory for the neuron cache, e.g. 4GiB (not available yet: arrives with the cache)")
    p.add_argument("--dense", action="store_true",
                   help="converted models: run the FFN dense, as the source model (default: sparse decode)")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's log")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, NotImplementedError) as exc:
        print(f"powerinfer: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
