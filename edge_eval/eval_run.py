"""One evaluation run: every (item, pass) through the endpoint, scored, with its joules.

Requests go out ``concurrency`` at a time (default 1: one request in flight, so each request's
attributed energy is its own and not a share of a batch). Each finished item is appended to
``items.jsonl`` and ``results.json`` is rewritten (see :mod:`edge_eval.results`). When the endpoint
stays down past the bounded retries the run stops: ``status: "failed"``, partial results saved.
"""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from edge_eval.client import EndpointDown, ProxyClient
from edge_eval.errors import RunFailed, UsageError
from edge_eval.results import ResultsWriter
from edge_eval.scoring import SCORE_NAMES, score_text
from edge_eval.scoring.judge import Judge
from edge_eval.tasks.base import Item, TaskSpec


@dataclass
class EvalConfig:
    task: TaskSpec
    items: list[Item]
    data: str
    endpoint: str
    out: Path
    passes: int = 1
    scorers: list[str] = field(default_factory=list)
    model: str | None = None
    lookup_url: str | None = None
    lookup_token: str | None = None
    api_key: str | None = None
    judge: Judge | None = None
    nli: Any = None
    concurrency: int = 1
    retries: int = 3
    max_tokens: int | None = None
    temperature: float | None = None
    seed: int = 0
    limit: int | None = None
    reference_model: str | None = None
    save_outputs: bool = False
    resume: bool = False
    quiet: bool = False


async def _preflight_lookup(client: ProxyClient) -> None:
    """A wrong lookup token or URL is bad input: fail before the first request, not silently."""
    if not (client.lookup_url and client.lookup_token):
        return
    assert client.session is not None
    try:
        async with client.session.get(f"{client.lookup_url}/edge/requests/edge-eval-preflight",
                                      headers={"Authorization": f"Bearer {client.lookup_token}"}) as r:
            body = await r.text()
            status = r.status
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise UsageError(f"energy lookup {client.lookup_url} unreachable ({type(exc).__name__}); "
                         "check --lookup-url (the proxy's metrics port)") from None
    if status == 401:
        raise UsageError("energy lookup refused the token: --lookup-token must equal the "
                         "proxy's energy.lookup_token")
    if status == 404 and "disabled" in body:
        raise UsageError("the proxy's request lookup is off: start it with energy.lookup_token "
                         "(EDGE_PROXY_ENERGY_LOOKUP_TOKEN)")


async def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    task = cfg.task
    score_name = SCORE_NAMES.get(cfg.scorers[0], cfg.scorers[0]) if cfg.scorers else task.primary_score
    if task.name == "rag" and "nli" in cfg.scorers and cfg.nli is not None:
        score_name = "nli"
    console = Console(stderr=True, quiet=cfg.quiet)
    async with ProxyClient(cfg.endpoint, cfg.model, lookup_url=cfg.lookup_url,
                           lookup_token=cfg.lookup_token, api_key=cfg.api_key,
                           retries=cfg.retries) as client:
        await _preflight_lookup(client)
        try:
            if client.model is None:
                client.model = await client.served_model()
        except EndpointDown as exc:
            raise RunFailed(f"endpoint down before the first item: {exc}") from None
        header = {"task": task.name, "data": cfg.data, "endpoint": cfg.endpoint,
                  "request_model": client.model, "model": client.model, "passes": cfg.passes,
                  "limit": cfg.limit, "seed": cfg.seed, "concurrency": cfg.concurrency,
                  "score_name": score_name,
                  "scorers": cfg.scorers, "reference_model": cfg.reference_model,
                  "generation": {"max_tokens": cfg.max_tokens or task.max_tokens,
                                 "temperature": task.temperature if cfg.temperature is None
                                 else cfg.temperature}}
        writer = ResultsWriter(cfg.out, header, resume=cfg.resume)
        todo = [(it, p) for p in range(cfg.passes) for it in cfg.items
                if (it.id, p) not in writer.done()]
        if "judge" in cfg.scorers and cfg.judge is None:
            console.print("[yellow]chat: no --judge-endpoint given: items are not scored "
                          "(judge skipped)[/yellow]")
        failed: str | None = None
        sem = asyncio.Semaphore(max(1, cfg.concurrency))
        lock = asyncio.Lock()
        gen = header["generation"]

        async def one(item: Item, p: int) -> None:
            async with sem:
                msgs = task.messages(item)
                reply = await client.chat(msgs, max_tokens=gen["max_tokens"],
                                          temperature=gen["temperature"], seed=cfg.seed + p)
                energy = await client.energy(reply.request_id)
                scores: dict[str, float] = {}
                if reply.error is None:
                    scores = score_text(task.name, cfg.scorers, item, reply.text, cfg.nli)
                    if "judge" in cfg.scorers and cfg.judge is not None:
                        verdict = await cfg.judge.score(client.session, msgs, reply.text)  # type: ignore[arg-type]
                        scores.update(verdict or {})
                if energy.model and header["model"] == client.model:
                    header["model"] = energy.model          # the proxy's label for this model
                rec = {"id": item.id, "pass": p, "scores": scores,
                       "scored": score_name in scores,
                       "output_tokens": reply.output_tokens if reply.output_tokens is not None
                       else energy.output_tokens,
                       "input_tokens": reply.input_tokens,
                       "joules": energy.joules, "joules_source": energy.source,
                       "energy_source": energy.energy_source,
                       "latency_seconds": round(reply.latency_seconds, 6),
                       "request_id": reply.request_id, "error": reply.error}
                if cfg.save_outputs:
                    rec["output"] = reply.text
                async with lock:
                    writer.add(rec)
                    writer.header["model"] = header["model"]
                    writer.write("running")

        progress = Progress(TextColumn(f"eval {task.name}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), console=console, disable=cfg.quiet)
        with progress:
            bar = progress.add_task("items", total=len(todo))
            tasks = [asyncio.create_task(one(it, p)) for it, p in todo]
            try:
                for fut in asyncio.as_completed(tasks):
                    try:
                        await fut
                    except EndpointDown as exc:
                        failed = str(exc)
                        break
                    progress.advance(bar)
            finally:
                for t in tasks:
                    t.cancel()
                for t in tasks:
                    with contextlib.suppress(BaseException):
                        await t
        status = "failed" if failed else "complete"
        doc = writer.write(status, failed)
        writer.close()
    s = doc["summary"]
    console.print(f"{task.name}: {s['score_name']} = {_f(s['mean_score'])} "
                  f"(95% CI {_f(s['score_ci95'][0])}..{_f(s['score_ci95'][1])}), "
                  f"{_f(s['mean_joules_per_request'])} J/request ({s['joules_source']}), "
                  f"IPW {_f(s['ipw_per_joule'])} 1/J; {s['n_requests']} requests, "
                  f"{s['n_failed']} failed -> {cfg.out / 'results.json'}")
    if failed:
        raise RunFailed(f"{failed}; {len(writer.items)} of {len(cfg.items) * cfg.passes} "
                        f"requests saved in {cfg.out} (--resume continues)")
    return doc


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"
