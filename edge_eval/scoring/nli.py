"""NLI scores with a sequence-classification model (optional, ``--nli-model``): entailment of an
answer by its context (rag) and non-contradiction of a summary by its document (summarization),
the paper's primary quality scores (it used DeBERTa-v3-large trained on MNLI/FEVER/ANLI/...).

Score = 1 when the argmax label is entailment (rag) / is not contradiction (summarization), else 0.
Labels are read from the model's ``config.id2label``.
"""
from __future__ import annotations

from typing import Any

from edge_eval.errors import UsageError, missing_package


class NliScorer:
    def __init__(self, model_id: str, device: str = "cpu", max_length: int = 512) -> None:
        try:
            import torch  # noqa: F401
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
        except ImportError:
            raise missing_package("transformers", "server") from None
        try:
            self.tok = AutoTokenizer.from_pretrained(model_id)
            self.model = AutoModelForSequenceClassification.from_pretrained(model_id).to(device).eval()
        except Exception as exc:                          # noqa: BLE001
            raise UsageError(f"cannot load NLI model {model_id}: {str(exc).splitlines()[0][:200]}") from None
        labels = {int(k): str(v).lower() for k, v in self.model.config.id2label.items()}
        self.entail = next((i for i, v in labels.items() if v.startswith("entail")), None)
        self.contra = next((i for i, v in labels.items() if v.startswith("contra")), None)
        if self.entail is None or self.contra is None:
            raise UsageError(f"NLI model {model_id} has no entailment/contradiction labels "
                             f"(id2label: {labels})")
        self.device, self.max_length = device, max_length

    def label(self, premise: str, hypothesis: str) -> int:
        import torch

        enc: Any = self.tok(premise, hypothesis, truncation=True, max_length=self.max_length,
                            return_tensors="pt").to(self.device)
        with torch.no_grad():
            return int(self.model(**enc).logits[0].argmax())

    def entailment(self, premise: str, hypothesis: str) -> float:
        return float(self.label(premise, hypothesis) == self.entail)

    def non_contradiction(self, premise: str, hypothesis: str) -> float:
        return float(self.label(premise, hypothesis) != self.contra)
