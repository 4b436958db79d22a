"""Exact match and token-level F1 of generated answers, normalised as SQuAD v1.1 does.

The normalisation is the official SQuAD v1.1 evaluation script's ``normalize_answer``:
lowercase, remove punctuation (``string.punctuation``), remove the articles a / an / the,
collapse whitespace. With several accepted references an example scores its best match
(``metric_max_over_ground_truths``). Scores are fractions in [0, 1] (the script's x100 is
left to the reader).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, strip punctuation and articles, collapse whitespace (SQuAD v1.1)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the bags of normalised tokens (0.0 when they share none).

    As in the official script, two answers that both normalise to nothing score 0 here;
    :func:`generation_scores` gives them exact match 1 and F1 1 (SQuAD v2's convention),
    so an empty reference is matched by an empty generation.
    """
    pred_tokens = normalize_answer(prediction).split()
    ref_tokens = normalize_answer(reference).split()
    common = Counter(pred_tokens) & Counter(ref_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def best_over_references(prediction: str, references: Sequence[str]) -> tuple[float, float]:
    """(exact match, F1) of ``prediction`` against its best-matching reference."""
    if not references:
        raise ValueError("an example needs at least one reference answer")
    em = max(exact_match(prediction, ref) for ref in references)
    f1 = max(
        1.0
        if not normalize_answer(prediction) and not normalize_answer(ref)
        else token_f1(prediction, ref)
        for ref in references
    )
    return em, f1


def generation_scores(
    predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, float]:
    """Mean exact match and F1 over examples (``references[i]``: example i's answers)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("cannot compute a metric on zero examples")
    pairs = [best_over_references(p, refs) for p, refs in zip(predictions, references)]
    return {
        "exact_match": sum(em for em, _ in pairs) / len(pairs),
        "f1": sum(f1 for _, f1 in pairs) / len(pairs),
    }
