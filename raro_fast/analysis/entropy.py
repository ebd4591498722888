"""Answer-level and token-level entropy, and perplexity of external reasoning traces.

Token-level quantities go through `raro_kernels.linear_logprobs`, straight from hidden states and the LM-head
weight, so the full-vocabulary distribution at every position is used without materialising the logits.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch

from raro_kernels import linear_logprobs

NA = "NA"  # the one class of every unfinished output


def answer_entropy(answers: Sequence[str | None], classes: Sequence[int | None] | None = None) -> float:
    """H = -sum_j p_j ln p_j over the distinct final answers of N samples (None, an unfinished output, is the
    single class "NA"). Answers are grouped by `classes` where given (one per answer, as `Task.answer_classes`
    numbers them: DeepMath's 1/2 and 0.5 are one answer), else by their text without surrounding whitespace."""
    if not answers:
        raise ValueError("answer_entropy: no answers")
    if classes is not None and len(classes) != len(answers):
        raise ValueError(f"answer_entropy: {len(classes)} classes for {len(answers)} answers")
    labels = classes if classes is not None else [None if a is None else a.strip() for a in answers]
    counts = Counter(NA if a is None or c is None else ("class", c) for a, c in zip(answers, labels))
    n = len(answers)
    return -sum(c / n * math.log(c / n) for c in counts.values())


@torch.no_grad()
def token_entropy(
    hidden_TH: torch.Tensor, weight_VH: torch.Tensor, targets_T: torch.Tensor, *, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced (log-prob of each target, entropy of the full next-token distribution) at every position;
    positions whose target is -100 give 0 in both."""
    out = linear_logprobs(hidden_TH, weight_VH, targets_T, temperature=temperature, return_entropy=True)
    keep = targets_T != -100
    return out.logprobs * keep, out.entropy * keep


def mean_token_entropy(entropy_T: torch.Tensor, mask_T: torch.Tensor, seq_ids_T: torch.Tensor) -> float:
    """The paper's order of averaging: over each sequence's positions, then over sequences."""
    mask = mask_T.bool()
    ids = seq_ids_T[mask]
    if ids.numel() == 0:
        return math.nan
    uniq, inv = ids.unique(return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, entropy_T[mask].double())
    counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, torch.ones_like(sums[inv]))
    return float((sums / counts).mean())


def perplexity(token_logprobs: Sequence[float]) -> float:
    """exp(mean negative log-likelihood) of one teacher-forced trace."""
    if not token_logprobs:
        raise ValueError("perplexity: empty trace")
    return math.exp(-sum(token_logprobs) / len(token_logprobs))


def load_traces_jsonl(path: str | Path) -> list[dict[str, str]]:
    """External reasoning traces, one JSON object per line with "problem_id" and "trace" (both strings), one per
    problem. A bad line is an error naming the file, the line and the field."""
    path = Path(path)
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise ValueError(f"{path}: cannot read traces ({e.strerror})") from None
    out, first_line = [], {}
    for lineno, raw in enumerate(lines, 1):
        try:  # line by line, so bad UTF-8 is named with its line (found by review: neither file nor line)
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{path}:{lineno}: not UTF-8 text") from None
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object")
        for field in ("problem_id", "trace"):
            if field not in rec:
                raise ValueError(f"{path}:{lineno}: missing field '{field}'")
            if not isinstance(rec[field], str):
                raise ValueError(f"{path}:{lineno}: field '{field}' must be a string")
        if rec["problem_id"] in first_line:  # one perplexity per problem: a second trace would overwrite the first
            raise ValueError(f"{path}:{lineno}: problem_id {rec['problem_id']!r} already has a trace (line "
                             f"{first_line[rec['problem_id']]}); give one trace per problem")
        first_line[rec["problem_id"]] = lineno
        out.append({"problem_id": rec["problem_id"], "trace": rec["trace"]})
    return out
