"""The whole-step estimate and the markdown table of ``benchmarks/int4_kernels.py``'s results.

Owns: :func:`stack` (per M and method: 16 layers x the layer's linears + the LM head, us per decode step, and the
speed-up against bf16), :func:`redispatch` (the same sum as today's dispatch would run it) and the markdown. Measuring is int4_kernels.py's; config grids are int4_sweep.py's.
"""
from __future__ import annotations

from typing import Callable

from int4_sweep import best_of, cfg_str

FIXED = ("bf16", "tinygemm", "triton", "gemv", "dequant", "triton-dequant")
SWEPT = ("triton-best", "gemv-best", "best")


def per_shape(res: dict) -> dict[tuple[int, int, int], dict[str, dict]]:
    """(n, k, m) -> method -> {"graph_us", "eager_us", "config"?}: the fixed methods' cells, the sweeps' best
    config per kernel, and ``best``: the fastest correct of every INT4 method and swept config at that shape."""
    t: dict[tuple[int, int, int], dict[str, dict]] = {}
    for c in res["cells"]:
        if c.get("graph_us") is not None:
            t.setdefault((c["n"], c["k"], c["m"]), {})[c["method"]] = c
    for key, rows in res.get("sweeps", {}).items():
        nk, m = key.split("/M")
        n, k = map(int, nk.split("x"))
        cell = t.setdefault((n, k, int(m)), {})
        for method in ("triton", "gemv"):
            b = best_of(rows, method)
            if b:
                cell[f"{method}-best"] = {"graph_us": b["graph_us"], "eager_us": None, "config": b["config"]}
    for (n, k, m), cell in t.items():
        errs = res["rel_errors"].get(f"{n}x{k}/M{m}", {})
        cands = [(v["graph_us"], name) for name, v in cell.items() if name not in ("bf16", "dequant")
                 and (name.endswith("-best") or isinstance(errs.get(name), float) and errs[name] < 1e-2)]
        if cands:
            us, name = min(cands)
            cell["best"] = {"graph_us": us, "eager_us": None, "winner": name, "config": cell[name].get("config")}
    return t


def stack(res: dict, layer: dict, n_layers: int, dispatch: Callable[[int, int], str]) -> dict:
    """Per M and method: ``n_layers`` x sum(layer's linears) + lm_head (us), and bf16 / method. ``dispatch(m, n)``
    names the fixed method Int4Linear runs at m rows on a layer of n outputs (the "dispatch" column)."""
    t = per_shape(res)
    head = res["shapes"].get("lm_head")
    out = {}
    for m in res["ms"]:
        row: dict = {}
        for method in FIXED + ("dispatch",) + SWEPT:
            def src(n: int) -> str:
                return dispatch(m, n) if method == "dispatch" else method
            for mode in ("graph_us", "eager_us"):
                vals = [t.get((n, k, m), {}).get(src(n), {}).get(mode) for n, k in layer.values()]
                tail = [t.get((head[0], head[1], m), {}).get(src(head[0]), {}).get(mode)] if head else []
                if all(v is not None for v in vals + tail):
                    row[f"{method}/{mode}"] = n_layers * sum(vals) + sum(tail)
        for key in list(row):
            base = row.get("bf16/" + key.split("/")[1])
            row[key.replace("_us", "_speedup")] = base / row[key] if base else None
        out[str(m)] = row
    return out


def redispatch(res: dict, layer: dict, n_layers: int, dispatch: Callable[[int, int], str],
               config_for: Callable[[int, int, int], dict]) -> dict[str, dict[str, float | None]]:
    """Per M: the step's linears (us, graph) as today's code would run them, from a recorded result's own timings:
    ``dispatch(m, n)`` picks the method per layer and a ``"triton"`` layer takes the swept row whose config is
    ``config_for(m, n, k)`` (the recorded default-config cell when the sweep has none); next to bf16 and the
    recorded ``dispatch`` column. No GPU: arithmetic on measured kernel times, not a run of today's code."""
    t = per_shape(res)
    shapes = [(n, k, n_layers) for n, k in layer.values()]
    if res["shapes"].get("lm_head"):
        shapes.append((*res["shapes"]["lm_head"], 1))
    out: dict[str, dict[str, float | None]] = {}
    for m in res["ms"]:
        total: float | None = 0.0
        for n, k, times in shapes:
            method = dispatch(m, n)
            want = config_for(m, n, k) if method == "triton" else None
            rows = [r for r in res.get("sweeps", {}).get(f"{n}x{k}/M{m}", [])
                    if r["method"] == method and r["config"] == want]
            us = rows[0]["graph_us"] if rows else t.get((n, k, m), {}).get(method, {}).get("graph_us")
            total = None if total is None or us is None else total + times * us
        rec = res["stack"].get(str(m), {})
        out[str(m)] = {"bf16": rec.get("bf16/graph_us"), "recorded": rec.get("dispatch/graph_us"), "today": total}
    return out


def redispatch_markdown(name: str, res: dict, rows: dict[str, dict[str, float | None]]) -> str:
    """:func:`redispatch`'s rows as a table."""
    f = lambda v: "-" if v is None else f"{v:.1f}"                                      # noqa: E731
    lines = [f"# {name} ({res.get('device')}): INT4 linears per step, us (graph), recorded vs today's dispatch", "",
             "| M | bf16 | recorded dispatch | today's dispatch | bf16 / today |", "|---:|---:|---:|---:|---:|"]
    for m, r in rows.items():
        ratio = f"{r['bf16'] / r['today']:.3f}x" if r["bf16"] and r["today"] else "-"
        lines.append(f"| {m} | {f(r['bf16'])} | {f(r['recorded'])} | {f(r['today'])} | {ratio} |")
    return "\n".join(lines)


def tuned_lines(res: dict) -> list[str]:
    """The sweep's fastest correct small-rows config per (M, shape) as ``int4_gemv.TUNED`` entries, and the GEMM's."""
    out = []
    gemv = ("    ({m}, {n}, {k}): GemvConfig({block_n}, {nb}, {block_m}, {split}, {num_stages}, {num_warps}, {dot}, "
            "{prefetch}),")
    gemm = ("    # GEMM ({m}, {n}, {k}): Config({block_m}, {block_n}, {split_k}, {num_stages}, {num_warps}, {swap_ab}, "
            "{fold})")
    for key, rows in res.get("sweeps", {}).items():
        nk, m = key.split("/M")
        n, k = map(int, nk.split("x"))
        for method, fmt in (("gemv", gemv), ("triton", gemm)):
            b = best_of(rows, method)
            if b:
                out.append(fmt.format(m=m, n=n, k=k, **b["config"]) + f"  # {b['graph_us']:.1f} us")
    if not out:
        return []
    return ["", "Configs to encode (int4_gemv.TUNED, keyed by rows bucket, N, K; the GEMM's best as comments):", "",
            "```python", *out, "```"]


def markdown(res: dict, layer: dict, n_layers: int) -> str:
    f = lambda v: "-" if v is None else f"{v:.1f}"                                      # noqa: E731
    lines = [f"# INT4 kernels, {res['device']} (torch {res['torch']}, triton {res['triton']}, group {res['group']})",
             "", "Per linear, us per call: CUDA graph (eager in brackets). triton: the GEMM (int4_triton.py, default "
             "config); gemv: the small-rows kernel (int4_gemv.py, default config); -best: the sweep's fastest config "
             "with a relative error < 1e-2. GEMM configs BLOCK_M/BLOCK_N/split/stages/warps/order+mode; gemv configs "
             "cc|tc (CUDA/tensor cores) BLOCK_N/K-blocks per iteration/BLOCK_M/split/stages/warps.", "",
             "| shape N x K | M | bf16 | tinygemm | triton | gemv | triton best | gemv best | best |",
             "|---|---:|---:|---:|---:|---:|---|---|---|"]
    t = per_shape(res)
    for (n, k, m), cell in sorted(t.items(), key=lambda kv: (kv[0][2], -kv[0][0] * kv[0][1])):
        cols = []
        for method in ("bf16", "tinygemm", "triton", "gemv"):
            c = cell.get(method)
            cols.append(f"{f(c['graph_us'])} ({f(c.get('eager_us'))})" if c else "-")
        for method in ("triton-best", "gemv-best"):
            c = cell.get(method)
            cols.append(f"{f(c['graph_us'])} ({cfg_str(c['config'])})" if c else "-")
        b = cell.get("best")
        cols.append(f"{f(b['graph_us'])} {b['winner']}" if b else "-")
        lines.append(f"| {n} x {k} | {m} | " + " | ".join(cols) + " |")
    methods = FIXED + ("dispatch",) + SWEPT
    lines += ["", f"Whole step ({n_layers} layers x {len(layer)} linears + lm_head), us (speed-up vs bf16), graph; "
              "eager in brackets. dispatch: what Int4Linear runs by default (MODEL_SERVER_INT4_KERNELS=auto). best: "
              "per shape the fastest correct INT4 method or swept config.", "",
              "| M | " + " | ".join(methods) + " |", "|---:|" + "---:|" * len(methods)]
    for m, row in res["stack"].items():
        cols = []
        for method in methods:
            g, e = row.get(f"{method}/graph_us"), row.get(f"{method}/eager_us")
            cols.append(f"{g:.0f} ({row[f'{method}/graph_speedup']:.2f}x)" + (f" [{e:.0f}]" if e else "")
                        if g else "-")
        lines.append(f"| {m} | " + " | ".join(cols) + " |")
    lines += tuned_lines(res)
    bad = [f"{key} {mm}={e}" for key, errs in res["rel_errors"].items() for mm, e in errs.items()
           if not (isinstance(e, float) and e < 1e-2)]
    bad += [f"{key} {r['method']} {cfg_str(r['config'])}: {r.get('rel_err', r.get('error'))}"
            for key, rows in res.get("sweeps", {}).items() for r in rows
            if not (isinstance(r.get("rel_err"), float) and r["rel_err"] < 1e-2)]
    lines += ["", f"Errors (relative, against float32 x @ dequant(q).T) above 1e-2 or failures: {len(bad)}"]
    lines += [f"- {b}" for b in bad[:40]]
    return "\n".join(lines) + "\n"
