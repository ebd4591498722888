"""What a training mode is to the loop: the `Mode` hooks, the rollout a rank hands in, and helpers the modes share.

`train.run` holds one `Mode` and calls its hooks in this order every step, never asking which mode it is:

    start_step → rollouts (this rank's share) → [all ranks gathered] → score → pack, normalised by role_constants
    → old (and reference) log-probs → loss_plan → update → weight sync

A mode says where the trained sequences and their advantages come from; packing, the fused loss, the update and the
weight sync are the same for all of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from raro_fast import prompts
from raro_fast.config import JobConfig, LossConfig
from raro_fast.distributed import Dist
from raro_fast.model.varlen import packed_length_limit
from raro_fast.packing import SequenceSample
from raro_fast.replay import CriticPair
from raro_fast.rollout.engine import Completion, RolloutEngine, SamplingParams
from raro_fast.tasks.base import Example


class Trainer(Protocol):
    """What a mode may read from the loop's run state (`train.Run`): modes never see the loop itself."""

    cfg: JobConfig
    d: Dist
    task: Any
    tokenizer: Any
    engine: RolloutEngine
    model: torch.nn.Module  # the trained PolicyModel (possibly FSDP2-sharded)
    hf_model: Any  # the Hugging Face module inside it, for saving and for its config (what packed training computes)
    ref_model: torch.nn.Module | None
    replay: Any
    mode_state: dict  # what a mode fixes at the run's start and a resume keeps (saved with each checkpoint)


@dataclass
class RankRollout:
    """One rank's share of a step: trainable sequences, fresh critic pairs for the replay buffer, sequences to score
    with the trainer's model (rl_logit), and raw statistics (lists, merged over ranks by the loop)."""

    samples: list[SequenceSample] = field(default_factory=list)
    new_pairs: list[CriticPair] = field(default_factory=list)
    scoring: list[SequenceSample] = field(default_factory=list)
    stats: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, value: float | None) -> None:
        if value is not None:
            self.stats.setdefault(key, []).append(float(value))

    def generated(self, completions: list[list[Completion]]) -> list[list[Completion]]:
        """`completions`, their tokens counted (`rollout/generated_tokens`): every token the engine generated,
        trained or not. perf/rollout_tokens_per_s used to count trained sequences only, and so left out truncated
        and unpaired samples, critic-lead steps and all of rationalization's."""
        self.add("rollout/generated_tokens", sum(len(c.token_ids) for comps in completions for c in comps))
        return completions


# Statistics every step reports (null in metrics.jsonl when a step has no data for one, e.g. no critic verdicts).
STAT_KEYS = (
    "policy/truncated_rate", "policy/answer_rate", "policy/response_length", "policy/answer_accuracy",
    "critic/tie_rate", "critic/invalid_rate", "critic/accuracy", "critic/decisive_accuracy", "critic/oracle_agreement",
    "critic/response_length", "critic/truncated_rate", "critic/unreadable_rate",
    "reward/policy_mean", "reward/policy_mean_correct", "reward/policy_mean_incorrect", "reward/critic_mean",
)
# Counts summed over ranks rather than averaged.
COUNT_KEYS = ("critic/fresh_pairs", "critic/replay_pairs", "rollout/generated_tokens")


class Mode:
    """One training mode. Subclasses implement `rollouts` and `policy_sequences`; the other hooks default to what
    most modes do (nothing, or the run's own settings)."""

    name: ClassVar[str]
    # Whether `loss_plan` reads the micro-batches' old log-probs (then they are recomputed before the update).
    plans_with_old_logprobs: ClassVar[bool] = False

    def needs_reference(self, cfg: JobConfig) -> bool:
        """Whether the run keeps a frozen reference model (the KL anchor, or DPO's)."""
        return cfg.loss.kl_coef > 0

    def reference_dir(self, cfg: JobConfig, resume_from: Path | None) -> Path | None:
        """Where the reference's weights are when they are not the run's initial model (None: they are)."""
        return None

    def resumed_state(self, state: dict) -> dict:
        """The mode's `mode_state` from a checkpoint's trainer state (`state`)."""
        return dict(state.get("mode_state") or {})

    def start_step(self, r: Trainer, step: int) -> None:
        """Called before the step's rollouts."""

    def saved(self, r: Trainer) -> None:
        """Called on rank 0 after each checkpoint is written and the old ones pruned: delete what the mode saved
        that no kept checkpoint needs."""

    def rollouts(self, r: Trainer, examples: list[Example], *, step: int, seed: int) -> RankRollout:
        """This rank's trained sequences for its share `examples` of the step's demonstrations."""
        raise NotImplementedError

    def score(self, r: Trainer, samples: list[SequenceSample], scoring: list[SequenceSample]) -> dict[str, float | None]:
        """Rewards that need the trainer's model, written into the gathered `samples`' advantages; returns statistics."""
        return {}

    def policy_sequences(self, cfg: JobConfig) -> int:
        """Policy sequences a step plans to train (the norm constant's count; see `role_constants`)."""
        raise NotImplementedError

    def role_constants(self, cfg: JobConfig) -> dict[str, float]:
        """Dr.GRPO's constant of each role the mode trains: its planned sequences per step times its own longest
        completion. It does not move with the lengths or counts a step happens to produce, so no length
        normalisation creeps in; `update.weigh_roles` then normalises each role by its own."""
        return {"policy": float(self.policy_sequences(cfg) * cfg.rollout.max_new_tokens)}

    def loss_plan(self, r: Trainer, samples: list[SequenceSample], plan: list[tuple[list, float]],
                  stats: dict) -> tuple[LossConfig, list[tuple[list, float]]]:
        """The loss settings and optimizer-step plan, once old and reference log-probs are in the micro-batches."""
        return r.cfg.loss, plan


def policy_groups(examples: list[Example], *, engine: RolloutEngine, tokenizer, cfg: JobConfig,
                  seed: int) -> list[list[Completion]]:
    """`raro.group_size` policy samples per question, at the rollout settings."""
    params = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                            top_p=cfg.rollout.top_p, n=cfg.raro.group_size, seed=seed)
    return engine.generate([prompts.render_prompt(tokenizer, prompts.policy_messages(ex.question)) for ex in examples], params)


def sampled_sequence(c: Completion, *, advantage: float, role: str, group: int, weight: float,
                     temperature: float | None = None, reward: float | None = None) -> SequenceSample:
    """A sampled completion as a trainable sequence (its engine log-probs and weight version kept)."""
    return SequenceSample(
        input_ids=list(c.prompt_ids) + list(c.token_ids),
        prompt_len=len(c.prompt_ids),
        advantage=advantage,
        role=role,
        group=group,
        uid=-1,  # assigned once all ranks' samples are gathered
        loss_weight=weight,
        rollout_logprobs=list(c.logprobs),
        weight_version=c.weight_version,
        temperature=temperature,
        reward=reward,
    )


def trained_length_limit(r: Trainer) -> int | None:
    """The longest sequence packed training computes for the run's model (`varlen.packed_length_limit`), or None."""
    found = packed_length_limit(getattr(r.hf_model, "config", None))
    return None if found is None else found[0]


def expert_completion_ids(tokenizer, answer: str, think: str = "") -> list[int]:
    """The expert's final answer in the policy format (after `think` as reasoning), ending with the end token. A
    special token's text inside (a model's reasoning that spells `<|im_end|>` out) is plain text, as in prompts: read
    as the token, it taught the model to end its turn inside <think>. Tokenized as the assistant's reply, as the
    conversation reads: alone, a SentencePiece tokenizer began it with a `▁` the model never writes there (review)."""
    text = prompts.format_completion(think, answer)
    return prompts.reply_ids(tokenizer, text) + [tokenizer.eos_token_id]


def sequence_sums(mbs, n: int, fields: list[str | None], *, d: Dist) -> list[torch.Tensor]:
    """Per-sequence (index = uid) float64 sums over completion tokens of each per-token `field` of the micro-batches
    (None: count the tokens), added over all ranks."""
    sums = torch.zeros(len(fields), n, dtype=torch.float64, device=d.device)
    for mb in mbs:
        if mb.is_padding:
            continue
        m = mb.targets != -100
        uid = mb.uids[mb.seq_ids][m]
        for row, name in zip(sums, fields):
            row.index_add_(0, uid, torch.ones_like(uid, dtype=torch.float64) if name is None else getattr(mb, name)[m].double())
    if d.enabled:
        torch.distributed.all_reduce(sums)
    return list(sums)
