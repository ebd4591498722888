"""Support categories of problems between a base and a trained model, and the metrics built on them
("The Invisible Leash: Why RLVR May (Not) Escape Its Origin", Wu et al., arXiv 2507.14843).

A problem is in a model's empirical support when at least one of its k samples is correct. The paper's
ε = -ln ζ / k is the resolution of that rule, not another rule: when none of k samples is correct, the model's
success probability on the problem is below ε with confidence 1 - ζ (k = 8192, ζ = 0.05: ε ≈ 3.66e-4).
"""
from __future__ import annotations

import math
from typing import Sequence

CATEGORIES = ("P", "S", "E", "O")  # preservation, shrinkage, expansion, out of support
CATEGORY_NAMES = {"P": "Preservation", "S": "Shrinkage", "E": "Expansion", "O": "Out of support"}


def support_categories(
    base_correct: Sequence[int | bool], trained_correct: Sequence[int | bool]
) -> tuple[list[str], dict[str, int]]:
    """Per problem "P"/"S"/"E"/"O" from each model's correct-sample count (or a boolean), plus the counts."""
    if len(base_correct) != len(trained_correct):
        raise ValueError(f"support_categories: {len(base_correct)} base problems vs {len(trained_correct)} trained")
    cats = []
    for b, t in zip(base_correct, trained_correct):
        if b < 0 or t < 0:
            raise ValueError("support_categories: correct counts must be >= 0")
        cats.append({(True, True): "P", (True, False): "S", (False, True): "E", (False, False): "O"}[(b > 0, t > 0)])
    return cats, {c: cats.count(c) for c in CATEGORIES}


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def support_metrics(P: int, E: int, S: int, O: int) -> dict[str, float]:  # noqa: E741 - the paper's names
    """SRR = P/(P+S), NDR = E/(P+E), SDS = their harmonic mean, NSCR = (E-S)/(P+E+S); NaN when undefined."""
    srr, ndr = _ratio(P, P + S), _ratio(E, P + E)
    sds = math.nan if math.isnan(srr) or math.isnan(ndr) else _ratio(2 * srr * ndr, srr + ndr)
    return {"SRR": srr, "NDR": ndr, "SDS": sds, "NSCR": _ratio(E - S, P + E + S)}
