"""The paper's numbers that ``edge-proxy demo --paper-constants`` (and ``--quick``) uses as configured
inputs instead of measuring them. Constants only: no code."""

# The paper's numbers used as configured inputs (EDGE-EVAL, ACL 2026 Industry Track; the authors'
# published results in Abdullah4152/EDGE-EVAL: results/final_36_variants_report_llama.csv for the
# scores, results/training_energy_log_llama.csv for the fine-tuning energy).
PAPER_SCORE_INT4 = 0.752            # Llama-3.2-1B LoRA rag INT4, NLI entailment rate
PAPER_SCORE_FP16 = 0.742            # the same adapter merged in FP16
PAPER_ADAPTATION_JOULES = 92_122.0  # Llama-3.2-1B LoRA rag fine-tuning energy
