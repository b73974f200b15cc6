"""Q_ret's reference run for ``edge-proxy demo``: the adapted model at its own (full) precision,
evaluated once on the demo's held-out items and cached next to the adapted model.

    python -m edge_proxy.demo.reference MODEL_DIR OUT_DIR --model NAME [--device D] [--limit N]
                                        [--max-tokens M]

Starts ``model-server serve MODEL_DIR`` on a free port (no quantization, no proxy: only the score
is needed, not the joules), runs ``edge-eval eval`` of ``builtin:rag:test`` into ``OUT_DIR``, stops
the server. The demo serves the quantized variant through the proxy and evaluates it on the same
items with ``--reference-model NAME``; the proxy pairs the two runs item by item for Q_ret.
Owns this one evaluation; runs the model server and edge-eval as subprocesses (imports neither).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from edge_proxy.demo.processes import free_port, http_ok, stop, tail


def evaluate_reference(model_dir: Path, out: Path, model: str, device: str, limit: int,
                       max_tokens: int, start_timeout: float = 300.0) -> int:
    """Serve ``model_dir`` unquantized, evaluate it into ``out``; the eval's exit code (2 when the
    server did not start)."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = out / "model-server.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "model_server", "serve", str(model_dir),
                                   "--host", "127.0.0.1", "--port", str(port), "--device", device,
                                   "--model-name", model, "--log-level", "warning"],
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + start_timeout
        while not http_ok(f"http://127.0.0.1:{port}/health"):
            if server.poll() is not None or time.monotonic() > deadline:
                last = (tail(log_path).strip().splitlines() or ["no output"])[-1]
                print(f"reference model server did not start: {last}", file=sys.stderr)
                return 2
            time.sleep(0.2)
        return subprocess.run([sys.executable, "-m", "edge_eval", "eval", "--endpoint",
                               f"http://127.0.0.1:{port}", "--model", model, "--task", "rag",
                               "--data", "builtin:rag:test", "--limit", str(limit), "--max-tokens",
                               str(max_tokens), "--out", str(out / "run"), "--quiet"]).returncode
    finally:
        stop(server)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edge_proxy.demo.reference",
                                 description="Evaluate the demo's adapted model unquantized (Q_ret's reference).")
    ap.add_argument("model_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--model", required=True, help="the model name the run is recorded under")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=6)
    args = ap.parse_args(argv)
    return evaluate_reference(Path(args.model_dir), Path(args.out_dir), args.model, args.device,
                              args.limit, args.max_tokens)


if __name__ == "__main__":
    sys.exit(main())
