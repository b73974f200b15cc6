"""``edge-eval eval``: the command line of an evaluation run (see :mod:`edge_eval.eval_run`)."""
from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path
from urllib.parse import urlsplit

from edge_eval.errors import UsageError
from edge_eval.scoring import check_scorers
from edge_eval.tasks import TASKS, get_task, load_items

DEFAULT_METRICS_PORT = 9464


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="score a model through edge-proxy, with joules per item",
        description="Send a task's items through an OpenAI-compatible endpoint (edge-proxy), score "
                    "each answer, read each request's attributed joules from the proxy, and write "
                    "OUT/results.json (mean score and joules with 95% CIs, IPW). "
                    "See docs/evaluation.md.")
    p.add_argument("--endpoint", required=True, help="the proxy's URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--task", required=True, help=f"one of: {', '.join(TASKS)}")
    p.add_argument("--data", default=None, help="builtin:TASK[:train|test] (default builtin:TASK:test), "
                   "hf:NAME[:SPLIT], or a .jsonl/.json/.parquet file")
    p.add_argument("--limit", type=int, default=None, help="at most this many items (builtin: default 200)")
    p.add_argument("--passes", type=int, default=1, help="passes over the items (95%% CIs over passes when >= 2)")
    p.add_argument("--out", required=True, help="output directory (results.json, items.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue the run already in --out")
    p.add_argument("--model", default=None, help="model name sent in requests (default: the endpoint's first /v1/models entry)")
    p.add_argument("--scorer", action="append", default=None, dest="scorers",
                   help="scorer to run (repeatable): f1, exact_match, rouge_l, nli, judge (default: the task's)")
    p.add_argument("--nli-model", default=None, help="sequence-classification NLI model (adds the nli score)")
    p.add_argument("--judge-endpoint", default=None, help="OpenAI-compatible endpoint of the chat judge")
    p.add_argument("--judge-model", default="default", help="judge model name")
    p.add_argument("--judge-api-key", default=os.environ.get("EDGE_EVAL_JUDGE_API_KEY"),
                   help="judge API key (env EDGE_EVAL_JUDGE_API_KEY)")
    p.add_argument("--api-key", default=os.environ.get("EDGE_EVAL_API_KEY"), help="endpoint API key (env EDGE_EVAL_API_KEY)")
    p.add_argument("--lookup-url", default=None, help="the proxy's metrics port URL for per-request "
                   f"energy (default: the endpoint's host, port {DEFAULT_METRICS_PORT}, when a token is given)")
    p.add_argument("--lookup-token", default=os.environ.get("EDGE_EVAL_LOOKUP_TOKEN"),
                   help="the proxy's energy.lookup_token (env EDGE_EVAL_LOOKUP_TOKEN); without it joules are not recorded")
    p.add_argument("--reference-model", default=None, help="Q_ret: the model label of this model's "
                   "reference (FP16) variant, evaluated on the same items")
    p.add_argument("--max-tokens", type=int, default=None, help="generation limit (default: the task's)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the task's)")
    p.add_argument("--concurrency", type=int, default=1, help="requests in flight (default 1)")
    p.add_argument("--retries", type=int, default=3, help="retries per request on connection errors, 429, 5xx")
    p.add_argument("--seed", type=int, default=0, help="builtin data seed and request seed base")
    p.add_argument("--save-outputs", action="store_true", help="store each completion's text in the results (off by default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edge_eval.eval_run import EvalConfig, run_eval

    task = get_task(args.task)
    if args.passes < 1:
        raise UsageError("--passes must be >= 1")
    if args.concurrency < 1 or args.retries < 0:
        raise UsageError("--concurrency must be >= 1 and --retries >= 0")
    scorers = args.scorers or list(task.scorers)
    if args.nli_model and "nli" not in scorers:
        scorers.append("nli")
    check_scorers(task.name, scorers)
    if not urlsplit(args.endpoint).scheme.startswith("http"):
        raise UsageError(f"--endpoint must be an http(s) URL, got {args.endpoint!r}")
    data = args.data or f"builtin:{task.name}:test"
    items = load_items(data, task, args.limit, seed=args.seed, default_split="test")
    nli = None
    if "nli" in scorers:
        if not args.nli_model:
            raise UsageError("the nli scorer needs --nli-model (a sequence-classification NLI model)")
        from edge_eval.scoring.nli import NliScorer
        nli = NliScorer(args.nli_model)
    judge = None
    if args.judge_endpoint:
        from edge_eval.scoring.judge import Judge
        judge = Judge(args.judge_endpoint, args.judge_model, args.judge_api_key)
    lookup_url = args.lookup_url
    if lookup_url is None and args.lookup_token:
        u = urlsplit(args.endpoint)
        lookup_url = f"{u.scheme}://{u.hostname}:{DEFAULT_METRICS_PORT}"
    cfg = EvalConfig(task=task, items=items, data=data, endpoint=args.endpoint, out=Path(args.out),
                     passes=args.passes, scorers=scorers, model=args.model, lookup_url=lookup_url,
                     lookup_token=args.lookup_token, api_key=args.api_key, judge=judge, nli=nli,
                     concurrency=args.concurrency, retries=args.retries, max_tokens=args.max_tokens,
                     temperature=args.temperature, seed=args.seed, limit=args.limit,
                     reference_model=args.reference_model, save_outputs=args.save_outputs,
                     resume=args.resume, quiet=args.quiet)
    doc = asyncio.run(run_eval(cfg))
    return 0 if doc["status"] == "complete" else 1
