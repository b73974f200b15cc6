"""Token F1 and exact match (SQuAD's definitions): lower case, punctuation and the articles
a/an/the removed, whitespace collapsed; F1 over the bag of tokens, the best over gold answers."""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    """F1 = 2PR/(P+R) over normalised tokens (P: common/predicted, R: common/gold); 1 when both
    are empty, 0 when one is."""
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def best_over(metric, prediction: str, golds: Sequence[str]) -> float:
    return max(metric(prediction, g) for g in golds)
