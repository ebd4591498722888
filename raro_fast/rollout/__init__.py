"""Rollout engines behind one interface (engine.py): the embedded transformers engine, and SGLang on GPU nodes."""
from __future__ import annotations

from raro_fast.rollout.engine import Completion, RolloutEngine, SamplingParams

__all__ = ["Completion", "RolloutEngine", "SamplingParams", "make_engine"]


def make_engine(cfg, model, tokenizer) -> RolloutEngine:
    """The engine `cfg.backend` names, holding `model`'s weights. SGLang is imported only when asked for."""
    if cfg.backend == "embedded":
        from raro_fast.rollout.embedded import EmbeddedEngine

        return EmbeddedEngine(
            model,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_ids=[tokenizer.eos_token_id],
            decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
            batch_size=cfg.batch_size,
        )
    try:
        import sglang  # noqa: F401
    except ImportError:
        raise ValueError(
            f"rollout.backend={cfg.backend!r} needs SGLang, which is not installed: "
            "pip install 'raro-fast[sglang]' (GPU nodes only), or use --rollout.backend embedded"
        ) from None
    raise ValueError(f"rollout.backend={cfg.backend!r}: the SGLang adapter is not built yet (issue 5); use 'embedded'")
