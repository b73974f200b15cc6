"""``edge-proxy record``: write an energy trace (JSON lines) for the ``replay`` source.

Reads the counters with the same sampler code the proxy runs (one background thread, 100 ms by
default) and writes one line per reading: ``{"t": seconds, "energy_millijoules": {uuid: mJ},
"power_watts": {uuid: W}, "at_rest": bool}`` (``at_rest`` when the source tells: NVML utilization 0
on every GPU; failed reads as ``{"t": .., "error": ".."}``), after a header line.
See :mod:`edge_proxy.energy.replay_source` for the format.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RECORD_SOURCES = ("nvml", "remote", "estimated")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "record", help="record a GPU energy-counter trace for --energy-source replay",
        description="Poll the GPU energy counters (NVML, or a model server's /energy) for a while and "
                    "write a JSON-lines trace that `edge-proxy serve --energy-source replay --energy-replay FILE` "
                    "replays (tests and CI use such traces instead of a GPU).")
    p.add_argument("out", metavar="OUT", help="trace file to write ('-' = stdout)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds to record (default 60)")
    p.add_argument("--period", type=float, default=0.1, help="seconds between reads (default 0.1)")
    p.add_argument("--source", choices=RECORD_SOURCES, default="nvml",
                   help="where to read (default nvml; 'remote' polls --url; 'estimated' is a CPU model, for tests)")
    p.add_argument("--gpu-uuids", default="", help="comma-separated GPU UUIDs (default: all)")
    p.add_argument("--url", default=None, help="model server base URL for --source remote")
    p.add_argument("--estimated-watts", type=float, default=65.0, help="W per busy CPU core for --source estimated")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _reader(args: argparse.Namespace) -> Any:
    from edge_proxy.cli import CliError
    from edge_proxy.energy.readings import ReaderError

    uuids = [u.strip() for u in args.gpu_uuids.split(",") if u.strip()]
    try:
        if args.source == "nvml":
            from edge_proxy.energy.nvml_source import NvmlReader
            return NvmlReader(uuids or None)
        if args.source == "remote":
            if not args.url:
                raise CliError("--source remote needs --url http://HOST:PORT (a model server)")
            from edge_proxy.energy.remote_source import RemoteReader
            return RemoteReader(args.url, uuids or None)
        from edge_proxy.energy.estimated_source import EstimatedReader
        return EstimatedReader(args.estimated_watts)
    except ReaderError as exc:
        raise CliError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from edge_proxy.cli import CliError
    from edge_proxy.energy.readings import Reading
    from edge_proxy.energy.sampler import Sampler

    if not args.duration > 0 or not args.period > 0:
        raise CliError("--duration and --period must be > 0")
    reader = _reader(args)
    out_path = None if args.out == "-" else Path(args.out)
    try:
        fh = sys.stdout if out_path is None else out_path.open("w")
    except OSError as exc:
        reader.close()
        raise CliError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    header = {"kind": "header", "source": reader.source,
              "gpus": [{"uuid": u, "name": getattr(reader, "gpu_names", {}).get(u)} for u in reader.gpu_uuids],
              "period_seconds": args.period, "recorded_at": datetime.now(timezone.utc).isoformat(),
              "host": platform.node(), "format": "edge-proxy energy trace v1"}
    fh.write(json.dumps(header) + "\n")
    written = 0
    origin_ns: list[int] = []

    sampler = Sampler(reader, args.period, ring_size=16)
    orig_ingest = sampler.ingest

    def ingest(r: Reading) -> Any:        # write every reading as it arrives, then ingest
        nonlocal written
        if not origin_ns:
            origin_ns.append(r.t_ns)
        rec: dict[str, Any] = {"t": round((r.t_ns - origin_ns[0]) / 1e9, 6)}
        if r.error is not None:
            rec["error"] = r.error
        else:
            rec["energy_millijoules"] = r.energy_mj
            if r.power_w:
                rec["power_watts"] = {u: round(p, 3) for u, p in r.power_w.items()}
            if r.at_rest is not None:
                rec["at_rest"] = r.at_rest
        fh.write(json.dumps(rec) + "\n")
        written += 1
        return orig_ingest(r)

    sampler.ingest = ingest  # type: ignore[method-assign]
    progress = None
    if not args.quiet and out_path is not None:
        from rich.progress import Progress
        progress = Progress(transient=True)
        progress.start()
        task = progress.add_task(f"recording {reader.source} energy", total=args.duration)
    t_start = time.monotonic()
    try:
        sampler.start()
        while (elapsed := time.monotonic() - t_start) < args.duration:
            if progress is not None:
                progress.update(task, completed=elapsed)
            time.sleep(min(0.2, args.duration - elapsed))
    except KeyboardInterrupt:
        pass
    finally:
        sampler.stop()
        if progress is not None:
            progress.stop()
        fh.flush()
        if out_path is not None:
            fh.close()
    total = sum(sampler.snapshot()["energy_joules_by_gpu"].values())  # type: ignore[union-attr]
    print(f"edge-proxy record: {written} readings, {total:.1f} J over {time.monotonic() - t_start:.1f} s "
          f"({sampler.errors_total} failed reads, {sampler.resets_total} counter resets) -> {args.out}",
          file=sys.stderr)
    if written and sampler.errors_total >= written:       # a trace of gaps only replays nothing: say so, exit 1
        print(f"edge-proxy record: error: every read failed ({written} of {written}); the trace holds no reading",
              file=sys.stderr)
        return 1
    return 0
