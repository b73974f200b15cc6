"""edge-eval's offline side: evaluation (scores and joules per item through edge-proxy) and
adaptation (LoRA / QLoRA with measured energy). Command: ``edge-eval`` (``python -m edge_eval``).

EDGE-EVAL, ACL 2026 Industry Track: the scores behind IPW and Q_ret, and the adaptation cost
C_train behind N_break, come from here.
"""
