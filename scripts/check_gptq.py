"""End-to-end check of the model server's GPTQ path (run by scripts/check_gptq.sh inside a throw-away venv
that has gptqmodel + optimum; not part of the test suite: it quantizes a model and starts three servers).

Steps: synthesize the tiny model; quantize it to GPTQ 4-bit (group 32) with gptqmodel; load the GPTQ
checkpoint with plain ``AutoModelForCausalLM.from_pretrained(...).generate`` (greedy, the reference);
serve the fp32 original (baseline /info), then the GPTQ checkpoint with ``--quantization gptq`` and with
the default ``--quantization none`` (the loader must detect GPTQ from config.json); through each GPTQ
server send a streamed OpenAI completion (openai client, usage chunk) and a TGI ``/generate`` and compare
the greedy tokens with the reference; check ``/info`` (quantization gptq, weight_bytes < 1/2 of fp32);
check that ``--quantization gptq`` on an unquantized checkpoint fails in one line; check that the fast engine's GPTQ
repack (model_server.int4_repack) holds the weights gptqmodel computes with, on gptqmodel's checkpoint and on
tests/int4_checkpoints.py's (act order, asymmetric, formats gptq and gptq_v2; and an AWQ one against gptqmodel's AWQ
dequantization), and serve gptqmodel's checkpoint with ``--engine fast``.
Exit status 1 on any
failed check. Results: a table on stdout and ``summary.json`` under ``--work``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from support import free_port, stop_process  # noqa: E402  (benchmarks/support.py)

import check_repack  # noqa: E402  (scripts/check_repack.py, next to this file)

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # before gptqmodel is imported (2-core machines)

PROMPTS = ["Hello world", "The capital of France is"]
CALIBRATION = [
    f"Sample {i}: the quick brown fox jumps over the lazy dog, counts to {i * 7} and rests near tree {i % 5}."
    for i in range(48)
]


class Checks:
    def __init__(self) -> None:
        self.rows: list[tuple[str, bool, str]] = []

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.rows.append((name, bool(ok), detail))
        print(f"[{'PASS' if ok else 'FAIL'}] {name}" + (f": {detail}" if detail else ""), flush=True)
        return bool(ok)

    @property
    def failed(self) -> int:
        return sum(1 for _, ok, _ in self.rows if not ok)


def get_json(url: str, timeout: float = 10.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None


def post_json(url: str, body: dict[str, Any], timeout: float = 60.0) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


class Server:
    """``model-server serve`` as a subprocess on a free port; stopped with SIGTERM."""

    def __init__(self, model_dir: Path, log_path: Path, extra: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "wb")
        cmd = ["model-server", "serve", str(model_dir), "--device", "cpu", "--port", str(self.port), *extra]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                status, _ = get_json(self.url + "/health", timeout=2)
                if status == 200:
                    return get_json(self.url + "/info")[1]
            except OSError:
                pass
            time.sleep(0.3)
        return None

    def stop(self) -> int | None:
        rc = stop_process(self.proc, timeout=30)
        self.log.close()
        return rc

    def log_tail(self, n: int = 5) -> str:
        lines = self.log_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(lines[-n:])


def quantize(src: Path, dst: Path, log_path: Path) -> float:
    """GPTQ 4-bit, group 32, with gptqmodel; its progress bars go to ``log_path`` (file descriptors 1, 2)."""
    from gptqmodel import GPTQModel, QuantizeConfig

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "wb") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            t0 = time.monotonic()
            model = GPTQModel.load(str(src), QuantizeConfig(bits=4, group_size=32, desc_act=False))
            model.quantize(CALIBRATION, batch_size=4)
            model.save(str(dst))
            elapsed = time.monotonic() - t0
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
    return elapsed


def reference(model_dir: Path, dtype: Any, new_tokens: int) -> dict[str, Any]:
    """Greedy tokens from plain transformers (prompt tokenized with special tokens, as both APIs do)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    t0 = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(model_dir, device_map="cpu", dtype=dtype).eval()
    load_s = time.monotonic() - t0
    out: dict[str, Any] = {"load_seconds": load_s, "tokens": {}, "text": {},
                           "linear_class": type(model.model.layers[0].self_attn.q_proj).__name__}
    for prompt in PROMPTS:
        enc = tok(prompt, add_special_tokens=True, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        ids = gen[0, enc["input_ids"].shape[1]:].tolist()
        out["tokens"][prompt] = ids
        out["text"][prompt] = tok.decode(ids)
    return out


def check_server(c: Checks, label: str, srv: Server, ref: dict[str, Any], fp32_bytes: int,
                 new_tokens: int) -> dict[str, Any]:
    from openai import OpenAI

    info = srv.wait_ready(180)
    if not c.check(f"{label}: server ready", info is not None, "" if info else srv.log_tail()):
        return {}
    c.check(f"{label}: /info quantization", info["quantization"] == "gptq", repr(info["quantization"]))
    wb = int(info["weight_bytes"] or 0)
    c.check(f"{label}: /info weight_bytes < fp32/2", 0 < wb < fp32_bytes / 2,
            f"{wb} B vs fp32 {fp32_bytes} B ({wb / fp32_bytes:.1%})")
    client = OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
    for prompt in PROMPTS:
        pieces, usage, finish = [], None, None
        stream = client.completions.create(model=info["model_id"], prompt=prompt, max_tokens=new_tokens,
                                           temperature=0, stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].text)
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                usage = chunk.usage
        text = "".join(pieces)
        c.check(f"{label}: OpenAI stream {prompt!r} == reference", text == ref["text"][prompt],
                f"{text!r} vs {ref['text'][prompt]!r}")
        c.check(f"{label}: OpenAI stream usage chunk", usage is not None and usage.completion_tokens == new_tokens
                and finish == "length", f"usage={usage and usage.model_dump()}, finish={finish}")
        tgi = post_json(srv.url + "/generate", {"inputs": prompt, "parameters": {
            "max_new_tokens": new_tokens, "details": True, "decoder_input_details": True}})
        ids = [t["id"] for t in tgi["details"]["tokens"]]
        c.check(f"{label}: TGI /generate {prompt!r} tokens == reference", ids == ref["tokens"][prompt],
                f"{ids} vs {ref['tokens'][prompt]}")
    st = info.get("startup") or {}
    load_s = (st["load_end"] - st["load_start"]) if st.get("load_end") and st.get("load_start") else None
    ready_s = (st["ready"] - st["process_start"]) if st.get("ready") and st.get("process_start") else None
    rc = srv.stop()
    c.check(f"{label}: clean exit on SIGTERM", rc == 0, f"rc={rc}")
    return {"weight_bytes": wb, "dtype": info.get("dtype"), "load_seconds": load_s, "ready_seconds": ready_s}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/edge-eval-gptq-check", help="working directory (models, logs)")
    ap.add_argument("--new-tokens", type=int, default=8)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src, gptq_dir = work / "tiny", work / "tiny-gptq"
    c = Checks()
    summary: dict[str, Any] = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}

    import gptqmodel
    import optimum.version
    import torch
    import transformers

    summary["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                           "gptqmodel": gptqmodel.__version__, "optimum": optimum.version.__version__}
    print("versions:", summary["versions"], flush=True)

    if not (src / "config.json").is_file():
        subprocess.run(["model-server", "synth", str(src), "--preset", "tiny", "--seed", "0"], check=True,
                       stdout=subprocess.DEVNULL)
    if (gptq_dir / "config.json").is_file():
        subprocess.run(["rm", "-rf", str(gptq_dir)], check=True)
    kcache = Path.home() / ".cache" / "gptqmodel" / "torch_extensions"
    # the first quantization on a machine also JIT-builds gptqmodel's CPU pack kernel into this cache
    summary["pack_kernel_cached_before"] = kcache.is_dir() and any(kcache.iterdir())
    print("quantizing (log: quantize.log) ...", flush=True)
    try:
        summary["quantize_seconds"] = quantize(src, gptq_dir, work / "quantize.log")
    except Exception as exc:
        c.check("quantize with gptqmodel", False, f"{type(exc).__name__}: {exc}")
        return report(c, summary, work)
    qc = json.loads((gptq_dir / "config.json").read_text()).get("quantization_config") or {}
    c.check("quantize: config.json quant_method gptq, 4 bit, group 32",
            (qc.get("quant_method"), qc.get("bits"), qc.get("group_size")) == ("gptq", 4, 32), str(
                {k: qc.get(k) for k in ("quant_method", "bits", "group_size", "format")}))
    summary["checkpoint_bytes"] = {"fp32": (src / "model.safetensors").stat().st_size,
                                   "gptq": (gptq_dir / "model.safetensors").stat().st_size}

    # references: --quantization gptq loads float32 on CPU, none loads the checkpoint's dtype ("auto")
    ref_fp32 = reference(gptq_dir, torch.float32, args.new_tokens)
    ref_auto = reference(gptq_dir, "auto", args.new_tokens)
    ref_orig = reference(src, torch.float32, args.new_tokens)
    c.check("reference: GPTQ layers loaded by plain transformers", "Linear" in ref_fp32["linear_class"]
            and ref_fp32["linear_class"] != "Linear", ref_fp32["linear_class"])
    summary["reference"] = {"gptq_fp32": ref_fp32, "gptq_auto": ref_auto, "original_fp32": ref_orig}

    base = Server(src, work / "serve-fp32.log", [])
    base_info = base.wait_ready(180)
    base.stop()
    if not c.check("fp32 baseline server ready", base_info is not None, "" if base_info else base.log_tail()):
        return report(c, summary, work)
    fp32_bytes = int(base_info["weight_bytes"])
    st = base_info["startup"]
    summary["fp32"] = {"weight_bytes": fp32_bytes, "load_seconds": st["load_end"] - st["load_start"]}

    summary["serve_gptq"] = check_server(c, "--quantization gptq", Server(
        gptq_dir, work / "serve-gptq.log", ["--quantization", "gptq"]), ref_fp32, fp32_bytes, args.new_tokens)
    summary["serve_none"] = check_server(c, "--quantization none (detected)", Server(
        gptq_dir, work / "serve-none.log", []), ref_auto, fp32_bytes, args.new_tokens)

    # the fast engine's own INT4 kernels on GPTQ and AWQ checkpoints (model_server.int4_repack)
    summary["repack"] = check_repack.run(c, src, gptq_dir, work)
    fast = Server(gptq_dir, work / "serve-fast.log", ["--engine", "fast"])
    info = fast.wait_ready(180)
    if c.check("--engine fast: server ready", info is not None, "" if info else fast.log_tail()):
        c.check("--engine fast: GPTQ repacked into INT4 linears, no gptqmodel kernels",
                (info["quantization"], info["load_path"], bool(info["int4_kernel"])) == ("gptq", "native", True),
                f"quantization {info['quantization']}, load_path {info['load_path']}, int4_kernel {info['int4_kernel']}")
        got = {p: [t["id"] for t in post_json(fast.url + "/generate", {"inputs": p, "parameters": {
            "max_new_tokens": args.new_tokens, "details": True}})["details"]["tokens"]] for p in PROMPTS}
        same = sum(a == b for p in PROMPTS for a, b in zip(got[p], ref_fp32["tokens"][p]))
        summary["serve_fast"] = {"tokens": got, "same_as_reference": same,
                                 "of": sum(len(ref_fp32["tokens"][p]) for p in PROMPTS)}
        print(f"--engine fast (bf16 compute) greedy tokens vs gptqmodel fp32: {same}/{summary['serve_fast']['of']} "
              "equal by position (information only: a random tiny model's near-ties flip)", flush=True)
    fast.stop()

    bad = subprocess.run(["model-server", "serve", str(src), "--device", "cpu", "--port", str(free_port()),
                          "--quantization", "gptq"], capture_output=True, text=True, timeout=120)
    err = (bad.stderr or "").strip()
    c.check("--quantization gptq on an unquantized checkpoint: one-line error, non-zero exit",
            bad.returncode != 0 and "Traceback" not in err and "GPTQ" in err, f"rc={bad.returncode}: "
            f"{err.splitlines()[-1] if err else ''}")
    return report(c, summary, work)


def report(c: Checks, summary: dict[str, Any], work: Path) -> int:
    summary["checks"] = [{"name": n, "ok": ok, "detail": d} for n, ok, d in c.rows]
    summary["failed"] = c.failed
    (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print("\n== GPTQ check summary ==")
    print(f"versions: {summary.get('versions')}")
    if "quantize_seconds" in summary:
        cached = "cached" if summary.get("pack_kernel_cached_before") else "JIT-built in this run"
        print(f"quantize (tiny, 4 bit, group 32, {len(CALIBRATION)} texts): {summary['quantize_seconds']:.1f} s "
              f"(gptqmodel CPU pack kernel {cached})")
    cb = summary.get("checkpoint_bytes")
    if cb:
        print(f"checkpoint model.safetensors: fp32 {cb['fp32']} B, gptq {cb['gptq']} B")
    fp32 = summary.get("fp32")
    if fp32:
        print(f"{'server':34} {'weight_bytes':>12} {'vs fp32':>8} {'load s':>7} {'ready s':>8}")
        print(f"{'fp32 original':34} {fp32['weight_bytes']:>12} {'100%':>8} {fp32['load_seconds']:>7.2f} {'':>8}")
        for key, label in (("serve_gptq", "gptq ckpt, --quantization gptq"),
                           ("serve_none", "gptq ckpt, --quantization none")):
            r = summary.get(key) or {}
            if r.get("weight_bytes"):
                print(f"{label:34} {r['weight_bytes']:>12} {r['weight_bytes'] / fp32['weight_bytes']:>8.1%} "
                      f"{r['load_seconds'] or float('nan'):>7.2f} {r['ready_seconds'] or float('nan'):>8.2f}")
    ref = summary.get("reference")
    if ref:
        same = sum(a == b for p in PROMPTS for a, b in zip(ref["gptq_fp32"]["tokens"][p], ref["original_fp32"]["tokens"][p]))
        total = sum(len(ref["original_fp32"]["tokens"][p]) for p in PROMPTS)
        print(f"greedy tokens GPTQ vs unquantized original (information only): {same}/{total} equal by position")
    print(f"checks: {len(c.rows) - c.failed} passed, {c.failed} failed -> {'OK' if not c.failed else 'FAILED'}")
    print(f"details: {work / 'summary.json'}")
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
