"""RARO training: `torchrun --nproc_per_node=N -m raro_fast.train [--config f.yaml] [--section.field value ...]`.

The loop (`run`) is the whole method on one screen:
  demonstrations → policy rollouts → critic verdicts → rewards (+ replay) → packed mixed batch
  → log-prob recompute → ONE update of the ONE shared model → weight sync to the rollout engine.
Where the trained sequences and their advantages come from is the mode's (`raro_fast/modes/`); the loop calls its
hooks without asking which mode it holds.
"""
from __future__ import annotations

import sys

PROG = "torchrun --nproc_per_node=N -m raro_fast.train"
if __name__ == "__main__":
    # --help and a refused setting are answered before torch and transformers are imported (7 s on two cores)
    from raro_fast.config import parse_command_line

    if isinstance(_COMMAND_LINE := parse_command_line(sys.argv[1:], PROG), int):
        sys.exit(_COMMAND_LINE)

import dataclasses  # noqa: E402  (below: the answers above must not wait for these)
import functools
import hashlib
import json
import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from raro_fast import checkpoint, output_dir, prompts
from raro_fast.config import (JobConfig, OptimConfig, RolloutConfig, parse_command_line, run_settings,
                              unused_warmup_settings)
from raro_fast.distributed import Dist, all_gather_objects, barrier, broadcast_object, init_distributed, shutdown
from raro_fast.durable import write_text_atomic
from raro_fast.evaluate import heldout_accuracy, heldout_scores
from raro_fast.metrics import MetricsLog, critic_signal, plot_curves, summary_table
from raro_fast.model.hf import (build_embedded_model, end_token_ids, engine_copy, load_pretrained, load_project_tokenizer,
                                model_files_digest, resolve_dtype, resolve_model_path, save_pretrained_atomic,
                                weights_digest)
from raro_fast.model.policy import PolicyModel
from raro_fast.model.varlen import packed_length_limit, use_varlen_attention
from raro_fast.packing import plan_micro_batches
from raro_fast.parallelize import parallelize
from raro_fast.weight_sync import full_state_dict, push_weights
from raro_fast.modes import COUNT_KEYS, STAT_KEYS, Mode, make_mode
from raro_fast.modes.base import expert_completion_ids
from raro_fast.replay import ReplayBuffer
from raro_fast.rollout import check_backend, make_engine
from raro_fast.rollout.engine import context_limit
from raro_fast.tasks import make_task
from raro_fast.update import DivergedError, recompute_logprobs, split_mini_batches, update_mini_batches, weigh_roles
from raro_fast.warmup import format_rates, format_warmup


@dataclass
class Run:
    """Everything the loop touches, built once by `setup`."""

    cfg: JobConfig
    d: Dist
    task: object
    train_examples: list
    eval_examples: list
    tokenizer: object
    hf_model: object
    model: PolicyModel
    optimizer: torch.optim.Optimizer
    engine: object
    engine_dtype: torch.dtype
    mode: Mode
    ref_model: PolicyModel | None
    replay: ReplayBuffer
    log: MetricsLog
    rollout_log: MetricsLog
    start_step: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    skipped_in_a_row: int = 0
    warned_uniform: bool = False
    first_entropy: float | None = None
    data_sha256: str = ""  # `data_digest` of the run's examples, computed once: each checkpoint records it
    tokens_sha256: dict = field(default_factory=dict)  # `tokens_digest`, recorded by each checkpoint likewise
    # `weights_digest` and `model_files_digest` of the initial model, where a reference model is rebuilt from it on
    # resume (the KL anchor, DPO's first reference); each checkpoint records them
    initial_weights_sha256: str | None = None
    initial_model_files_sha256: str | None = None
    # What a mode fixes when the run starts and a resume must keep (DPO's round length): saved with each checkpoint
    mode_state: dict = field(default_factory=dict)

    @contextmanager
    def timed(self, stage: str):
        t0 = time.perf_counter()
        yield
        if self.d.device.type == "cuda":
            torch.cuda.synchronize()
        self.timings[f"timing_s/{stage}"] = time.perf_counter() - t0


def run(r: Run) -> None:
    cfg, d = r.cfg, r.d
    steps = range(r.start_step, cfg.train.steps)
    bar = tqdm(steps, desc=cfg.train.mode.upper(), disable=not (cfg.train.progress and d.is_main), dynamic_ncols=True, initial=r.start_step, total=cfg.train.steps)
    if r.start_step == 0:
        r.log.write({"step": 0, **evaluate(r, 0)})
    elif r.start_step == cfg.train.steps:  # resumed at its last step: from a run that planned more steps, whose
        # record of it has no final evaluation, and the summary took step 0's as the last (found by review)
        r.log.update(r.start_step, evaluate(r, r.start_step))
    for step in bar:
        record = train_step(r, step)
        check_health(r, step + 1, record)
        if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 or step + 1 == cfg.train.steps:
            record.update(evaluate(r, step + 1))
        r.log.write(record)
        # refresh=False: drawn with the next count, so the line says "k/N" beside step k's numbers (a redraw here
        # showed them beside k - 1, the line a log that is not a terminal keeps; found by review)
        bar.set_postfix({k.split("/")[1]: f"{record[k]:.2f}" for k in ("reward/policy_mean", "critic/tie_rate",
                         "policy/answer_accuracy") if record.get(k) is not None}, refresh=False)
        if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0 or step + 1 == cfg.train.steps:
            save(r, step + 1)
        if cfg.train.stop_after and step + 1 - r.start_step == cfg.train.stop_after:
            bar.update(1)  # the last line says the step it stopped after, beside its numbers
            bar.close()
            raise SystemExit(f"stopping after {cfg.train.stop_after} steps (train.stop_after)")
    finish(r)


def train_step(r: Run, step: int) -> dict:
    """One step of the data flow: rollouts -> rewards -> packed batch -> log-probs -> update -> weight sync.
    Returns the step's metrics record (before evaluation), with the wall time of each stage in `timing_s/*`."""
    cfg, d = r.cfg, r.d
    r.timings = {}
    t0 = time.perf_counter()
    r.mode.start_step(r, step)
    with r.timed("gen"):
        rollout = r.mode.rollouts(r, step_examples(r, step), step=step, seed=rollout_seed(cfg, d, step))
        if cfg.rollout.released_tags:  # colocated: the trainer gets the memory until the sync
            r.engine.release_memory(cfg.rollout.released_tags)
    samples, scoring, stats = gather_samples(r, rollout, step)
    with r.timed("reward"):  # rewards that need the trainer's model (rl_logit's); nothing to do for the others
        stats.update(r.mode.score(r, samples, scoring))
    with r.timed("pack"):
        plan = plan_update(samples, cfg, d, step, r.mode.role_constants(cfg))
        mbs = [mb for part, _ in plan for mb in part]
    # One optimizer step per round: the update's own forward gives the old log-probs (ratio 1, as a recompute
    # would), so the separate pass is skipped, unless the mode reads them to plan its loss.
    old_from_forward = cfg.train.ppo_mini_batches == 1 and not r.mode.plans_with_old_logprobs
    if not old_from_forward:
        with r.timed("old_log_prob"):  # before the first optimizer step: every mini-batch's ratio starts at 1
            entropies = recompute_logprobs(r.model, mbs, temperature=cfg.rollout.temperature)
    if r.ref_model is not None:
        with r.timed("ref"):
            recompute_logprobs(r.ref_model, mbs, temperature=cfg.rollout.temperature, field="ref_logprobs")
    loss_cfg, plan = r.mode.loss_plan(r, samples, plan, stats)
    log_rollouts(r, samples, step + 1)  # after the plan: DPO's advantages are set there (they were logged as 0.0)
    with r.timed("update_actor"):
        upd = update_mini_batches(r.model, r.optimizer, plan, loss_cfg=loss_cfg, old_from_forward=old_from_forward,
                                  temperature=cfg.rollout.temperature, grad_clip=cfg.optim.grad_clip)
    if old_from_forward:
        entropies = upd.entropies
    with r.timed("update_weights"):
        push_weights(r.engine, r.model, version=step + 1, dtype=r.engine_dtype, released=cfg.rollout.released_tags)
    r.timings["timing_s/step"] = time.perf_counter() - t0
    measured = batch_metrics(r, samples, mbs, entropies, generated=stats["rollout/generated_tokens"])
    return {"step": step + 1, "loss": upd.loss, "grad_norm": upd.grad_norm, "update/skipped": upd.skipped,
            "update/optimizer_steps": upd.optimizer_steps,
            **upd.metrics, **stats, **measured, **r.timings}


# ---------------------------------------------------------------------------------------------------------------
# The stages.


MAX_SKIPPED_IN_A_ROW = 3
UNIFORM_ENTROPY_FRACTION = 0.9


def check_health(r: Run, step: int, record: dict) -> None:
    """Stop after repeated non-finite updates (each was skipped, weights unchanged; a step of several optimizer
    steps, `train.ppo_mini_batches`, counts when all of them were); warn, once, about a policy whose entropy sits
    near the uniform maximum ln V: finite weights that no longer model anything."""
    whole = record["update/skipped"] >= record.get("update/optimizer_steps", 1)
    r.skipped_in_a_row = r.skipped_in_a_row + 1 if whole else 0
    if r.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
        raise DivergedError(f"steps {step - r.skipped_in_a_row + 1}-{step}: the loss or gradient was not finite "
                            f"{r.skipped_in_a_row} times in a row (each step was skipped, the weights are those of "
                            f"step {step - r.skipped_in_a_row})")
    entropy, ceiling = record.get("policy/entropy"), UNIFORM_ENTROPY_FRACTION * math.log(r.hf_model.config.vocab_size)
    if entropy is None or not math.isfinite(entropy):
        return
    if r.first_entropy is None:
        r.first_entropy = entropy
    # Only a model that *became* uniform: an untrained one starts there, and that is not the optimizer's doing.
    if entropy >= ceiling > r.first_entropy and not r.warned_uniform and r.d.is_main:
        r.warned_uniform = True
        print(f"warning: step {step}: policy entropy {entropy:.2f} nats (at the run's start: {r.first_entropy:.2f}) "
              f"is near the uniform maximum ln V = {ceiling / UNIFORM_ENTROPY_FRACTION:.2f}: the model now samples "
              f"noise; {divergence_hint(r.cfg)}")


def divergence_hint(cfg: JobConfig) -> str:
    pointer = checkpoint.checkpoint_root(cfg.train.output_dir) / "latest"
    restart = (f"the last checkpoint is {pointer.parent / pointer.read_text().strip()}: resume from it with --resume "
               "and a smaller --optim.lr") if pointer.is_file() else \
        "no checkpoint was written yet: start again with a smaller --optim.lr"
    return (f"the likely cause is a learning rate too large (optim.lr = {cfg.optim.lr:g}; the default is "
            f"{OptimConfig().lr:g}); {restart}")


def step_examples(r: Run, step: int) -> list:
    """This rank's share of the step's demonstrations."""
    examples = examples_for_step(r.train_examples, step, r.cfg.raro.questions_per_step, r.cfg.train.seed)
    return examples[r.d.rank :: r.d.world_size]


def rollout_seed(cfg: JobConfig, d: Dist, step: int) -> int:
    return (cfg.train.seed * 1_000_003 + step * 7919 + d.rank * 104_729) % 2**62


def examples_for_step(train: list, step: int, per_step: int, seed: int) -> list:
    """Demonstrations of `step`: consecutive slices of a fresh permutation per epoch (a pure function of the step,
    so a resumed run draws exactly what the uninterrupted one would)."""
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(k, len(train))
        out.append(train[_epoch_order(seed, epoch, len(train))[pos]])
    return out


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, n: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(f"{seed}/epoch/{epoch}").shuffle(order)
    return tuple(order)


def gather_samples(r: Run, rollout, step: int):
    """All ranks' sequences (global uids in rank order), merged statistics; the replay buffer grows identically
    on every rank."""
    parts = all_gather_objects(r.d, rollout)
    samples, scoring, stats = [], [], {}
    offset = 0
    for part in parts:
        # A mode numbers its groups on its own rank (GRPO's advantages are computed there): shifted past the
        # earlier ranks' numbers, a group number names one group of the step (rollouts.jsonl, DPO's pairs).
        own = [*part.samples, *part.scoring]
        for s in own:
            s.group += offset
        offset = max([offset - 1, *(s.group for s in own)]) + 1
        samples.extend(part.samples)
        scoring.extend(part.scoring)
        r.replay.extend(part.new_pairs)
        for k, v in part.stats.items():
            stats.setdefault(k, []).extend(v)
    for uid, s in enumerate(samples):
        s.uid = uid
    merged = {k: sum(v) / len(v) if v else None for k, v in stats.items()}
    merged.update({k: None for k in STAT_KEYS if k not in merged})
    merged.update({k: sum(stats.get(k, [0])) for k in COUNT_KEYS})
    correct, incorrect = merged["reward/policy_mean_correct"], merged["reward/policy_mean_incorrect"]
    # Whether the critic's reward carries signal: what a right answer earns over a wrong one (verifier logged only).
    merged["reward/policy_gap"] = None if correct is None or incorrect is None else correct - incorrect
    # On-policy means every fresh rollout came from the weights of the last sync (= this step's number).
    versions = [s.weight_version for s in samples if s.weight_version is not None]
    merged["rollout/weight_version_lag"] = step - min(versions) if versions else None
    merged["batch/policy_sequences"] = sum(s.role == "policy" for s in samples)
    merged["batch/critic_sequences"] = sum(s.role == "critic" for s in samples)
    return samples, scoring, merged


def log_rollouts(r: Run, samples: list, step: int) -> None:
    """Every sequence the step trains, as text (main rank, every `train.log_rollouts_every` steps)."""
    every = r.cfg.train.log_rollouts_every
    if not (every and step % every == 0 and r.d.is_main):
        return
    r.rollout_log.write_all(
        {"step": step, "role": s.role, "group": s.group, "reward": s.reward, "advantage": s.advantage,
         "weight_version": s.weight_version,  # None: not sampled (an expert's demonstration)
         "prompt": r.tokenizer.decode(s.input_ids[:s.prompt_len]),
         "completion": r.tokenizer.decode(s.input_ids[s.prompt_len:])} for s in samples)


def plan_update(samples: list, cfg: JobConfig, d: Dist, step: int,
                role_constants: dict[str, float]) -> list[tuple[list, float]]:
    """The step's optimizer steps: per PPO mini-batch, this rank's packed micro-batches and the norm constant,
    each role normalised by its own planned count (`role_constants`)."""
    k = cfg.train.ppo_mini_batches
    plan = []
    for part in split_mini_batches(samples, k, seed=f"{cfg.train.seed}/mini_batches/{step}"):
        norm = weigh_roles(part, loss_agg=cfg.loss.loss_agg, role_constants=role_constants, parts=k)
        mbs = plan_micro_batches(part, max_tokens_per_micro_batch=cfg.train.max_tokens_per_micro_batch,
                                 world_size=d.world_size, rank=d.rank, share_prompts=cfg.train.share_prompts)
        plan.append(([mb.to(d.device) for mb in mbs], norm))
    return plan


def batch_metrics(r: Run, samples, mbs, entropies, *, generated: int) -> dict[str, float | None]:
    """Trainer–engine log-prob gap, entropy per role, throughput (verl's names)."""
    is_policy = torch.tensor([s.role == "policy" for s in samples], dtype=torch.bool, device=r.d.device)
    # gap_sum, n, ent_pol, n_pol, ent_crit, n_crit, nll_pol, decoder tokens
    acc = torch.zeros(8, device=r.d.device, dtype=torch.float64)
    gap_max = torch.zeros((), device=r.d.device)
    for mb, ent in zip(mbs, entropies):
        if mb.is_padding:
            continue
        m = mb.targets != -100
        if mb.rollout_logprobs is not None:  # SFT batches were never sampled by the engine
            gap = (mb.old_logprobs - mb.rollout_logprobs).abs()[m]
        else:
            gap = torch.zeros(0, device=m.device)
        role_is_policy = is_policy[mb.uids][mb.seq_ids]
        pol = role_is_policy & m
        crit = ~role_is_policy & m
        computed = mb.input_ids.numel() if mb.kept_rows is None else mb.kept_rows.numel()
        counts = [gap.sum(), gap.new_tensor(gap.numel()), ent[pol].sum(), pol.sum(), ent[crit].sum(), crit.sum(),
                  -mb.old_logprobs[pol].sum(), gap.new_tensor(computed)]
        acc += torch.stack([c.double() for c in counts])
        if gap.numel():
            gap_max = torch.maximum(gap_max, gap.max())
    if r.d.enabled:
        torch.distributed.all_reduce(acc)
        torch.distributed.all_reduce(gap_max, op=torch.distributed.ReduceOp.MAX)
    a = acc.tolist()
    tokens = sum(len(s.input_ids) for s in samples)
    # None where nothing was measured (no sampled token: SFT; no policy tokens: critic_lead_steps; no critic): a 0.0
    # entropy became the run's starting entropy, and check_health then warned that the policy had turned uniform.
    return {
        "logprob/gap_mean_abs": a[0] / a[1] if a[1] else None,
        "logprob/gap_max_abs": float(gap_max) if a[1] else None,
        "policy/entropy": a[2] / a[3] if a[3] else None,
        # SFT's loss as TRL reports it (`loss` is the surrogate's value: for SFT, minus the tokens over a constant)
        "policy/nll": a[6] / a[3] if a[3] else None,
        "critic/entropy": a[4] / a[5] if a[5] else None,
        "batch/tokens": tokens,
        "batch/decoder_tokens": a[7],  # what the decoder computed: fewer than batch/tokens where prompts are shared
        "batch/micro_batches_per_rank": len(mbs),
        # verl's perf/throughput: (prompt + response tokens) / (step time x ranks)
        "perf/throughput": tokens / max(r.timings["timing_s/step"], 1e-9) / r.d.world_size,
        # slime's rollout throughput: generated tokens (trained or not, all ranks') per second of generation, per
        # rank; None where nothing was generated (SFT)
        "perf/rollout_tokens_per_s": generated / max(r.timings["timing_s/gen"], 1e-9) / r.d.world_size
        if generated else None,
    }


def evaluate(r: Run, step: int) -> dict[str, float | None]:
    cfg = r.cfg
    # Every held-out number samples at the rollouts' nucleus (a sampled heldout_accuracy took top_p 1 beside an
    # avg@n at rollout.top_p: two distributions logged side by side).
    common = dict(engine=r.engine, tokenizer=r.tokenizer, task=r.task, max_new_tokens=cfg.rollout.max_new_tokens,
                  top_p=cfg.rollout.top_p, d=r.d)
    record = {"eval/heldout_accuracy": heldout_accuracy(r.eval_examples, temperature=cfg.train.eval_temperature,
                                                        seed=cfg.train.seed + 7 * step, **common)}
    if cfg.train.eval_samples:
        # The critic's tournament costs about n critic calls per puzzle: at the first and the last evaluation only.
        tournament = cfg.train.eval_tournament and cfg.train.eval_samples > 1 and step in (0, cfg.train.steps)
        scores = heldout_scores(r.eval_examples, n=cfg.train.eval_samples, temperature=cfg.rollout.temperature,
                                seed=cfg.train.seed + 7 * step + 3,
                                critic_max_new_tokens=cfg.rollout.critic_max_new_tokens if tournament else None,
                                critic_temperature=cfg.rollout.critic_temperature, **common)
        scores = scores or {"avg@n": None, "pass@n": None, **({"tournament@n": None} if tournament else {})}
        record.update({f"eval/heldout_{k.replace('@', '_at_')}": v for k, v in scores.items()})
    return record


def data_digest(train: list, heldout: list) -> str:
    """SHA-256 of what a run trains and is evaluated on (each example's id, question and expert answer, in order):
    the checkpoint records a data file's path only, and a file grown or replaced between a kill and the resume
    gave every later step other demonstrations (the order is a permutation of len(train)) with no error."""
    rows = [[[e.id, e.question, e.answer] for e in split] for split in (train, heldout)]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def tokens_digest(tokenizer, hf_model, example) -> dict[str, str]:
    """SHA-256 (12 hex digits) of what the run makes of one example, part by part: its prompts, its target, the
    text read back from that target, the tokens that end a turn. A resume checks them: a raro-fast or transformers
    upgrade in between that tokenizes otherwise (the turn's end, a tag read as one token) trained the resumed steps
    on other tokens than the run's first, without a word (found by review)."""
    question, answer = example.question, example.answer
    # a special token spelled out inside the reasoning: how text that names one is read is part of the answer
    target = expert_completion_ids(tokenizer, answer, think=f"{question} {tokenizer.eos_token or ''}")
    parts = {"policy prompt": prompts.render_prompt(tokenizer, prompts.policy_messages(question)),
             "critic prompt": prompts.render_prompt(tokenizer, prompts.critic_messages(question, answer, answer)),
             "expert target": target,
             "target read back": prompts.completion_decoder(tokenizer)(target),
             "turn ends": end_token_ids(hf_model, tokenizer)}
    return {name: hashlib.sha256(json.dumps(value).encode()).hexdigest()[:12] for name, value in parts.items()}


def save(r: Run, step: int) -> None:
    state = {"step": step, "replay": r.replay.state_dict(), "examples_consumed": step * r.cfg.raro.questions_per_step,
             "data_sha256": r.data_sha256, "tokens_sha256": r.tokens_sha256,
             "initial_weights_sha256": r.initial_weights_sha256,
             "initial_model_files_sha256": r.initial_model_files_sha256,
             "world_size": r.d.world_size, "config": run_settings(r.cfg), "mode_state": dict(r.mode_state),
             # the stop after MAX_SKIPPED_IN_A_ROW counts skips before the checkpoint too, as an uninterrupted run does
             "skipped_in_a_row": r.skipped_in_a_row, "warned_uniform": r.warned_uniform}
    if r.d.is_main:  # the logs on disk up to this step before the checkpoint is
        r.log.sync()
        r.rollout_log.sync()
    checkpoint.save_checkpoint(r.cfg.train.output_dir, step, model=r.model, hf_model=r.hf_model, tokenizer=r.tokenizer,
                               optimizer=r.optimizer, trainer_state=state, d=r.d)
    if r.d.is_main:
        r.mode.saved(r)


def finish(r: Run) -> None:
    out = Path(r.cfg.train.output_dir)
    weights = full_state_dict(r.model)
    if r.d.is_main:
        save_pretrained_atomic(r.hf_model, r.tokenizer, out / "final_model", state_dict={k: v.cpu() for k, v in weights.items()})
        records = r.log.read()
        plot_curves(records, out / "curves.png", title=f"{r.cfg.train.mode} on {r.cfg.task.name}")
        print("\n" + summary_table(records) + "\n")
        print("\n".join(heldout_summary(records, r.cfg, problems=len(r.eval_examples))))
        print(f"metrics: {out / 'metrics.jsonl'}  curves: {out / 'curves.png'}  model: {out / 'final_model'}")
    barrier(r.d)


def heldout_summary(records: list[dict], cfg: JobConfig, *, problems: int) -> list[str]:
    """The run's last lines: the critic's signal and held-out accuracy, each against its start (step 0's, or the
    first step metrics.jsonl still has, said so: a resume can lose records)."""
    lines = [signal] if (signal := critic_signal(records, oracle=cfg.raro.critic == "oracle")) else []

    def logged(key: str) -> list[tuple[int, float | None]]:
        return [(x["step"], x[key]) for x in records if key in x]

    def start(first: tuple[int, float]) -> str:
        return f"start {first[1]:.3f}" if first[0] == 0 else f"first logged {first[1]:.3f}, at step {first[0]}"

    accs = logged("eval/heldout_accuracy")
    if not problems:  # said so: this used to read "the task has no verifier", under a line the verifier had made
        lines.append("held-out accuracy: none (no held-out problems)")
    elif not accs:  # found by review: an IndexError after a resume whose metrics were lost
        lines.append("held-out accuracy: none logged (metrics.jsonl holds no evaluation)")
    elif accs[-1][1] is None:
        lines.append(f"held-out accuracy: none (the {cfg.task.name} task has no verifier)")
    else:
        lines.append(f"held-out accuracy: {accs[-1][1]:.3f} ({start(accs[0])}) on {problems} problems: "
                     f"{round(accs[-1][1] * problems) - round(accs[0][1] * problems):+d} solved")
    sampled = [x for x in logged("eval/heldout_avg_at_n") if x[1] is not None]
    k = cfg.train.eval_samples
    if sampled:
        lines.append(f"held-out avg@{k} (mean accuracy of {k} samples per problem at temperature "
                     f"{cfg.rollout.temperature:g}): {sampled[-1][1]:.3f} ({start(sampled[0])})")
    picked = [x for x in logged("eval/heldout_tournament_at_n") if x[1] is not None]
    if len(picked) > 1:
        lines.append(f"held-out tournament@{k} (the critic picks one of the {k} samples, no verifier): "
                     f"{picked[-1][1]:.3f} ({start(picked[0])})")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Set-up.


def setup(cfg: JobConfig, d: Dist) -> Run:
    out = Path(cfg.train.output_dir)
    if cfg.model.liger_kernels and d.device.type != "cuda":  # before any model is built or warmed up
        raise ValueError("model.liger_kernels=true needs a CUDA GPU (Liger's kernels do not run on CPU)")
    compute_dtype = resolve_dtype(cfg.model.dtype, d.device)
    dtype_name = str(compute_dtype).removeprefix("torch.")
    # Saved as what `auto` became here, as rollout.backend is: a run started on a GPU (bfloat16) and resumed on a
    # CPU (float32) passed the settings check as "auto" both times, and trained on otherwise (found by review).
    cfg.model.dtype = dtype_name
    check_backend(cfg.rollout, d.device, dtype_name)
    task = make_task(cfg.task)
    if cfg.raro.critic == "oracle" and not task.has_verifier:
        raise ValueError(f"raro.critic=oracle replaces the critic's verdict by the task's verifier; the "
                         f"{cfg.task.name} task has none")
    if cfg.train.mode == "rlvr" and not task.has_verifier:  # every reward would be 0: nothing learnt, silently
        raise ValueError(f"train.mode=rlvr rewards an answer by the task's verifier; the {cfg.task.name} task has "
                         f"none (raro, sft, rationalization, rl_logit and dpo need no verifier)")
    train_examples, eval_examples = task.examples("train"), task.examples("heldout")
    if cfg.train.eval_size:
        eval_examples = eval_examples[: cfg.train.eval_size]
    digest = data_digest(train_examples, eval_examples)
    output_dir.prepare(cfg, delete=d.is_main)
    barrier(d)
    warn = print if d.is_main else (lambda _message: None)  # every rank looks; rank 0 speaks
    if unused := unused_warmup_settings(cfg):  # a config file may describe the warm-up its base had: only said
        warn(f"warning: {', '.join(unused)} unused: no warm-up runs (warmup.checkpoint_steps 0), model.path "
             f"{cfg.model.path!r} is trained as it is")
    resume_from = checkpoint.resume_point(out, warn=warn) if cfg.train.resume else None
    if cfg.train.resume and resume_from is None:
        warn(f"train.resume: no checkpoint in {checkpoint.checkpoint_root(out)}; starting the run again from step 0")
        if (out / "config.json").is_file() and not cfg.train.overwrite:
            # The run being started again is the one in this folder: a command with other settings used to replace
            # it silently (another task and seed over its metrics and config.json).
            try:
                saved = json.loads((out / "config.json").read_text())
            except (OSError, ValueError) as e:
                raise ValueError(f"train.resume: {out / 'config.json'} cannot be read ({e}); start a new run with "
                                 f"--train.overwrite true, or in another train.output_dir") from None
            check_resume_settings(cfg, saved, out / "config.json", out, warn)
    state = checkpoint.load_trainer_state(resume_from) if resume_from is not None else None
    if state is not None:
        check_resume_settings(cfg, state.get("config"), resume_from, out, warn)
        if cfg.train.steps < state["step"]:  # found by review: it trained nothing, and wrote the later weights
            # as the final model of a run of fewer steps
            raise ValueError(f"train.steps {cfg.train.steps}: {resume_from} is at step {state['step']} already, "
                             f"and a resume trains on from there; give train.steps >= {state['step']}")
        if d.is_main:  # the resume is accepted: what a kill in the last save's pruning kept goes now
            checkpoint.prune(resume_from.parent, resume_from)
    hf_model, tokenizer = initial_model(cfg, d, resume_from)
    check_context(cfg, tokenizer, hf_model.config, train_examples, eval_examples)
    tokens = tokens_digest(tokenizer, hf_model, train_examples[0]) if train_examples else {}
    if compute_dtype != torch.float32 and not d.enabled:
        print(f"model.dtype: the trainer computes in float32, not {dtype_name}: "
              "mixed precision comes from FSDP2, which needs a process group; start with torchrun for it "
              "(the rollout engine's copy uses the requested dtype either way)")
    own_copy = (engine_copy(hf_model, d.device, compute_dtype)
                if cfg.rollout.backend in ("embedded", "continuous") else None)  # in-process engines: their own copy
    engine = make_engine(cfg.rollout, own_copy, tokenizer, model_path=str(initial_model_dir(cfg, resume_from)),
                         dtype=dtype_name, device=d.device, rank=d.rank, seed=cfg.train.seed,
                         end_ids=end_token_ids(hf_model, tokenizer), positions=context_limit(hf_model.config))
    use_varlen_attention(hf_model)  # the trainer's copy only: the engine keeps sdpa for cached generation
    if cfg.model.liger_kernels:
        from raro_fast.model.liger import use_liger_kernels

        use_liger_kernels(hf_model)  # modules swapped from outside; the engine's copy above stays plain
    if cfg.model.gradient_checkpointing:
        hf_model.gradient_checkpointing_enable()
    hf_model.to(d.device)
    policy = PolicyModel(hf_model)
    model = parallelize(policy, policy.decoder_layers, d, compute_dtype=compute_dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                  weight_decay=cfg.optim.weight_decay)
    mode = make_mode(cfg.train.mode)
    ref_model = initial_sha = initial_files_sha = None
    if mode.needs_reference(cfg):
        ref_model = reference_model(cfg, d, compute_dtype, mode.reference_dir(cfg, resume_from))
        # A resume rebuilds the reference from the initial model's path: weights saved there again in between (an
        # SFT stage writing to the same folder) anchored the run to another model, silently. Rank 0 hashes.
        # So is a config or tokenizer changed there (found by review: a config.json with another rope_theta).
        initial = initial_model_dir(cfg, None)
        initial_sha, initial_files_sha = broadcast_object(d, (
            weights_digest(initial), model_files_digest(initial) if initial.is_dir() else None) if d.is_main else None)
    replay = ReplayBuffer(cfg.raro.replay_size)
    start, mode_state, skipped, warned = 0, {}, 0, False
    if state is not None:
        if state["world_size"] != d.world_size:
            raise ValueError(f"{resume_from}: saved with {state['world_size']} ranks; resume with the same number")
        if state.get("data_sha256", digest) != digest:  # a checkpoint from before digests has none
            raise ValueError(f"train.resume: {resume_from} was trained on other data than task.{cfg.task.name} gives "
                             f"now (its demonstrations or held-out problems changed: a data file grown or replaced?); "
                             f"resume with the run's data, or start a new run in another train.output_dir")
        changed = [f"{what} SHA-256 {now[:12]}... now, {then[:12]}... at the start"
                   for what, now, then in (("weights", initial_sha, state.get("initial_weights_sha256")),
                                           ("config and tokenizer files", initial_files_sha,
                                            state.get("initial_model_files_sha256")))
                   if now is not None and then is not None and now != then]  # an older checkpoint has none
        if changed:
            raise ValueError(f"train.resume: the model at {initial_model_dir(cfg, None)} is not the one the run started "
                             f"from ({'; '.join(changed)}), and "
                             f"train.mode {cfg.train.mode} rebuilds its reference model from it; put the run's initial "
                             f"model back there, or start a new run in another train.output_dir")
        if otherwise := [name for name, then in state.get("tokens_sha256", {}).items() if tokens.get(name) != then]:
            warn(f"warning: train.resume: {resume_from}: this run now makes other tokens of its data than it did "
                 f"before (the {', '.join(otherwise)} of its first demonstration differ: a raro-fast or transformers "
                 f"upgrade in between?); the steps from {state['step'] + 1} on are not the ones the uninterrupted "
                 f"run would have trained")
        checkpoint.restore_optimizer_and_rng(resume_from, model=model, optimizer=optimizer, d=d)
        for group in optimizer.param_groups:  # the command's hyperparameters, not the ones saved with the state
            group.update(lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                         weight_decay=cfg.optim.weight_decay)
        replay.load_state_dict(state["replay"])
        start, mode_state = state["step"], mode.resumed_state(state)
        skipped, warned = state.get("skipped_in_a_row", 0), state.get("warned_uniform", False)
        engine.weight_version = start
        warn(f"train.resume: continuing after step {start} from {resume_from}")
    first_sync(cfg.rollout, engine, model, version=start, dtype=compute_dtype)
    log = MetricsLog(out / "metrics.jsonl", enabled=d.is_main, resume_step=start if resume_from else None)
    # main=: cut back on every resume even with the log off now, or records of steps this run never trained stay
    rollout_log = MetricsLog(out / "rollouts.jsonl", enabled=d.is_main and cfg.train.log_rollouts_every > 0,
                             resume_step=start if resume_from else None, main=d.is_main)
    if resume_from is not None and d.is_main:
        lost = sorted(set(range(1, start + 1)) - set(log.kept_steps))
        if lost:  # the checkpoint reached the disk and these records did not (a power cut); the run goes on exactly
            warn(f"train.resume: {out / 'metrics.jsonl'} has no record of {len(lost)} step(s) up to the checkpoint's "
                 f"step {start} ({_spans(lost)}): their metrics are lost, and the curves and summary go without them")
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        # atomic: a config.json cut short broke a later --resume and the documented `--config out/config.json`
        write_text_atomic(out / "config.json", json.dumps(run_settings(cfg), indent=2))
    return Run(cfg=cfg, d=d, task=task, train_examples=train_examples, eval_examples=eval_examples, tokenizer=tokenizer,
               hf_model=hf_model, model=model, optimizer=optimizer, engine=engine, engine_dtype=compute_dtype,
               mode=mode, ref_model=ref_model, replay=replay, log=log, rollout_log=rollout_log, start_step=start,
               mode_state=mode_state, skipped_in_a_row=skipped, warned_uniform=warned, data_sha256=digest,
               tokens_sha256=tokens,
               initial_weights_sha256=initial_sha, initial_model_files_sha256=initial_files_sha,
               # main only: it alone warns, and another rank could read the file while main rewrites it
               first_entropy=first_logged_entropy(log.read()) if resume_from is not None and d.is_main else None)


def _spans(steps: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    spans, start = [], steps[0]
    for prev, cur in zip(steps, steps[1:] + [None]):
        if cur != prev + 1:
            spans.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = cur
    return ", ".join(spans)


def check_context(cfg: JobConfig, tokenizer, model_config, train: list, heldout: list) -> None:
    """Refuse at start what the engines would refuse mid-run: a prompt that, with the tokens sampled after it, runs
    past the model's positions (found by review: `--rollout.critic_max_new_tokens 480` on a 512-position model
    failed in step 1, after the step-0 evaluation and the policy's rollouts). Only the prompts a run samples from
    count: the evaluation's policy prompts, every mode's but SFT's training ones, rationalization's (with the
    expert's answer), the critic's in RARO (with the expert's answer, and the policy's empty) and in the
    evaluation's tournament (both answers empty). And the expert's sequences the supervised modes train on (SFT,
    DPO; in rl_logit and rationalization after up to `rollout.max_new_tokens` of the model's reasoning): past the
    positions, the trainer computed them silently (found by review). The
    examples longest in tokens stand for all (by characters, a short Chinese question of 536 tokens hid behind
    longer English ones: review); with answers left empty, only a certain failure is refused (the game leaves a
    pair the critic has no room for unjudged: `modes.raro.readable`).

    Then the same for `train.max_tokens_per_micro_batch`: a trained sequence the run can make that one micro-batch
    cannot hold stopped the run at packing, whenever a sample first ran that long (step 137, say). The bounds are
    a policy sequence's prompt and `rollout.max_new_tokens`, the critic's prompt with the expert's answer and its
    reply (a long policy answer beside it leaves the pair unjudged, as past the positions), the expert's sequence,
    and in rl_logit and rationalization a reasoning of up to `rollout.max_new_tokens` before the expert's answer
    (a reasoning that grows past it when rationalization tokenizes its text again falls back to none:
    `modes.rationalization`)."""
    limit = context_limit(model_config)
    mode = cfg.train.mode
    tournament = cfg.train.eval_tournament and cfg.train.eval_samples > 1
    policy, critic = cfg.rollout.max_new_tokens, cfg.rollout.critic_max_new_tokens
    everyone = {id(ex): ex for ex in train + heldout}
    texts = [t for ex in everyone.values() for t in (ex.question, ex.answer)]
    lengths = []  # in chunks, lengths only: one call on 100k rows held 3.7 GB of encodings (found by review)
    for i in range(0, len(texts), 2048):
        # special tokens' text split as targets and prompts split it (review: `<|im_end|>` x 60 counted 60 tokens,
        # not 540, and the row hid behind longer-looking ones)
        lengths += map(len, tokenizer(texts[i : i + 2048], add_special_tokens=False, split_special_tokens=True,
                                      return_attention_mask=False)["input_ids"])
    tokens = {key: (lengths[2 * i], lengths[2 * i + 1]) for i, key in enumerate(everyone)}
    question, both = (lambda ex: tokens[id(ex)][0]), (lambda ex: sum(tokens[id(ex)]))
    render = lambda messages: prompts.render_prompt(tokenizer, messages)  # noqa: E731
    policy_prompt = lambda ex: render(prompts.policy_messages(ex.question))  # noqa: E731
    critic_prompt = lambda ex: render(prompts.critic_messages(ex.question, ex.answer, ""))  # noqa: E731
    expert = lambda ex: policy_prompt(ex) + expert_completion_ids(tokenizer, ex.answer)  # noqa: E731

    # rl_logit scores, and rationalization trains, up to max_new_tokens of the model's reasoning before the expert's
    # answer (a bound a few tokens over: the expert's completion counts its own empty <think></think> too)
    reasoned = ("sequence of a reasoning before the expert's answer (the policy prompt, the sampled reasoning and the "
                "expert's completion)")

    def longest(ids, size, examples) -> tuple[int, object]:
        return max(((len(ids(ex)), ex) for ex in sorted(examples, key=size)[-8:]), key=lambda pair: pair[0])

    def where(ex) -> str:
        return ex.meta.get("source") or f"example {ex.id}"

    checks = [("rollout.max_new_tokens", policy, "policy prompt", policy_prompt,
               question, heldout + (train if mode != "sft" else [])),
              ("rollout.max_new_tokens", policy, "rationalization prompt (with the expert's answer)",
               lambda ex: render(prompts.rationalization_messages(ex.question, ex.answer)), both,
               train if mode == "rationalization" else []),
              ("rollout.critic_max_new_tokens", critic, "critic prompt (with the expert's answer, the policy's empty)",
               critic_prompt, both, train if mode == "raro" else []),
              ("rollout.critic_max_new_tokens", critic, "critic prompt (with both answers empty)",
               lambda ex: render(prompts.critic_messages(ex.question, "", "")), question, heldout if tournament else []),
              (None, 0, "expert's sequence (the policy prompt and the expert's completion)", expert,
               both, train if mode in ("sft", "dpo") else []),
              ("rollout.max_new_tokens", policy, reasoned, expert, both,
               train if mode in ("rl_logit", "rationalization") else [])]
    for setting, new_tokens, what, ids, size, examples in checks if limit is not None else []:
        if not examples:
            continue
        n, ex = longest(ids, size, examples)
        if n + new_tokens <= limit:
            continue
        if setting is None or n >= limit:  # no setting makes room: the row is too long for this model
            raise ValueError(f"{where(ex)}: its {what} has {n} tokens, past the model's {limit} positions "
                             "(max_position_embeddings) without a token more; leave it out of the data, or use a "
                             "model with a longer context")
        raise ValueError(f"{setting} {new_tokens}: the longest {what} has {n} tokens ({where(ex)}), and {new_tokens} "
                         f"more run past the model's {limit} positions (max_position_embeddings); lower {setting}, or "
                         "use a model with a longer context")
    budget = cfg.train.max_tokens_per_micro_batch
    trained = [("rollout.max_new_tokens", policy, "policy sequence (its prompt and the sampled completion)",
                policy_prompt, question, train if mode in ("raro", "rlvr", "dpo") else []),
               ("rollout.critic_max_new_tokens", critic, "critic sequence (its prompt with the expert's answer and "
                "the reply)", critic_prompt, both, train if mode == "raro" else []),
               (None, 0, "expert's sequence (the policy prompt and the expert's completion)", expert, both,
                train if mode in ("sft", "dpo") else []),
               ("rollout.max_new_tokens", policy, reasoned, expert, both,
                train if mode in ("rl_logit", "rationalization") else [])]
    packed = packed_length_limit(model_config)
    for setting, new_tokens, what, ids, size, examples in trained:
        if not examples:
            continue
        n, ex = longest(ids, size, examples)
        if n + new_tokens > budget:
            lower = f" or lower {setting}" if setting is not None and n < budget else ""
            raise ValueError(f"train.max_tokens_per_micro_batch {budget}: the longest {what} can have up "
                             f"to {n + new_tokens} tokens ({where(ex)}), more than one micro-batch holds; raise "
                             f"train.max_tokens_per_micro_batch{lower}")
        if packed is not None and n + new_tokens > packed[0]:
            lower = f"lower {setting}, or " if setting is not None and n < packed[0] else ""
            raise ValueError(f"model.path: the longest {what} can have up to {n + new_tokens} tokens ({where(ex)}), "
                             f"past {packed[0]}, {packed[1]}; {lower}use another model")


def first_sync(rollout: RolloutConfig, engine, model, *, version: int, dtype) -> None:
    """An SGLang server holds whatever it was started with or last given, a finished run's weights, say; found by
    review: the first step's rollouts came from them with no error (the version check starts after the first sync),
    and a resumed run was refused by a fresh server. The trainer's weights go in before the first rollout, at the
    step the run starts from. The other engines are built from the trainer's own weights."""
    if rollout.backend == "sglang_http":
        push_weights(engine, model, version=version, dtype=dtype, released=rollout.released_tags)


def first_logged_entropy(records: list[dict]) -> float | None:
    """The policy entropy of the run's first logged step: a resumed run compares against its start, not against
    the resumed step (a model that became uniform before the checkpoint would otherwise never be warned about)."""
    for rec in records:
        entropy = rec.get("policy/entropy")
        if isinstance(entropy, (int, float)) and math.isfinite(entropy):
            return float(entropy)
    return None


def check_resume_settings(cfg: JobConfig, saved: dict | None, resume_from: Path, out: Path, warn) -> None:
    """A resume continues the run saved with the settings `saved` (from `resume_from`: a checkpoint, or the run's
    config.json when it has none yet): refuse settings that would make it another run, and say which of the changes
    a resume may make (`checkpoint.RESUMABLE`) it makes."""
    if saved is None:
        warn(f"train.resume: {resume_from} does not record the run's settings; assuming they are this command's")
        return
    refused, allowed = checkpoint.resume_changes(saved, run_settings(cfg), defaults=run_settings(JobConfig()))
    if refused:
        raise ValueError(f"train.resume: {resume_from} was saved with other settings ({'; '.join(refused)}); a "
                         f"resume continues the same run, so give it that run's settings (they are in "
                         f"{out / 'config.json'}: --config {out / 'config.json'} --resume), or start a new run "
                         f"in another train.output_dir")
    if allowed:
        warn(f"train.resume: changed from the saved run: {'; '.join(allowed)}")


def reference_model(cfg: JobConfig, d: Dist, compute_dtype: torch.dtype, path: Path | None = None) -> PolicyModel:
    """A frozen copy of the run's initial model (the KL anchor; DPO's first reference), or of the model in `path`,
    sharded like the trained one. On resume it is the same initial model again, not the checkpoint."""
    hf, _ = (load_pretrained(str(path), dtype=torch.float32, setting="train.resume (the DPO reference)") if path
             else initial_model(cfg, d, resume_from=None))
    use_varlen_attention(hf)
    hf.requires_grad_(False)
    ref = PolicyModel(hf.to(d.device)).eval()
    return parallelize(ref, ref.decoder_layers, d, compute_dtype=compute_dtype)


def initial_model(cfg: JobConfig, d: Dist, resume_from: Path | None):
    """fp32 master weights: from a checkpoint, a real model directory, or a warmed-up base (the embedded default, or
    a real model given `warmup.checkpoint_steps`: warmed up once on rank 0, saved under output_dir/base_model, then
    loaded by every rank)."""
    if resume_from is not None or not output_dir.uses_base(cfg):
        setting = "model.path" if resume_from is None else "train.resume (the checkpoint's model)"
        return load_pretrained(str(initial_model_dir(cfg, resume_from)), dtype=torch.float32, setting=setting)
    base = initial_model_dir(cfg, None)
    if d.is_main and not (base / "config.json").is_file():
        model, tokenizer, warmup = base_to_warm_up(cfg)
        model.to(d.device)
        rates = functools.partial(format_rates, model, tokenizer, make_task(cfg.task).examples("train"),
                                  max_new_tokens=cfg.rollout.max_new_tokens,
                                  critic_max_new_tokens=cfg.rollout.critic_max_new_tokens)
        before = rates()
        format_warmup(model, tokenizer, cfg.task.countdown, warmup, device=d.device, progress=cfg.train.progress)
        rates = {"before": before, "after": rates()}
        print("format warm-up: answers in format (greedy, 16 training questions): policy {before[policy]:.2f} -> "
              "{after[policy]:.2f}, critic verdicts {before[critic]:.2f} -> {after[critic]:.2f}".format(**rates))
        save_pretrained_atomic(model.cpu(), tokenizer, base, extra_files={
            **output_dir.recipe_file(cfg), output_dir.FORMAT_RATES_FILE: json.dumps(rates, indent=2) + "\n"})
    barrier(d)
    return load_pretrained(str(base), dtype=torch.float32, setting="train.output_dir (its warmed-up base_model)")


def base_to_warm_up(cfg: JobConfig):
    """The model the warm-up starts from, its tokenizer, and the warm-up settings for it."""
    if cfg.model.path:
        model, tokenizer = load_pretrained(cfg.model.path, dtype=torch.float32, setting="model.path")
        return model, tokenizer, dataclasses.replace(cfg.warmup, steps=cfg.warmup.checkpoint_steps,
                                                     lr=cfg.warmup.checkpoint_lr)
    tokenizer = load_project_tokenizer()
    e = cfg.model.embedded
    model = build_embedded_model(tokenizer, hidden_size=e.hidden_size, num_layers=e.num_layers, num_heads=e.num_heads,
                                 num_kv_heads=e.num_kv_heads, intermediate_size=e.intermediate_size,
                                 max_position=e.max_position, seed=cfg.train.seed)
    return model, tokenizer, cfg.warmup


def initial_model_dir(cfg: JobConfig, resume_from: Path | None) -> Path:
    """Where the run's starting weights are on disk (SGLang engines load them from there)."""
    if resume_from is not None:
        return resume_from / "model"
    if output_dir.uses_base(cfg):
        return Path(cfg.train.output_dir) / "base_model"
    return Path(resolve_model_path(cfg.model.path, "model.path"))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_command_line(sys.argv[1:] if argv is None else argv, PROG)
    return cfg if isinstance(cfg, int) else train_from_config(cfg)


def train_from_config(cfg: JobConfig) -> int:
    """The command's run of a parsed config (main's, and the entry points' that parsed it before the imports)."""
    try:
        d = init_distributed(half_precision=resolve_dtype(cfg.model.dtype, torch.device("cpu")) != torch.float32)
    except ValueError as e:  # a launch without torchrun's variables, more ranks than GPUs
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(cfg.train.seed)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # our own bar says what is happening
    try:
        run(setup(cfg, d))  # nothing here keeps the run (and its sharded models) alive into shutdown()
    except ValueError as e:  # user mistakes found at start (bad model path, bad data): one clear line
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # DivergedError, NonFiniteLogitsError: stopped before saving a broken model
        print(f"error: the run diverged: {e}; {divergence_hint(cfg)}", file=sys.stderr)
        return 3
    finally:
        shutdown(d)
    return 0


if __name__ == "__main__":
    sys.exit(train_from_config(_COMMAND_LINE))  # parsed at the top, before the imports
