"""Economics: the five EDGE-EVAL metrics, live.

Owns the pure formulas (:mod:`.formulas`), the per-model window statistics, their Prometheus
export, the quality inputs (feedback, golden-prompt probes, edge-eval results files), the backend
``/info`` poller and the live price-sheet reload. Must not own the request path, energy
measurement or the cold-start gate: it reads their results (request records, the gate's history).
"""
