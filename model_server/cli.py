"""``model-server`` command line: ``synth`` (offline model directories), ``serve`` (HTTP server) and
``compile-cache`` (fill or show a compile cache to ship in the image)."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from edge_proxy.cli_errors import OneLineErrorParser

QUANTIZATIONS = ("none", "fp16", "bf16", "nf4", "int8", "int4", "gptq")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="model-server",
        description="A small transformers model server (TGI + OpenAI APIs) and an offline model builder.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    synth = sub.add_parser(
        "synth", help="build a model directory with a public model's shape and random weights (offline)",
        description="Build a model directory offline: the preset's real architecture and shape, random "
                    "weights from the seed, a byte-level BPE tokenizer trained on local text, a chat "
                    "template, generation_config.json, and \"edge_eval_synthetic\": true in config.json.")
    synth.add_argument("out_dir", metavar="OUT_DIR", help="directory to write (created if missing)")
    synth.add_argument("--preset", default="tiny", choices=("tiny", "tiny-16l", "tiny-qwen2", "llama-3.2-1b", "qwen2.5-0.5b"),
                       help="model shape (default: tiny)")
    synth.add_argument("--seed", type=int, default=0, help="random seed for the weights (default: 0)")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")

    serve = sub.add_parser(
        "serve", help="serve a model over the TGI and OpenAI HTTP APIs",
        description="Serve a local Hugging Face model directory (or a hub id where the network allows). "
                    "The server listens at once; GET /health turns 200 when the model is ready.")
    serve.add_argument("model", metavar="MODEL", help="local model directory or hub id")
    serve.add_argument("--port", type=_port, default=8000,
                       help="TCP port (default: 8000, where edge-proxy looks by default; 0 = any free)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    serve.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                       help="auto = cuda when available (default: auto)")
    serve.add_argument("--quantization", default="none", choices=QUANTIZATIONS,
                       help="none = the checkpoint's dtype; nf4/int8 via bitsandbytes; int4 = group-wise INT4 "
                            "weight-only via PyTorch's int4pack kernels; gptq needs a "
                            "pre-quantized checkpoint and gptqmodel+optimum (default: none)")
    serve.add_argument("--max-batch", type=_positive_int, default=32,
                       help="most requests decoded together (default: 32)")
    serve.add_argument("--max-concurrent-requests", type=_positive_int, default=256,
                       help="requests handled at once before answering 429 (default: 256)")
    serve.add_argument("--engine", default="auto", choices=("auto", "fast", "transformers"),
                       help="auto = fast on CUDA when available, else transformers (default: auto)")
    serve.add_argument("--model-name", default=None,
                       help="model name reported by the APIs and accepted in requests (default: the MODEL "
                            "directory's basename, e.g. ./models/llama-1b -> llama-1b; a hub id as given)")
    serve.add_argument("--max-input-tokens", type=_positive_int, default=None,
                       help="longest accepted prompt (default: the model's context minus 1)")
    serve.add_argument("--max-total-tokens", type=_positive_int, default=None,
                       help="longest prompt + completion (default: min(model context, 4096))")
    serve.add_argument("--max-new-tokens-default", type=_positive_int, default=20,
                       help="max_new_tokens when a TGI request gives none (default: 20)")
    serve.add_argument("--drain-timeout", type=float, default=30.0,
                       help="seconds SIGTERM waits for in-flight requests (default: 30)")
    serve.add_argument("--api-workers", type=_non_negative_int, default=0,
                       help="HTTP API worker processes in front of one engine process (SO_REUSEPORT on "
                            "the same port; needs the fast engine); 0 = HTTP and engine in one process "
                            "(default: 0)")
    serve.add_argument("--no-warmup", action="store_true", help="skip the warm-up generation")
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    serve.add_argument("--check-config", action="store_true",
                       help="check the arguments and the model directory, print them as JSON, exit 0 "
                            "without loading anything (CI checks Kubernetes manifests with it)")
    _add_compile_cache(sub)
    return parser


def _add_compile_cache(sub) -> None:
    cc = sub.add_parser(
        "compile-cache", help="fill a compile cache on the target card (to ship in the container image), or show one",
        description="serve keeps torch.compile's and Triton's caches in MODEL_SERVER_COMPILE_CACHE (default "
                    "~/.cache/edge-eval/torchinductor); a start that finds them filled skips compiling. 'fill' "
                    "fills a folder by serving the model once with the server's own switches; copy it to "
                    "docker/compile-cache/ before 'docker build' and the image's first start on that card type "
                    "copies it into its cache (MODEL_SERVER_COMPILE_CACHE_SEED). See docs/model_server.md.")
    ccsub = cc.add_subparsers(dest="cache_command", metavar="ACTION")
    fill = ccsub.add_parser(
        "fill", help="serve MODEL once, compile everything a server compiles, write the cache to --out",
        description="Start 'model-server serve MODEL' with its compile cache in --out, wait for the warm-up, "
                    "send requests at every batch size up to --max-batch and a few prompt lengths, stop it, and "
                    "write the manifest (edge-eval-compile-cache.json: card, versions, files). Run it on the card "
                    "type, with the quantization and switches (MODEL_SERVER_* variables) the image will serve.")
    fill.add_argument("model", metavar="MODEL", help="local model directory (as for serve)")
    fill.add_argument("--out", required=True, help="cache folder to fill (created if missing; files there are kept)")
    fill.add_argument("--quantization", default="none", choices=QUANTIZATIONS, help="as for serve (default: none)")
    fill.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="as for serve (default: auto)")
    fill.add_argument("--engine", default="auto", choices=("auto", "fast", "transformers"),
                      help="as for serve (default: auto)")
    fill.add_argument("--max-batch", type=_positive_int, default=32,
                      help="as for serve; requests go at batch 1, 2, 4, ... up to it (default: 32)")
    fill.add_argument("--max-total-tokens", type=_positive_int, default=None, help="as for serve")
    fill.add_argument("--timeout", type=_positive_float, default=1800.0,
                      help="seconds the whole fill may take before it stops with an error (default: 1800)")
    fill.add_argument("--quiet", action="store_true", help="no progress lines")
    show = ccsub.add_parser("show", help="print a filled cache's manifest and file count as JSON",
                            description="Print DIR's manifest (edge-eval-compile-cache.json) with the files "
                                        "and bytes found there now, as JSON; exit 2 when DIR holds no manifest.")
    show.add_argument("dir", metavar="DIR", help="a cache folder filled by 'fill'")


def _compile_cache_main(args, parser: argparse.ArgumentParser) -> int:
    import json
    import time
    from pathlib import Path

    from model_server import compile_cache

    if args.cache_command == "show":
        try:
            manifest = compile_cache.read_manifest(Path(args.dir))
        except ValueError as exc:
            print(f"model-server compile-cache: error: {exc}", file=sys.stderr)
            return 2
        if manifest is None:
            print(f"model-server compile-cache: error: {args.dir} holds no {compile_cache.MANIFEST} "
                  f"(not filled by 'model-server compile-cache fill')", file=sys.stderr)
            return 2
        files = compile_cache.cache_files(Path(args.dir))
        print(json.dumps({**manifest, "files_now": len(files),
                          "bytes_now": sum((Path(args.dir) / f).stat().st_size for f in files)}, indent=2))
        return 0
    if args.cache_command != "fill":
        print("model-server compile-cache: error: choose an action: fill or show (model-server compile-cache --help)",
              file=sys.stderr)
        return 2
    from model_server.compile_cache_fill import FillError, fill

    serve_args = ["--quantization", args.quantization, "--device", args.device, "--engine", args.engine,
                  "--max-batch", str(args.max_batch)]
    if args.max_total_tokens:
        serve_args += ["--max-total-tokens", str(args.max_total_tokens)]
    t0 = time.monotonic()

    def say(msg: str) -> None:
        if not args.quiet:
            print(f"[{time.monotonic() - t0:6.1f} s] {msg}", file=sys.stderr, flush=True)

    try:
        manifest = fill(args.model, args.out, serve_args, timeout_s=args.timeout, say=say)
    except FillError as exc:
        print(f"model-server compile-cache fill: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    code = f" ({manifest['bytecode_files']} of them torch's bytecode)" if manifest.get("bytecode_files") else ""
    print(f"{Path(args.out).resolve()}: {manifest['files']} files{code}, {manifest['bytes'] / 1e6:.1f} MB, "
          f"filled on {manifest.get('device')} in {manifest['fill_seconds']} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "synth":
        from model_server.synth import SynthError, synthesize

        try:
            out = synthesize(args.out_dir, args.preset, seed=args.seed,
                             show_progress=not args.quiet and sys.stderr.isatty())
        except SynthError as exc:
            print(f"model-server synth: error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"model-server synth: error: {exc.strerror or exc}: {exc.filename or args.out_dir}",
                  file=sys.stderr)
            return 2
        print(out)
        return 0
    if args.command == "compile-cache":
        return _compile_cache_main(args, parser)
    if args.command == "serve" and args.api_workers and args.engine == "transformers":
        parser.error("--api-workers needs the fast engine (--engine fast or auto), not --engine transformers")
    if args.command == "serve" and args.check_config:
        import json

        from model_server.loading import LoadError, check_model_argument

        try:
            check_model_argument(args.model)
        except LoadError as exc:
            print(f"model-server serve: error: {exc}", file=sys.stderr)
            return 2
        print(json.dumps({k: v for k, v in vars(args).items() if k != "check_config"}, indent=2))
        return 0
    if args.command == "serve":
        from model_server.server import ServeError, run_server

        from model_server import compile_cache

        compile_cache.configure()

        try:
            return run_server(args)
        except ServeError as exc:
            print(f"model-server serve: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
    parser.print_help()
    return 2
