"""The one interface every rollout backend implements (embedded transformers, SGLang in-process, SGLang HTTP).

The trainer and the evaluators speak only to this; a backend knows nothing of the trainer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Protocol, runtime_checkable

if TYPE_CHECKING:  # annotations only: the configs import this module, and `--help` must not wait for torch
    import torch


class NonFiniteLogitsError(FloatingPointError):
    """The model's next-token logits hold NaN or infinity: its weights have diverged, nothing can be sampled."""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. `n` completions per prompt; `seed` makes a call reproducible where the backend allows."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # Every backend reads a temperature <= 0 as greedy: a negative one sampled n copies of the greedy answer and
        # was reported as sampling at that temperature.
        # An infinite one sampled every token uniformly.
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"sampling temperature must be finite and >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling top_p must be in (0, 1], got {self.top_p}")
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError(f"sampling n and max_new_tokens must be >= 1, got {self.n} and {self.max_new_tokens}")


@dataclass
class Completion:
    """One sampled continuation of one prompt.

    `logprobs[i]` is the log-probability the engine assigned to `token_ids[i]` under the distribution it sampled
    from (after temperature, before top-p truncation), so it is comparable with the trainer's recompute at the
    same temperature. `finish_reason` is "stop" (an end token was produced, and is included in `token_ids`) or
    "length" (cut at `max_new_tokens`: truncated). `weight_version` is the engine's weight version that produced it.
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    text: str
    weight_version: int = 0
    prompt_ids: list[int] = field(default_factory=list)

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@runtime_checkable
class RolloutEngine(Protocol):
    weight_version: int

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """Token-id prompts in; for each prompt a list of `params.n` completions out (same order)."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load new weights (Hugging Face names: the model's state dict's, or its checkpoint's where the engine has
        `takes_checkpoint_names`) and set `weight_version = version`."""
        ...

    def release_memory(self, tags: tuple[str, ...] = ("kv_cache",)) -> None:
        """Free memory while the trainer runs: "kv_cache", and "weights" where the backend supports it."""
        ...

    def resume_memory(self, tags: tuple[str, ...] = ("kv_cache",)) -> None:
        """Take back what `release_memory` freed; callers resume "weights" before a sync and "kv_cache" after it,
        so the two never peak together."""
        ...


def check_prompts(prompts: list[list[int]], params: SamplingParams | None = None, model_config=None) -> None:
    """An empty prompt has no last token to continue from: the embedded engine sampled from a masked pad position.
    A prompt that `params.max_new_tokens` would carry past the positions `model_config` supports is refused too
    (found by review: a rotary model sampled past them silently, GPT-2 stopped in an IndexError deep in torch)."""
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ValueError(f"rollout: prompt {empty[0]} of {len(prompts)} is empty (no tokens); every prompt needs at "
                         f"least one token")
    limit = context_limit(model_config)
    if params is None or limit is None:
        return
    over = next((i for i, p in enumerate(prompts) if len(p) + params.max_new_tokens > limit), None)
    if over is not None:
        # Lowering max_new_tokens cannot help a prompt that fills the positions by itself: say what can.
        remedy = ("lower the max_new_tokens of what sampled it (rollout.*, eval.* or analysis.*)"
                  if len(prompts[over]) < limit else "the prompt alone fills them: shorten that row")
        raise ValueError(f"rollout: prompt {over} of {len(prompts)} has {len(prompts[over])} tokens, and "
                         f"{params.max_new_tokens} new ones would run past the model's {limit} positions "
                         f"(max_position_embeddings); {remedy}, or use a model with a longer context")


def engine_context_limit(engine) -> int | None:
    """The positions of the model an in-process engine samples from, or an SGLang engine's `context_limit` (the
    trained model's, set by `make_engine`); None for an engine that says neither."""
    limit = context_limit(getattr(getattr(engine, "model", None), "config", None))
    return limit if limit is not None else getattr(engine, "context_limit", None)


def generate_where_room(engine, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion] | None]:
    """`engine.generate` for the prompts that, with `params.max_new_tokens` after them, fit the model's positions,
    and None for the others: a judge with no room to read one match makes that verdict invalid, where the engine
    refused the whole call (found by review, in the critic's tournament and the poetry judge)."""
    limit = engine_context_limit(engine)
    fits = [limit is None or len(p) + params.max_new_tokens <= limit for p in prompts]
    asked = [p for p, fit in zip(prompts, fits) if fit]
    outs = engine.generate(asked, params) if asked else []
    if len(outs) != len(asked):
        raise RuntimeError(f"rollout: the engine answered {len(outs)} of {len(asked)} prompts")
    answers = iter(outs)
    return [next(answers) if fit else None for fit in fits]


def context_limit(model_config) -> int | None:
    """The longest sequence a model's config says it supports (None: it does not say)."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


MEMORY_TAGS = ("kv_cache", "weights")


def check_memory_tags(tags: tuple[str, ...]) -> tuple[str, ...]:
    bad = [t for t in tags if t not in MEMORY_TAGS]
    if bad:
        raise ValueError(f"memory tags must be among {MEMORY_TAGS}, got {bad}")
    return tuple(tags)
