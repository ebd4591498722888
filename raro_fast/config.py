"""Typed configuration: every setting of a run, with its default and its meaning, in one tree of dataclasses.

Settings come from three layers, later ones winning: the defaults below, YAML files (`--config a.yaml`, shipped
examples under `configs/`), and command-line overrides `--section.field value`. `--help` prints every field.
An unknown or ill-typed key is an error naming the key (and, for YAML, the file and line).
"""
from __future__ import annotations

import dataclasses
import math
import random
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from raro_fast.tasks import TaskConfig


class ConfigError(ValueError):
    """A user's configuration is wrong; the message names the key and where it came from."""


def _at_least(section: str, obj: Any, floor: float, *names: str) -> None:
    """Refuse at start a setting below `floor` that would otherwise fail deep inside, or quietly do something else."""
    for name in names:
        if getattr(obj, name) < floor:
            raise ValueError(f"{section}.{name} must be >= {floor}, got {getattr(obj, name)}")


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass(kw_only=True)
class EmbeddedModelConfig:
    """The small Qwen2-architecture model built from scratch when no `--model.path` is given."""

    hidden_size: int = _help("Width of the embedded model.", 128)
    num_layers: int = _help("Decoder layers of the embedded model.", 4)
    num_heads: int = _help("Attention heads.", 4)
    num_kv_heads: int = _help("Key/value heads (grouped-query attention).", 2)
    intermediate_size: int = _help("MLP width.", 384)
    max_position: int = _help("Longest sequence (prompt + completion) the model supports.", 512)

    def __post_init__(self) -> None:
        # found by review: 0 heads stopped in a ZeroDivisionError deep in the model's build, 0 layers built a model
        # of none without a word
        _at_least("model.embedded", self, 1, "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                  "intermediate_size", "max_position")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.embedded.hidden_size ({self.hidden_size}) must divide by model.embedded.num_heads "
                             f"({self.num_heads}), and num_heads by num_kv_heads ({self.num_kv_heads})")
        if (self.hidden_size // self.num_heads) % 2:  # rotary embeddings rotate pairs of a head's dimensions
            raise ValueError(f"model.embedded.hidden_size / model.embedded.num_heads ({self.hidden_size} / "
                             f"{self.num_heads}) is odd; a head's rotary embedding needs an even width")


@dataclass(kw_only=True)
class ModelConfig:
    path: str = _help(
        "A Hugging Face model directory (e.g. path/to/Qwen2.5-1.5B-Instruct), a hub id, or builtin:NAME, a base shipped "
        "with the package. The default, builtin:countdown-easy, is the embedded model after a 3000-step format "
        "warm-up whose critic checks answers better than chance (raro_fast/model/bases/countdown-easy/README.md). "
        "Empty: build the embedded model from `model.embedded` with the project's own tokenizer and warm it up in the "
        "run (see `warmup`).",
        "builtin:countdown-easy",
    )
    embedded: EmbeddedModelConfig = _help("Shape of the embedded default model.", factory=EmbeddedModelConfig)
    dtype: Literal["auto", "float32", "bfloat16"] = _help(
        "Compute dtype (FSDP2 mixed precision; without a process group the trainer computes in float32) and the "
        "rollout engine's copy's dtype; the trainer's weights and optimizer stay float32. auto = bfloat16 on CUDA, "
        "float32 on CPU.", "auto"
    )
    gradient_checkpointing: bool = _help("Recompute decoder activations in backward to save memory.", False)
    liger_kernels: bool = _help("Use Liger-Kernel's RMSNorm, SwiGLU MLP and RoPE in the trainer's model (Qwen2/Llama; "
                                "needs `pip install liger-kernel`; CUDA).", False)


@dataclass(kw_only=True)
class WarmupConfig:
    """Format warm-up (Countdown): of the embedded model always, of a real checkpoint (`--model.path`) only when
    `checkpoint_steps` asks for it.

    A model built from scratch cannot read the prompts at all, so it first learns the two output formats from
    synthetic traces on puzzles that never appear in training or evaluation (by default any target but the task's;
    see `leave_out`): a policy trace (the steps of the puzzle's expression, then the expression) and a critic trace
    (evaluate both answers, then a verdict). A real
    instruct model reads the prompts but may not answer in the `<answer>` format; the same corpus, a few hundred steps
    at a fine-tuning learning rate, teaches it the formats.
    """

    steps: int = _help("Optimizer steps of the warm-up (0: none).", 2000)
    batch_size: int = _help("Sequences per warm-up step.", 32)
    lr: float = _help("Warm-up learning rate (AdamW: a linear ramp over the first 20 steps, or a tenth of the steps "
                      "if fewer than 200, then cosine decay).", 3e-3)
    critic_fraction: float = _help("Fraction of warm-up sequences in the critic format.", 0.4)
    arithmetic_fraction: float = _help(
        "Fraction of warm-up sequences that are arithmetic drills: the steps of random expressions over the task's "
        "numbers (\"a op b=c\", the lines both traces are made of), many per sequence, so a small model learns "
        "the facts a critic checks; the rest are policy traces.", 0.0)
    min_target: int = _help("Smallest target of a warm-up puzzle (the task's own target is left out as `leave_out` "
                            "says).", 1)
    max_target: int = _help("Largest target of a warm-up puzzle.", 30)
    seed: int = _help("Seed of the warm-up corpus and order.", 1234)
    leave_out: Literal["target", "puzzles"] = _help(
        "What of a one-target task the warm-up never shows: target = its target value (no warm-up puzzle makes it), "
        "puzzles = only the task's own puzzles (number multiset and target), so that puzzles the task does not use "
        "may make its target. A task with a target per puzzle (task.countdown.max_target) always leaves out its "
        "puzzles.", "target")
    checkpoint_steps: int = _help(
        "Warm-up steps for a real checkpoint given by --model.path (0: none, the checkpoint is used as it is). The "
        "warmed-up copy is saved as train.output_dir/base_model and the run starts from it; `steps` and `lr` are the "
        "embedded model's.", 0)
    checkpoint_lr: float = _help("Warm-up learning rate for a real checkpoint (AdamW, ramped and decayed as "
                                 "warmup.lr).", 2e-5)
    precision: Literal["auto", "float32", "bfloat16"] = _help(
        "Compute dtype of the warm-up's matrix products (weights and optimizer stay float32): auto = bfloat16 "
        "autocast where the device computes bfloat16 natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX; "
        "1.3x faster for the default model on such a CPU), else float32.", "auto")

    def __post_init__(self) -> None:
        _at_least("warmup", self, 0, "steps", "lr", "checkpoint_steps", "checkpoint_lr")
        _at_least("warmup", self, 1, "batch_size")
        if not 0.0 <= self.critic_fraction <= 1.0:
            raise ValueError(f"warmup.critic_fraction must lie in [0, 1], got {self.critic_fraction}")
        # As the corpus draws the kind (r < critic + arithmetic), not against 1 - critic: 1.0 - 0.8 < 0.2 in floats.
        if not (0.0 <= self.arithmetic_fraction and self.critic_fraction + self.arithmetic_fraction <= 1.0):
            raise ValueError(f"warmup.arithmetic_fraction must lie in [0, 1 - critic_fraction], got "
                             f"{self.arithmetic_fraction} with critic_fraction {self.critic_fraction}")
        if self.min_target > self.max_target:  # no warm-up puzzle could be made: the corpus builder would spin
            raise ValueError(f"warmup.min_target/max_target: need min_target <= max_target, got {self.min_target}, "
                             f"{self.max_target}")


@dataclass(kw_only=True)
class RolloutConfig:
    backend: Literal["auto", "embedded", "continuous", "sglang", "sglang_http"] = _help(
        "Rollout engine: embedded = transformers generation in the trainer process (works everywhere); continuous = "
        "transformers' continuous batching (paged KV cache, its own scheduler) in the trainer process, needs "
        "transformers >= 5.17 (else embedded is used, with a message); sglang = sglang.Engine colocated on each "
        "training GPU; sglang_http = an SGLang server at rollout.sglang_url (both sglang backends need `pip install "
        "raro-fast[sglang]`); auto = the measured-fastest of embedded and continuous on the device, said in the "
        "log: embedded on CPU (measured faster there) and, until GPU numbers exist, on CUDA too.",
        "auto",
    )
    temperature: float = _help("Sampling temperature for policy rollouts (and critic rollouts unless "
                               "critic_temperature is set).", 1.0)
    critic_temperature: float | None = _help(
        "Sampling temperature for RARO's critic rollouts (unset or `none`: `temperature`). Their log-probs are "
        "recomputed at the same temperature, so the update stays on-policy for both roles. Measured on the embedded "
        "model (docs/experiments.md, section 5): at 0.3 the critic checks more reliably, but RARO gained less.", None)
    top_p: float = _help("Nucleus sampling for rollouts (1.0 keeps the engine's log-probs exact).", 1.0)
    max_new_tokens: int = _help("Longest policy completion; longer ones are truncated and filtered out (48: the "
                                "embedded model's easy-Countdown answers, search and expression, take 30-40).", 48)
    critic_max_new_tokens: int = _help("Longest critic completion.", 96)
    batch_size: int = _help("embedded: sequences (prompts x their n samples) decoded together, a bound on generation "
                            "memory (the continuous engine sizes its KV cache for each call instead). 128 holds the "
                            "default job's critic calls (32 pairs x 4 samples) in one batch; a decode step of the embedded "
                            "model on CPU costs about the same at 128 rows as at 64, so generation took about 25% "
                            "less time than at 64. It changes the draws too (batches share one generator), so a resume "
                            "keeps the run's. The other backends do not read it (left unrefused: configs that set it "
                            "are shared across backends).", 128)
    release_memory: Literal["none", "kv_cache", "kv_cache+weights"] = _help(
        "What a colocated engine frees while the trainer updates; it is taken back in stages around the weight "
        "sync (weights first, KV cache after). Weights need SGLang's memory saver. An SGLang server (sglang_http) "
        "keeps its memory: it has its own GPUs, and other ranks may still be generating on it.", "kv_cache")
    weight_bucket_mb: int = _help("Weight-sync bucket size (MB): tensors are flattened into one buffer per dtype "
                                  "and bucket, one hand-over per bucket.", 512)
    mem_fraction: float = _help("sglang: fraction of GPU memory the colocated engine may take (weights + KV cache).", 0.5)
    tp_size: int = _help("sglang: tensor-parallel size of the colocated engine.", 1)
    sglang_url: str = _help("sglang_http: the server's URL.", "http://127.0.0.1:30000")
    server_ranks: int = _help("sglang_http: GPUs the server runs on, its tensor-parallel size (checked against the "
                              "server; SGLang's weight sync takes dp_size 1 and pp_size 1); they join the weight-sync "
                              "group.", 1)
    weight_group_address: str = _help("sglang_http: address of trainer rank 0 that the server connects to for "
                                      "weight broadcasts.", "127.0.0.1")
    weight_group_port: int = _help("sglang_http: port of the weight-sync group's store on trainer rank 0.", 29650)
    sglang_timeout_s: float = _help("sglang_http: seconds a request to the server may take (a rollout batch, a "
                                    "weight-sync bucket) before the run stops saying so.", 600.0)

    def __post_init__(self) -> None:
        _at_least("rollout", self, 1, "max_new_tokens", "critic_max_new_tokens", "batch_size", "tp_size", "server_ranks",
                  "sglang_timeout_s")
        _at_least("rollout", self, 0, "temperature")
        if self.critic_temperature is not None and self.critic_temperature <= 0:
            raise ValueError(f"rollout.critic_temperature must be > 0 (every critic sample of a pair would be the "
                             f"same at 0, and GRPO would see no difference), got {self.critic_temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.weight_bucket_mb <= 0:
            raise ValueError(f"rollout.weight_bucket_mb must be > 0, got {self.weight_bucket_mb}")
        if not 0 < self.mem_fraction < 1:
            raise ValueError(f"rollout.mem_fraction must be in (0, 1), got {self.mem_fraction}")

    @property
    def released_tags(self) -> tuple[str, ...]:
        if self.backend == "sglang_http":
            # Every trainer rank would release the one server's memory, and SGLang refuses (asserts) a release
            # while any request runs on it.
            return ()
        return {"none": (), "kv_cache": ("kv_cache",), "kv_cache+weights": ("kv_cache", "weights")}[self.release_memory]


@dataclass(kw_only=True)
class RaroConfig:
    """The RARO game (Cai, Ryabinin, Provilkov, "Escaping the Verifier: Learning to Reason via Demonstrations",
    arXiv 2511.21667). Unconfirmed paper defaults are marked in the README.

    The update maximises lambda_pol * J_pol + lambda_crit * J_crit, each J the Dr.GRPO sum over its own role's
    tokens divided by its own constant (its planned sequences per step x its own longest completion), so the two
    lambdas weigh two objectives, as written in the paper, whatever the roles' counts and lengths."""

    questions_per_step: int = _help("Demonstrations (q, a*) drawn per step, over all ranks.", 4)
    group_size: int = _help("G: policy samples per question (one GRPO group).", 8)
    tau_pol: float = _help("Policy reward when the critic says tie.", 0.6)
    tau_crit: float = _help("Critic reward when it says tie.", 0.55)
    lambda_pol: float = _help("Weight of the policy objective in the mixed update.", 1 / 9)
    lambda_crit: float = _help("Weight of the critic objective in the mixed update.", 8 / 9)
    critic_samples_per_pair: int = _help(
        "Critic rollouts per (q, policy answer, expert answer) pair; they form one critic GRPO group, and the "
        "policy reward is the mean of their valid verdicts. With 2, a pair whose two verdicts agree teaches the "
        "critic nothing (zero advantage), which is most pairs.",
        4,
    )
    critic_pairs_per_step: int = _help(
        "At most this many fresh judged pairs (over all ranks: a rank's unused share goes to the others) are also "
        "the critic's training pairs; 0: all of them. Every pair the policy's answers were judged on is an "
        "on-policy critic rollout already.",
        0,
    )
    replay_size: int = _help("Replay buffer capacity (FIFO) of past (q, policy answer, a*) pairs.", 10000)
    replay_ratio: float = _help(
        "Fraction of the critic's training pairs drawn from the replay buffer: r/(1-r) replayed pairs per fresh "
        "one (0.5: as many replayed as fresh). Must be below 1.", 0.5)
    invalid_verdicts: Literal["abstain", "tie"] = _help(
        "An unparseable or truncated critic verdict: abstain = it does not count in the policy's reward (an answer "
        "whose verdicts are all invalid gets its group's mean, zero advantage), and a truncated critic sample stays "
        "in the critic's loss with reward 0; tie = the old rule: the policy gets tau_pol as for a tie, and truncated "
        "critic samples are filtered out of the loss.", "abstain")
    critic_lead_steps: int = _help(
        "The first this many steps train the critic only: the policy's answers are judged as usual (rewards and "
        "diagnostics logged) but not trained on, so the critic first learns the current policy's answers before the "
        "policy optimises against it (a discriminator's head start, as in GAN training).", 0)
    critic: Literal["model", "oracle"] = _help(
        "Whose verdict sets the policy's reward: model = the critic's (RARO); oracle = the task's verifier (tie if "
        "the policy's answer verifies, else the expert), a diagnostic that separates a weak critic from a policy "
        "that cannot learn in the budget. The critic still generates and trains the same way. Refused for tasks "
        "without a verifier.", "model")

    def __post_init__(self) -> None:
        for name in ("tau_pol", "tau_crit"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"raro.{name} must lie in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.replay_ratio < 1.0:
            raise ValueError(f"raro.replay_ratio must lie in [0, 1) (r/(1-r) replayed pairs per fresh one), "
                             f"got {self.replay_ratio}")
        for name in ("questions_per_step", "group_size", "critic_samples_per_pair"):
            if getattr(self, name) < 1:
                raise ValueError(f"raro.{name} must be >= 1, got {getattr(self, name)}")
        if self.critic_lead_steps < 0:
            raise ValueError(f"raro.critic_lead_steps must be >= 0, got {self.critic_lead_steps}")
        if self.critic_pairs_per_step < 0:
            raise ValueError(f"raro.critic_pairs_per_step must be >= 0 (0: no cap), got {self.critic_pairs_per_step}")
        if self.lambda_pol < 0 or self.lambda_crit < 0:
            raise ValueError("raro.lambda_pol and raro.lambda_crit must be >= 0")
        _at_least("raro", self, 0, "replay_size")

    def check_replay_size(self) -> None:
        """The game's replay buffer holds a step's replayed pairs (checked in RARO only: the other modes have no
        buffer, and refused an SFT run of 2000 questions a step over it: found by review)."""
        planned = math.ceil(self.planned_replay_pairs - 1e-9)
        if self.replay_size < planned:  # the critic's normaliser plans them all: 0 halved its weight (found by review)
            raise ValueError(f"raro.replay_size {self.replay_size} holds fewer than the {planned} replayed pairs a "
                             f"step plans at raro.replay_ratio {self.replay_ratio} (raro.questions_per_step "
                             f"{self.questions_per_step} x raro.group_size {self.group_size} fresh ones, "
                             f"raro.critic_pairs_per_step {self.critic_pairs_per_step or 'all'}); for no replay set "
                             "raro.replay_ratio 0, else raise raro.replay_size")

    @property
    def planned_fresh_pairs(self) -> int:
        """Fresh critic training pairs per step when every policy answer is judged (the cap applied)."""
        every = self.questions_per_step * self.group_size
        return min(every, self.critic_pairs_per_step) if self.critic_pairs_per_step else every

    @property
    def planned_replay_pairs(self) -> float:
        """Replayed pairs a step draws on average beside its planned fresh ones (the critic's normaliser counts
        them: rounded, 1 fresh pair at ratio 1/3 planned 0 where 0.5 are drawn; found by review)."""
        return self.planned_fresh_pairs * self.replay_ratio / (1.0 - self.replay_ratio)

    def replay_pairs_for(self, fresh: int, rng: random.Random) -> int:
        """Replayed pairs to mix with `fresh` fresh ones, so that they are `replay_ratio` of the whole, exact in
        expectation: the fraction is drawn (no draw when there is none). A rank rounding its own few fresh pairs
        would round replay away: 1 fresh pair at ratio 0.3 drew none, on every rank."""
        exact = fresh * self.replay_ratio / (1.0 - self.replay_ratio)
        whole = math.floor(exact)
        return whole + (rng.random() < exact - whole) if exact > whole else whole


@dataclass(kw_only=True)
class LossConfig:
    clip_low: float = _help("PPO ratio clip below 1 (1 - clip_low).", 0.2)
    clip_high: float = _help("PPO ratio clip above 1 (1 + clip_high).", 0.28)
    dual_clip: float | None = _help("Dual-clip constant c > 1 for negative advantages (None: off).", None)
    kl_coef: float = _help("beta of the KL penalty to a frozen reference copy of the initial model (0: none); the "
                           "KL is summed over the trained tokens of every role and divided by the sum of the roles' "
                           "normalising constants (RARO: policy's and critic's together).", 0.0)
    kl_estimator: Literal["k1", "k2", "k3"] = _help("KL estimator.", "k3")
    tis_cap: float | None = _help(
        "Truncated importance sampling: weight each token by min(p_trainer/p_engine, cap) (None: off).", None
    )
    loss_agg: Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "token_sum_norm"] = _help(
        "Aggregation over tokens. RARO uses no length normalisation: token_sum_norm divides the token sum by a "
        "constant (Dr.GRPO).",
        "token_sum_norm",
    )
    std_normalize: bool = _help("Divide group advantages by the group's std (off in RARO / Dr.GRPO).", False)

    def __post_init__(self) -> None:
        # The loss kernel's own checks, here so that a bad value fails at start: they ran at the first update, after
        # the model loaded and the step-0 evaluation (found by review), and a negative kl_coef (no KL at all, as the
        # trainer tests kl_coef > 0) was never checked.
        from raro_kernels.policy_loss import PolicyLossOptions

        try:
            PolicyLossOptions(clip_low=self.clip_low, clip_high=self.clip_high, dual_clip=self.dual_clip,
                              kl_coef=self.kl_coef, kl_estimator=self.kl_estimator, tis_cap=self.tis_cap,
                              loss_agg=self.loss_agg)
        except ValueError as e:
            raise ValueError(f"loss.{e}") from None


@dataclass(kw_only=True)
class DpoConfig:
    """Iterative DPO (--train.mode dpo): pairs (expert answer ≻ policy sample) from the current policy every step;
    the reference is the policy at the start of each round (round 1: the initial model)."""

    rounds: int = _help("Rounds: train.steps are split into this many rounds, as equal as whole steps allow (round k "
                        "starts at step ceil(k * train.steps / rounds); at most train.steps rounds), each with a fresh "
                        "reference. The split is fixed when the run starts: a resume that changes train.steps keeps "
                        "it, so extending a run adds rounds of the same lengths.", 3)
    beta: float = _help("DPO's beta: how strongly the policy may move away from the reference.", 0.1)

    def __post_init__(self) -> None:
        if self.rounds < 1 or not self.beta > 0:
            raise ValueError(f"dpo.rounds must be >= 1 and dpo.beta > 0, got {self.rounds}, {self.beta}")


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = _help("AdamW learning rate of the RL update.", 2e-4)
    weight_decay: float = _help("AdamW weight decay.", 0.0)
    beta1: float = _help("AdamW beta1.", 0.9)
    beta2: float = _help("AdamW beta2.", 0.99)
    grad_clip: float = _help("Clip the global gradient norm to this (0: off).", 1.0)

    def __post_init__(self) -> None:
        _at_least("optim", self, 0, "lr", "weight_decay", "grad_clip")
        for name in ("beta1", "beta2"):  # AdamW's own refusal came after the model was built, naming no setting
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"optim.{name} must lie in [0, 1), got {getattr(self, name)}")


@dataclass(kw_only=True)
class TrainConfig:
    mode: Literal["raro", "rlvr", "sft", "rationalization", "rl_logit", "dpo"] = _help(
        "What the shared trainer optimises: raro (policy + relativistic critic, no verifier), rlvr (GRPO on the "
        "task's verifier: the oracle baseline), sft (next-token training on the expert answers), rationalization "
        "(SFT on expert answers after reasoning the model writes with the answer shown), rl_logit (GRPO with the "
        "model's own log-likelihood of the expert answer after its reasoning as reward), dpo (iterative DPO: the "
        "expert answer preferred over each policy sample, the reference refreshed every round; see `dpo`).",
        "raro",
    )
    steps: int = _help("Training steps (one rollout round each).", 80)
    ppo_mini_batches: int = _help(
        "Optimizer steps per training step: the step's sequences are shuffled and split into this many mini-batches, "
        "each one update against the log-probs recomputed before the first (verl's ppo_mini_batch_size, TRL's "
        "num_iterations), so the PPO ratio moves off 1 and clipping acts. 1: one update, ratio 1, and the old "
        "log-probs are the update's own forward's (no separate recompute pass: the same numbers, one forward fewer). "
        "sft, rationalization and dpo take 1 only.", 1)
    seed: int = _help("Seed of everything (data order, sampling, model init).", 0)
    output_dir: str = _help("Where metrics, plots, checkpoints and the final model go.", "runs/raro-countdown")
    max_tokens_per_micro_batch: int = _help("Token budget of one packed micro-batch.", 4096)
    share_prompts: bool = _help(
        "Compute a prompt once per micro-batch for all the sequences that start with it (a GRPO group: RARO's "
        "critic samples of one pair, the policy's samples of one question), and the LM head only on trained tokens. "
        "The same gradient up to float rounding; on the default job the decoder computes 45% of the tokens it did "
        "without. false: every sequence computed whole, as before 2026-12-06 (docs/experiments.md, section 22).", True)
    eval_every: int = _help("Held-out evaluation every this many steps (0: only at the start and the end).", 10)
    eval_size: int = _help("Held-out puzzles evaluated (0: all).", 128)
    eval_temperature: float = _help("Sampling temperature at evaluation (0: greedy).", 0.0)
    eval_samples: int = _help(
        "Also sample this many answers per held-out puzzle at the rollouts' temperature and top_p and log their mean "
        "accuracy, eval/heldout_avg_at_n (the expected accuracy of one sample: on 64 puzzles a greedy answer per "
        "puzzle moves in steps of 1/64 and flips with small weight changes, the mean of n samples does not), and "
        "eval/heldout_pass_at_n. 0: off.", 8)
    eval_tournament: bool = _help(
        "At the first and the last evaluation, also let the shared model's critic pick one of the eval_samples "
        "answers per puzzle by a single-elimination tournament (raro_fast/rerank.py; no verifier) and log how often "
        "its pick is right, eval/heldout_tournament_at_n: what the critic RARO trains adds at test time. It costs "
        "about eval_samples critic calls per puzzle.", True)
    save_every: int = _help("Checkpoint every this many steps (0: only at the end).", 10)
    log_rollouts_every: int = _help(
        "Every this many steps, write each sequence the step trains to rollouts.jsonl: role, group, prompt and "
        "completion text, reward and advantage. What the policy writes and what the critic answers, to read when a "
        "curve turns (twice on Countdown the policy drifted into a form that the critic paid and the verifier "
        "rejected, seen only there). 0: off.", 10)
    resume: bool = _help("Continue from the latest checkpoint in output_dir.", False)
    overwrite: bool = _help("A new run into an output_dir that holds another run deletes that run's files (else it "
                            "is refused); a base_model warmed up with other settings is warmed up again.", False)
    stop_after: int = _help("Exit (as if killed) after this many steps of this process; 0: never. For tests.", 0)
    progress: bool = _help("Show a progress bar.", True)

    def __post_init__(self) -> None:
        _at_least("train", self, 0, "steps", "eval_every", "eval_size", "eval_samples", "save_every", "stop_after",
                   "log_rollouts_every")
        _at_least("train", self, 1, "max_tokens_per_micro_batch")
        _at_least("train", self, 0, "eval_temperature")
        if not self.output_dir.strip():  # found by review: '' wrote the run into the working directory
            raise ValueError("train.output_dir is empty; name the folder the run writes to")


@dataclass(kw_only=True)
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    raro: RaroConfig = field(default_factory=RaroConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def warms_up(self) -> bool:
        """Whether the run warms up a base: the embedded model always, a real checkpoint given checkpoint_steps."""
        return not self.model.path or self.warmup.checkpoint_steps > 0

    def __post_init__(self) -> None:
        if self.model.path:  # found by review: --model.embedded.num_layers 8 trained the shipped 4-layer base
            unused = _changed(self.model.embedded, "model.embedded.") + _changed(self.warmup, "warmup.", ("steps", "lr"))
            if unused:
                raise ValueError(f"{', '.join(unused)}: settings of the embedded model and its warm-up, which "
                                 f"model.path {self.model.path!r} replaces (a checkpoint's own warm-up is "
                                 "warmup.checkpoint_steps and warmup.checkpoint_lr); pass --model.path '' to build "
                                 "and warm up the embedded model")
            # Found by review: `--warmup.arithmetic_fraction 0.3` with the shipped base ran no warm-up, silently.
            # (Another model path only warns, in train: a config file may describe the warm-up its base had.)
            unread = unused_warmup_settings(self)
            if self.model.path.startswith("builtin:") and unread:
                # the embedded model's warm-up reads all but checkpoint_lr (review: the advice sent it there)
                embedded = "" if "warmup.checkpoint_lr" in unread else " --model.path '' to warm up the embedded model, or"
                raise ValueError(f"{', '.join(unread)}: no warm-up runs, as the shipped base {self.model.path!r} was "
                                 f"warmed up already (its warmup_recipe.json); pass{embedded} --warmup.checkpoint_steps "
                                 "N to warm up the shipped base further, with them")
        elif unread := unused_warmup_settings(self):
            raise ValueError(f"{', '.join(unread)}: a real checkpoint's warm-up (with --model.path); the embedded "
                             "model's (model.path '') is warmup.steps and warmup.lr")
        if self.task.name != "countdown":  # found by review: under a warm-up, those it never reads were taken too
            read = warmup_countdown_settings(self) if self.warms_up else ()
            if unread := [n for n in _changed(self.task.countdown, "") if n not in read]:
                raise ValueError(f"{', '.join('task.countdown.' + n for n in unread)}: settings of the countdown "
                                 f"task, which task.name {self.task.name} does not use, nor "
                                 f"{'the warm-up (its puzzles read ' + ', '.join(read) + ')' if read else 'a warm-up (none runs)'}")
        grouped = self.train.mode in ("raro", "rlvr", "rl_logit")  # GRPO: advantages relative to a group's mean
        if self.rollout.temperature == 0 and grouped:  # rationalization and DPO sample one answer per use (review)
            raise ValueError(f"rollout.temperature 0 (greedy) with train.mode {self.train.mode}: every sample of a "
                             "group is the same answer, so every advantage is 0 and nothing is learnt; use > 0 "
                             "(greedy evaluation is train.eval_temperature)")
        groups = [("raro.group_size", self.raro.group_size)] if grouped else []
        if self.train.mode == "raro":
            groups.append(("raro.critic_samples_per_pair", self.raro.critic_samples_per_pair))
        for name, size in groups:  # found by review: a group of one has advantage 0, so the run trained nothing
            if size < 2:
                raise ValueError(f"{name} {size} with train.mode {self.train.mode}: a GRPO group of one sample has "
                                 "advantage 0 (its reward less its own mean), so nothing is learnt; use >= 2")
        if self.train.mode == "raro":
            self.raro.check_replay_size()
            if self.raro.lambda_pol == 0 and self.raro.lambda_crit == 0:  # as a group of one: refused (review)
                raise ValueError("raro.lambda_pol and raro.lambda_crit are both 0: the update weighs neither role's "
                                 "objective, so nothing is learnt; give one of them a weight > 0")
        if self.train.mode != "dpo" and (unread := _changed(self.dpo, "dpo.")):  # found by review: accepted, unread
            raise ValueError(f"{', '.join(unread)} with train.mode {self.train.mode}: settings of iterative DPO, "
                             "which this mode does not run; leave them out")
        backend = self.rollout.backend
        if unread := unused_rollout_settings(self.rollout):
            raise ValueError(f"{', '.join(unread)} with rollout.backend {backend}: settings of "
                             f"{'the SGLang backends' if backend in IN_PROCESS else 'the other SGLang backend'}, "
                             "which this backend does not read; leave them out")
        if backend in IN_PROCESS and self.rollout.release_memory == "kv_cache+weights":
            raise ValueError(f"rollout.release_memory kv_cache+weights with rollout.backend {backend}: only a "
                             "colocated SGLang engine (rollout.backend sglang) gives its weights back; an in-process "
                             "engine keeps them; use kv_cache")
        if backend == "sglang_http" and _changed(self.rollout, "", ("release_memory",)):
            raise ValueError("rollout.release_memory with rollout.backend sglang_http: a server keeps its memory (it "
                             "has its own GPUs, and other ranks may still be generating on it); leave it out")
        if self.train.mode != "raro":  # found by review: an RLVR run given --raro.critic_lead_steps 40 trained its
            # policy from step 1 (the game's other settings, shared by configs, are only unused)
            # (rollout.critic_temperature is not the game's only: every mode's tournament@n samples the critic at it)
            game_only = _changed(self.raro, "raro.", ("critic_lead_steps", "critic"))
            if game_only:
                raise ValueError(f"{', '.join(game_only)} with train.mode {self.train.mode}: settings of the RARO "
                                 "game, which this mode does not play; leave them out")
        if self.train.mode == "dpo":  # found by review: both were accepted and silently replaced
            if self.loss.loss_agg != "token_sum_norm":
                raise ValueError(f"loss.loss_agg {self.loss.loss_agg} with train.mode dpo: DPO's loss is summed over "
                                 "a pair's tokens and averaged over pairs (token_sum_norm), whatever this says; "
                                 "leave it at token_sum_norm")
            if self.loss.kl_coef > 0:
                raise ValueError("loss.kl_coef > 0 with train.mode dpo: DPO's reference is the policy at its round's "
                                 "start, not the initial model, and its beta (dpo.beta) already holds the policy to "
                                 "it; leave loss.kl_coef at 0")
        if self.train.ppo_mini_batches < 1:
            raise ValueError(f"train.ppo_mini_batches must be >= 1, got {self.train.ppo_mini_batches}")
        if self.train.ppo_mini_batches > 1 and self.train.mode in ("dpo", "sft", "rationalization"):
            # SFT's too: past the first mini-batch its ratio leaves 1 and the clip drops expert tokens (a fifth of
            # them in a measured run): clipped PPO with advantage 1, not NLL.
            raise ValueError(f"train.ppo_mini_batches > 1 with train.mode {self.train.mode}: it runs as the surrogate "
                             "at ratio 1 (one update per batch); use 1")
        unread = _changed(self.loss, "loss.", unread_loss_settings(self.train.mode, self.loss.kl_coef))
        if kl_unread := [name for name in unread if name == "loss.kl_estimator"]:
            raise ValueError(f"{kl_unread[0]} {self.loss.kl_estimator} with loss.kl_coef 0: no KL term is computed; "
                             "give loss.kl_coef > 0, or leave it out")
        if unread:  # found by review: accepted and never read
            raise ValueError(f"{', '.join(unread)} with train.mode {self.train.mode}: this mode has no group "
                             "advantages to normalise and trains at ratio 1, where no clip acts; leave them out")
        if self.loss.tis_cap is not None and self.train.mode in ("sft", "rationalization", "dpo"):
            raise ValueError(f"loss.tis_cap needs the engine's log-probs of the trained tokens; train.mode "
                             f"{self.train.mode} trains on sequences the engine did not sample")


# ----------------------------------------------------------------------------------------------------------------
# Loading: YAML + command line, with errors that name the key.


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:  # the choices, not "Literal" (found by review: --help named none of them)
        return "one of: " + ", ".join(map(str, get_args(tp)))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert `value` to the annotated type `tp`; strings (from the command line) are parsed."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:  # "1/9" as well as "0.111": the paper states the role weights as fractions
                number = float(Fraction(value.strip())) if "/" in value else float(value)
            except (ValueError, ZeroDivisionError):
                pass
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(number):  # no setting means anything at nan or inf; lr nan trained NaN weights quietly
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, _YamlNumber):  # `output_dir: 5` is a number in YAML: not taken for the text "5"
            raise ConfigError(f"{where}: expected a string, got {value}")
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _build(cls: type, values: dict[str, Any], where: dict[str, str], prefix: str = "") -> Any:
    """Construct dataclass `cls` from a nested dict of raw values; `where[key]` says where a value came from."""
    types_ = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for key, raw in values.items():
        path = f"{prefix}{key}"
        if key not in types_:
            known = ", ".join(sorted(types_))
            # An unknown section ("--nope.x 1") has no origin of its own: its keys' say where it came from.
            inner = next((k for k in where if k.startswith(f"{path}.")), None)
            if path not in where and inner is not None:
                raise ConfigError(f"{where[inner]}: unknown key '{inner}': no section '{path}' (known here: {known})")
            raise ConfigError(f"{where.get(path, 'config')}: unknown key '{path}' (known here: {known})")
        tp = types_[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(raw, dict):
                raise ConfigError(f"{where.get(path, 'config')}: '{path}' is a section; expected a mapping")
            kwargs[key] = _build(tp, raw, where, prefix=f"{path}.")
        else:
            kwargs[key] = _coerce(raw, tp, f"{where.get(path, 'config')}: '{path}'")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        section = where.get(prefix.rstrip("."), "config") if prefix else "config"
        raise ConfigError(f"{_origin_named(str(e), where, prefix, section)}: section "
                          f"'{prefix.rstrip('.') or 'root'}': {e}") from None


def _origin_named(message: str, where: dict[str, str], prefix: str, default: str) -> str:
    """Where the setting a validation message names first was given (file:line or command line), so the error
    points at the offending line rather than at its section."""
    named = [k for k in where if k.startswith(prefix) and re.search(rf"(?<![\w.]){re.escape(k)}\b", message)]
    if not named:
        return default
    return where[min(named, key=lambda k: (message.find(k), -len(k)))]


class _YamlNumber(str):
    """A YAML number as its text, which the setting's type parses as it parses the command line's."""


_DATE_TAG = "tag:yaml.org,2002:timestamp"
_TEXT_READ_TAGS = ("tag:yaml.org,2002:int", _DATE_TAG)
# A float is read from its text when written in base 60 (`1:30.5`); `.nan` and `1.0e-4` as YAML reads them.
_FLOAT_TAG = "tag:yaml.org,2002:float"


def _yaml_values(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Read a YAML file into nested dicts, remembering the line of every key (for error messages)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    try:
        node = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{path}:{mark.line + 1}" if mark is not None else f"{path}"
        problem = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x)
        raise ConfigError(f"{at}: invalid YAML: {problem or e}") from None
    where: dict[str, str] = {}

    def walk(n: Any, prefix: str) -> Any:
        if isinstance(n, yaml.MappingNode):
            out = {}
            for k, v in n.value:
                key = f"{prefix}{k.value}"
                if k.value in out:  # YAML would keep the last silently; a setting given twice is a mistake
                    raise ConfigError(f"{path}:{k.start_mark.line + 1}: '{key}' is set twice (first on line "
                                      f"{where[key].rsplit(':', 1)[1]})")
                where[key] = f"{path}:{k.start_mark.line + 1}"
                out[k.value] = walk(v, f"{key}.")
            return out
        if isinstance(n, yaml.SequenceNode):
            return [walk(v, prefix) for v in n.value]
        # A number or date is read from its text as the command line reads it: YAML 1.1 took `seed: 0123` for
        # octal 83 (the command line: 123), `1:20` for 80 and `0x10` for 16, and an impossible date stopped the run
        # with a traceback (found by review). The setting's type then parses the text, or names file and line.
        if isinstance(n, yaml.ScalarNode) and (n.tag in _TEXT_READ_TAGS or n.tag == _FLOAT_TAG and ":" in n.value):
            return n.value if n.tag == _DATE_TAG else _YamlNumber(n.value)  # a date: the text it is written as
        # Anything else: the node's own value, as safe_load reads it. Serialising it and parsing that again failed
        # on an empty value (`steps:` serialises to `...`, which does not parse): a traceback, not the file and line.
        try:
            return yaml.constructor.SafeConstructor().construct_object(n, deep=True)
        except (yaml.YAMLError, ValueError) as e:
            problem = getattr(e, "problem", None) or e
            raise ConfigError(f"{path}:{n.start_mark.line + 1}: '{prefix.rstrip('.')}': {problem}") from None

    if node is None:
        return {}, where
    values = walk(node, "")
    if not isinstance(values, dict):
        raise ConfigError(f"{path}:1: the config file must be a mapping of sections")
    return values, where


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def iter_fields(cls: type = JobConfig, prefix: str = ""):
    """(dotted name, type, default, help) for every leaf setting, for `--help` and the docs."""
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        yield f"{prefix}{f.name}", tp, default, f.metadata.get("help", "")


def help_text(prog: str, root: type = JobConfig) -> str:
    lines = [
        f"usage: {prog} [--config FILE.yaml ...] [--section.field VALUE ...]"
        + (" [--model PATH] [--output-dir DIR] [--resume]" if root is JobConfig else ""),
        "",
        "Every setting (default in brackets). YAML files are applied in order, then command-line overrides.",
        "",
    ]
    for name, tp, default, text in iter_fields(root):
        lines.append(f"  --{name} [{default!r}]  ({_type_name(tp)})")
        if text:
            lines.append(f"        {text}")
    return "\n".join(lines)


ALIASES = {"--model": "--model.path", "--resume": "--train.resume", "--output-dir": "--train.output_dir"}


def load_config(argv: list[str] | None = None, root: type = JobConfig):
    """Build the `root` config (JobConfig by default) from command-line arguments (see `help_text`)."""
    argv = list(argv or [])
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    overrides: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"command line: unexpected argument {arg!r} (settings look like --section.field VALUE)")
        key, eq, inline = arg.partition("=")
        key = ALIASES.get(key, key) if root is JobConfig else key
        if key == "--train.resume" and not eq and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            overrides.append(("train.resume", "true"))
            i += 1
            continue
        if eq:
            value = inline
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"command line: {arg} needs a value")
            value = argv[i + 1]
            if value.startswith("--"):  # `--output-dir $RUN --resume` with RUN unset trained a new run in ./--resume
                raise ConfigError(f"command line: {arg} needs a value, and the next argument {value} is an option "
                                  f"(a value that starts with -- is given as {arg}=VALUE)")
            i += 2
        if key == "--config":
            file_values, file_where = _yaml_values(Path(value))
            _merge(values, file_values)
            where.update(file_where)
        else:
            overrides.append((key[2:], value))
    for dotted, value in overrides:
        node = values
        parts = dotted.split(".")
        setting = _setting_before_end(root, parts)
        if setting:  # `--train.steps.x 5` blamed the file that set train.steps, or "config"
            raise ConfigError(f"command line: unknown key '{dotted}' ('{setting}' is a setting, not a section)")
        for k, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                section = ".".join(parts[: k + 1])
                if section in where:  # a config file set the section itself to a value: that is the fault
                    raise ConfigError(f"{where[section]}: '{section}' is a section; expected a mapping")
                raise ConfigError(f"command line: '{dotted}' is not a setting")
        node[parts[-1]] = value
        where[dotted] = "command line"
    return _build(root, values, where)


def parse_command_line(argv: list[str], prog: str) -> JobConfig | int:
    """The training's settings from `argv`, or the exit code of a command line the parser answers alone (--help: 0;
    a refused setting: 2), its answer printed. The entry points ask this before they import torch and
    transformers: 7 s on a two-core machine, for a page of help or a one-line refusal."""
    if "-h" in argv or "--help" in argv:
        print(help_text(prog))
        return 0
    try:
        return load_config(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def warmup_countdown_settings(cfg: JobConfig) -> tuple[str, ...]:
    """The countdown task's settings the format warm-up reads, whatever the task: its puzzles' shape and what it
    leaves out, the task's own split where it leaves out the task's puzzles."""
    shape = ("num_numbers", "min_number", "max_number", "target", "max_target")
    if cfg.task.countdown.max_target or cfg.warmup.leave_out == "puzzles":
        return (*shape, "num_train", "num_heldout", "seed")
    return shape


def unused_warmup_settings(cfg: JobConfig) -> list[str]:
    """The warm-up settings given (not at their defaults) that this run never reads: all but the embedded model's
    steps and lr (refused on their own) when no warm-up runs, the checkpoint's when the embedded model warms up."""
    if not cfg.model.path:
        return _changed(cfg.warmup, "warmup.", ("checkpoint_steps", "checkpoint_lr"))
    if cfg.warms_up:
        return []
    return [n for n in _changed(cfg.warmup, "warmup.") if n not in ("warmup.steps", "warmup.lr")]


IN_PROCESS = ("auto", "embedded", "continuous")  # auto settles on one of the other two
# The rollout settings only an SGLang backend reads; found by review: `--rollout.tp_size 4` with the embedded engine
# was accepted and never read.
_SGLANG_READS = {"sglang": {"mem_fraction", "tp_size", "weight_bucket_mb"},
                 "sglang_http": {"sglang_url", "server_ranks", "weight_group_address", "weight_group_port",
                                 "sglang_timeout_s", "weight_bucket_mb"}}


def unread_loss_settings(mode: str, kl_coef: float) -> tuple[str, ...]:
    """The loss settings (names in `LossConfig`) a run of `mode` never reads: the supervised modes have no group
    advantages to normalise and train at ratio 1, where no clip acts (an expert token's advantage is 1, DPO's a
    pair's weight); without a KL term no estimator is computed. Refused when given; a resume may drop one that a run
    saved before they were refused (`checkpoint.resume_changes`)."""
    supervised = (("std_normalize", "clip_low", "clip_high", "dual_clip")
                  if mode in ("sft", "rationalization", "dpo") else ())
    return supervised + (("kl_estimator",) if kl_coef == 0 else ())


def unused_rollout_settings(rollout: RolloutConfig) -> list[str]:
    """The SGLang settings given (not at their defaults) that `rollout.backend` never reads: both SGLang backends'
    with an in-process engine, the other one's with an SGLang backend."""
    others = set().union(*_SGLANG_READS.values()) - _SGLANG_READS.get(rollout.backend, set())
    return _changed(rollout, "rollout.", tuple(others))


def _changed(section: Any, prefix: str, names: tuple[str, ...] | None = None) -> list[str]:
    """The dotted names of `section`'s settings (or of `names` among them) that differ from their defaults."""
    default = type(section)()
    return [prefix + f.name for f in dataclasses.fields(section) if (names is None or f.name in names)
            and getattr(section, f.name) != getattr(default, f.name)]


def _setting_before_end(root: type, parts: list[str]) -> str | None:
    """The dotted name of a leaf setting that `parts` reaches before its last part, or None."""
    tp = root
    for k, part in enumerate(parts[:-1]):
        if not dataclasses.is_dataclass(tp):
            return None
        tp = _field_types(tp).get(part)
        if tp is None:
            return None  # an unknown key: _build names it with the keys known there
        if not dataclasses.is_dataclass(tp):
            return ".".join(parts[: k + 1])
    return None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# What one command asks of its own process, not a setting of the run: a run's config.json leaves them at their
# defaults. Found by review: `--config A/config.json` of a run started with overwrite brought it back, and deleted
# the run in the new output_dir (A itself, without --train.output_dir).
PER_COMMAND = ("resume", "overwrite", "stop_after")


def run_settings(cfg: JobConfig) -> dict[str, Any]:
    """`to_dict(cfg)` as a run's config.json holds it: the settings that make the run, PER_COMMAND at defaults."""
    settings = to_dict(cfg)
    default = TrainConfig()
    settings["train"].update({name: getattr(default, name) for name in PER_COMMAND})
    return settings
