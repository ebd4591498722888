"""Rationalization (STaR's): SFT on `<think>r</think><answer>a*</answer>` where the reasoning r is the model's own,
generated with the expert answer shown in the prompt. A rationalization that never closes its </think> falls back
to empty reasoning (counted in `rationalization/fallback_rate`), and so does one whose text, tokenized again, no
longer fits one micro-batch or the model's positions: a text's tokens are not the sampled ones, and can be more
(found by review: 48 sampled tokens came back as 221, and the run stopped at packing)."""
from __future__ import annotations

from raro_fast import prompts
from raro_fast.config import JobConfig
from raro_fast.modes.base import Mode, RankRollout, Trainer, trained_length_limit
from raro_fast.modes.sft import sft_samples
from raro_fast.rollout.engine import RolloutEngine, SamplingParams, context_limit, engine_context_limit
from raro_fast.tasks.base import Example


def rationalization_samples(examples: list[Example], *, engine: RolloutEngine, tokenizer, cfg: JobConfig,
                            seed: int, positions: int | None = None, packed_limit: int | None = None) -> RankRollout:
    """`positions`: the trained model's (an SGLang engine does not say its own: review); `packed_limit`: the
    longest sequence packed training computes (`varlen.packed_length_limit`)."""
    if not examples:
        return RankRollout()
    params = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                            top_p=cfg.rollout.top_p, n=1, seed=seed)
    outs = engine.generate([prompts.render_prompt(tokenizer, prompts.rationalization_messages(ex.question, ex.answer))
                            for ex in examples], params)
    reasonings = [_reasoning_text(c.text) for (c,) in outs]
    out = sft_samples(examples, tokenizer=tokenizer, reasonings=[r or "" for r in reasonings])
    limits = [n for n in (engine_context_limit(engine), positions, cfg.train.max_tokens_per_micro_batch,
                          packed_limit) if n]
    room = min(limits)
    if any(len(s.input_ids) > room for s in out.samples):
        reasonings = [None if len(s.input_ids) > room else r for s, r in zip(out.samples, reasonings)]
        out = sft_samples(examples, tokenizer=tokenizer, reasonings=[r or "" for r in reasonings])
    for r in reasonings:
        out.add("rationalization/fallback_rate", r is None)
    out.generated(outs)
    return out


def _reasoning_text(text: str) -> str | None:
    """What the model wrote inside <think>…</think>, or None if it never closed it."""
    end = text.find(prompts.THINK_END)
    if end < 0:
        return None
    start = text.find("<think>")
    return text[start + len("<think>") if 0 <= start < end else 0 : end].strip()


class RationalizationMode(Mode):
    name = "rationalization"

    def rollouts(self, r: Trainer, examples: list[Example], *, step: int, seed: int) -> RankRollout:
        return rationalization_samples(examples, engine=r.engine, tokenizer=r.tokenizer, cfg=r.cfg, seed=seed,
                                       positions=context_limit(getattr(r.hf_model, "config", None)),
                                       packed_limit=trained_length_limit(r))

    def policy_sequences(self, cfg: JobConfig) -> int:
        return cfg.raro.questions_per_step
