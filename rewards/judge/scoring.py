"""Scores from the log-probabilities of the judge's first answer token.

With ``structured_outputs: {"choice": ["yes", "no"]}`` vLLM masks every first token that cannot
start an allowed answer *before* it computes logprobs, so ``top_logprobs`` holds the allowed first
tokens ("yes", "y", "no", "n", ...) renormalised over the allowed set (masked ones come back at
-9999). The probability that the judge answers "yes" is the mass of the first tokens that can only
continue to "yes". Tokenisers differ (" yes", "Yes", "▁yes", "y"), so a token counts for a label
when its text, stripped of whitespace and word-start markers and lower-cased, equals the label or
is a prefix of that label and of no other. Without the constraint (another server, or the
in-process backend) the same rule over the unconstrained top tokens gives the same ratio.

Nothing here raises on a bad response: every failure is a ``None`` score with a reason, so one odd
answer never crashes a training step nor turns silently into a 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

_WORD_START_MARKERS = "Ġ▁"  # byte-level BPE and sentencepiece word-start markers


@dataclass
class ScoredAnswer:
    """The score of one answer (``None`` when it could not be scored, with ``reason``)."""

    score: float | None
    reason: str | None = None
    label_probs: dict[str, float] = field(default_factory=dict)


def normalise_token(text: str) -> str:
    """Token text as compared with labels: no surrounding whitespace or word-start markers, lower-case."""
    return text.strip().strip(_WORD_START_MARKERS).strip().lower()


def match_label(token: str, labels: Sequence[str]) -> str | None:
    """The label a first token commits the answer to, or ``None`` if it commits to none (or to several)."""
    text = normalise_token(token)
    if not text:
        return None
    normalised = [normalise_token(label) for label in labels]
    if text in normalised:
        return labels[normalised.index(text)]
    prefixed = [label for label, norm in zip(labels, normalised) if norm.startswith(text)]
    return prefixed[0] if len(prefixed) == 1 else None


def _as_logprob(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return None if math.isnan(value) or value > 1e-4 else value


def first_token_candidates(response: Any) -> tuple[list[tuple[str, float]] | None, str | None]:
    """``(token, logprob)`` pairs of the first generated token of an OpenAI chat completion response.

    The sampled token is added when it is not among ``top_logprobs``. Returns ``(None, reason)``
    when the response has no usable logprobs.
    """
    try:
        choice = response["choices"][0]
    except (KeyError, IndexError, TypeError):
        return None, "response has no choices"
    logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list) or not content:
        return None, "response has no logprobs (does the server support logprobs=true?)"
    first = content[0]
    if not isinstance(first, dict):
        return None, f"logprobs entry is {type(first).__name__}, not an object"
    top = first.get("top_logprobs")
    if not isinstance(top, list) or not top:
        return None, "response has no top_logprobs (is the server's --max-logprobs >= top_logprobs?)"
    candidates: list[tuple[str, float]] = []
    for entry in [*top, first]:
        if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
            return None, f"malformed top_logprobs entry {str(entry)[:80]!r}"
        logprob = _as_logprob(entry.get("logprob"))
        if logprob is None:
            return None, f"invalid logprob {str(entry.get('logprob'))[:40]!r} for token {entry['token']!r}"
        if entry is first and any(token == entry["token"] for token, _ in candidates):
            continue
        candidates.append((entry["token"], logprob))
    return candidates, None


def label_probabilities(candidates: Sequence[tuple[str, float]], labels: Sequence[str]) -> dict[str, float]:
    """Probability mass of first tokens committed to each label (labels with no token are absent)."""
    probs: dict[str, float] = {}
    for token, logprob in candidates:
        label = match_label(token, labels)
        if label is not None:
            probs[label] = probs.get(label, 0.0) + math.exp(logprob)
    return probs


def score_choice(candidates: Sequence[tuple[str, float]], positive: str, negative: str) -> ScoredAnswer:
    """``P(positive) / (P(positive) + P(negative))``; a label missing from the candidates counts as 0."""
    probs = label_probabilities(candidates, [positive, negative])
    total = probs.get(positive, 0.0) + probs.get(negative, 0.0)
    if total <= 0.0:
        seen = [token for token, _ in candidates[:8]]
        return ScoredAnswer(None, f"neither {positive!r} nor {negative!r} among first tokens {seen!r}", probs)
    return ScoredAnswer(probs.get(positive, 0.0) / total, None, probs)


def score_rating(candidates: Sequence[tuple[str, float]], ratings: Sequence[str]) -> ScoredAnswer:
    """Expected rating over the rating tokens' renormalised probabilities, mapped to [0, 1].

    ``ratings`` are ordered worst to best (e.g. "1".."5"); the first maps to 0 and the last to 1.
    """
    probs = label_probabilities(candidates, ratings)
    total = sum(probs.values())
    if total <= 0.0:
        seen = [token for token, _ in candidates[:8]]
        return ScoredAnswer(None, f"no rating {list(ratings)!r} among first tokens {seen!r}", probs)
    expected = sum(ratings.index(label) * p for label, p in probs.items()) / total
    return ScoredAnswer(expected / (len(ratings) - 1), None, probs)
