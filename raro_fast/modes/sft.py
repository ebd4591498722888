"""SFT: next-token training on the expert's final answers (`<think></think><answer>a*</answer>`). It runs through the
same clipped-surrogate update with advantage 1: with the recomputed (on-policy) log-probs as old log-probs the ratio
is 1, no clip is active, and the gradient of -A·ratio is exactly -∇ log p of the expert tokens, at temperature 1
whatever `rollout.temperature` is (each sequence carries its own)."""
from __future__ import annotations

from raro_fast import prompts
from raro_fast.config import JobConfig
from raro_fast.modes.base import Mode, RankRollout, Trainer, expert_completion_ids
from raro_fast.packing import SequenceSample
from raro_fast.tasks.base import Example


def sft_samples(examples: list[Example], *, tokenizer, reasonings: list[str] | None = None) -> RankRollout:
    out = RankRollout()
    for i, ex in enumerate(examples):
        prompt = prompts.render_prompt(tokenizer, prompts.policy_messages(ex.question))
        think = reasonings[i] if reasonings else ""
        answer = expert_completion_ids(tokenizer, ex.answer, think)
        # Temperature 1: the expert's tokens were not sampled, and NLL is the model's own likelihood (at the run's
        # rollout.temperature, 0.5 gave a gradient twice as long, and 0 stopped the first update).
        out.samples.append(SequenceSample(input_ids=prompt + answer, prompt_len=len(prompt), advantage=1.0, role="policy",
                                          group=i, uid=-1, loss_weight=1.0, temperature=1.0))
        out.add("policy/response_length", len(answer))
    return out


class SftMode(Mode):
    name = "sft"

    def rollouts(self, r: Trainer, examples: list[Example], *, step: int, seed: int) -> RankRollout:
        return sft_samples(examples, tokenizer=r.tokenizer)

    def policy_sequences(self, cfg: JobConfig) -> int:
        return cfg.raro.questions_per_step
