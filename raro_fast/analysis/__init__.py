"""Support and entropy measurements ("The Invisible Leash: Why RLVR May (Not) Escape Its Origin", arXiv 2507.14843):
does training widen or narrow what a model can solve? The library part; `python -m raro_fast.analyze` samples the
models and calls it."""
from raro_fast.analysis.entropy import answer_entropy, load_traces_jsonl, mean_token_entropy, perplexity, token_entropy
from raro_fast.analysis.passk import avg_at_n, default_ks, pass_at_k, pass_at_k_curve
from raro_fast.analysis.support import CATEGORIES, support_categories, support_metrics

__all__ = [
    "CATEGORIES", "answer_entropy", "avg_at_n", "default_ks", "load_traces_jsonl", "mean_token_entropy", "pass_at_k",
    "pass_at_k_curve", "perplexity", "support_categories", "support_metrics", "token_entropy",
]
