"""Iterative DPO: every step, each policy sample that is not the expert answer itself is paired with the expert
completion (chosen ≻ rejected); the reference is the policy at the start of the round. With one gradient step per
batch, DPO's gradient is exactly the clipped-surrogate update's at ratio 1 with sequence advantages +w for the chosen
and -w for the rejected, w = beta·sigmoid(-beta·margin), summed over tokens and divided by the number of pairs
(`dpo_advantages`), so DPO too runs through the fused loss and the packed update."""
from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import torch

from raro_fast import checkpoint
from raro_fast.config import DpoConfig, JobConfig, LossConfig
from raro_fast.distributed import Dist, barrier
from raro_fast.model.hf import save_pretrained_atomic
from raro_fast.modes.base import Mode, RankRollout, Trainer, expert_completion_ids, policy_groups, sequence_sums
from raro_fast.packing import SequenceSample
from raro_fast.rollout.engine import RolloutEngine
from raro_fast.tasks.base import Example, Task
from raro_fast.weight_sync import full_state_dict


def dpo_pairs(examples: list[Example], *, engine: RolloutEngine, tokenizer, task: Task, cfg: JobConfig, seed: int,
              group_offset: int) -> RankRollout:
    """(expert ≻ policy sample) pairs, the chosen then the rejected member of each, `group` = a pair id unique over
    ranks. A truncated sample, or one whose answer is the expert's own, makes no pair."""
    out = RankRollout()
    if not examples:
        return out
    policy = out.generated(policy_groups(examples, engine=engine, tokenizer=tokenizer, cfg=cfg, seed=seed))
    pair = group_offset
    for ex, comps in zip(examples, policy):
        expert = expert_completion_ids(tokenizer, ex.answer)
        for c in comps:
            answer = task.final_answer(c.text, c.truncated)
            paired = not c.truncated and (answer is None or answer.strip() != ex.answer.strip())
            out.add("policy/truncated_rate", c.truncated)
            out.add("policy/answer_rate", answer is not None)
            out.add("policy/response_length", len(c.token_ids))
            verdict = task.verify(ex, answer)
            if verdict is not None:  # logged only; DPO never sees it
                out.add("policy/answer_accuracy", verdict)
            out.add("dpo/pair_rate", paired)
            if not paired:
                continue
            prompt = list(c.prompt_ids)
            # Temperature 1 for both, policy and reference: DPO compares the models' own likelihoods, and the
            # expert's answer was never sampled (at rollout.temperature 0.5 the margins and gradient were twice as
            # large, as SFT's were).
            out.samples.append(SequenceSample(input_ids=prompt + expert, prompt_len=len(prompt), advantage=0.0,
                                              role="policy", group=pair, uid=-1, preference=1, temperature=1.0))
            out.samples.append(SequenceSample(input_ids=prompt + list(c.token_ids), prompt_len=len(prompt), advantage=0.0,
                                              role="policy", group=pair, uid=-1, preference=-1, temperature=1.0,
                                              weight_version=c.weight_version))
            pair += 1
    return out


def dpo_advantages(samples: list[SequenceSample], mbs, *, d: Dist, beta: float) -> tuple[int, dict[str, float | None]]:
    """Write DPO's per-sequence advantages into the packed micro-batches (after old and reference log-probs are
    recomputed) and into `samples` (what rollouts.jsonl shows), and return (number of pairs, metrics). Sequence
    log-prob sums are added over ranks first, so every rank writes the same values."""
    device = d.device
    n = len(samples)
    policy_sum, ref_sum = sequence_sums(mbs, n, ["old_logprobs", "ref_logprobs"], d=d)
    members: dict[int, dict[int, int]] = {}
    for s in samples:
        members.setdefault(s.group, {})[s.preference] = s.uid
    if any(set(m) != {1, -1} for m in members.values()):
        raise ValueError("dpo: every pair needs exactly one chosen and one rejected sequence")
    chosen = torch.tensor([m[1] for m in members.values()], dtype=torch.long, device=device)
    rejected = torch.tensor([m[-1] for m in members.values()], dtype=torch.long, device=device)
    log_ratio = policy_sum - ref_sum
    margin = log_ratio[chosen] - log_ratio[rejected]
    weight = beta * torch.sigmoid(-beta * margin)
    adv = torch.zeros(n, dtype=torch.float64, device=device)
    adv[chosen], adv[rejected] = weight, -weight
    for mb in mbs:
        if not mb.is_padding:
            mb.advantages = torch.where(mb.targets != -100, adv[mb.uids[mb.seq_ids]].float(), 0.0)
    per_uid = adv.tolist()
    for s in samples:
        s.advantage = per_uid[s.uid]
    pairs = len(members)
    metrics = {
        "dpo/loss": float(-torch.nn.functional.logsigmoid(beta * margin).mean()) if pairs else None,
        "dpo/margin": float(margin.mean()) if pairs else None,
        "dpo/accuracy": float((margin > 0).double().mean()) if pairs else None,
        "dpo/pairs": pairs,
    }
    return pairs, metrics


# The rounds are fixed when the run starts and kept in the trainer state (`Run.mode_state`, saved with every
# checkpoint). A resume may change train.steps (checkpoint.RESUMABLE: extending a run is the usual reason to resume),
# and rounds recomputed from the new value move every round boundary: the resumed run would load the reference of
# another round, or none, and refresh it at steps the saved run never did. Refusing the change for DPO would also be
# exact, but would make a DPO run the one kind that cannot be extended; with the split kept, extending just goes on
# with rounds of the same lengths (more than dpo.rounds of them), and the steps already trained keep their references.
ROUND_SPLIT = "dpo_round_split"  # {"steps": train.steps, "rounds": dpo.rounds} of the run's start
# Runs saved before the split was exact kept a fixed length, ceil(train.steps / dpo.rounds), which could make fewer
# rounds than asked (10 steps, 6 rounds: 5); they resume with the length they ran with.
ROUND_LENGTH = "dpo_round_length"


def kept_rounds(cfg: JobConfig, mode_state: dict, step: int) -> dict:
    """The `mode_state` entry that fixes the rounds of a run at `step`: the saved one, else the split of a run that
    starts now (step 0), else (a checkpoint from before the rounds were kept) the length that run used."""
    for key in (ROUND_SPLIT, ROUND_LENGTH):
        if key in mode_state:
            return {key: mode_state[key]}
    if step == 0:
        return {ROUND_SPLIT: {"steps": cfg.train.steps, "rounds": cfg.dpo.rounds}}
    return {ROUND_LENGTH: max(1, math.ceil(cfg.train.steps / cfg.dpo.rounds))}


def round_start(kept: dict, step: int) -> int:
    """The first step of the round that `step` is in, under the rounds `kept` (from `kept_rounds`). Round k of a
    split starts at ceil(k·steps / rounds): exactly `rounds` rounds whose lengths differ by at most one step (no
    more rounds than steps), and the same pattern past the end for a run extended on resume."""
    if ROUND_SPLIT in kept:
        steps, rounds = kept[ROUND_SPLIT]["steps"], kept[ROUND_SPLIT]["rounds"]
        k = step * rounds // steps  # the last round whose start, ceil(k·steps / rounds), is at or before `step`
        return -(-k * steps // rounds)
    length = int(kept[ROUND_LENGTH])
    return step // length * length


class DpoMode(Mode):
    name = "dpo"
    plans_with_old_logprobs = True  # the pairs' log-ratios against the reference are its advantages

    def needs_reference(self, cfg: JobConfig) -> bool:
        return True

    def reference_dir(self, cfg: JobConfig, resume_from: Path | None) -> Path | None:
        """The saved reference of the round a resumed run is in (None: round 1's is the initial model, or the run
        resumes exactly at a round start, where `start_step` refreshes it anyway)."""
        if resume_from is None:
            return None
        state = checkpoint.load_trainer_state(resume_from)
        step = state["step"]
        start = round_start(kept_rounds(cfg, self.resumed_state(state), step), step)
        if start == 0 or start == step:
            return None
        path = Path(cfg.train.output_dir) / "dpo_reference" / f"step_{start:06d}"
        if not (path / "config.json").is_file():
            raise ValueError(f"{path}: the DPO reference of the round starting at step {start} is missing; cannot resume exactly")
        return path

    def resumed_state(self, state: dict) -> dict:
        """A checkpoint saved before the rounds were kept has the round length its run used: from the train.steps
        it was saved with, not this command's (an extended run moved its round boundaries: found by review)."""
        kept = super().resumed_state(state)
        saved = state.get("config") or {}
        if not kept and state.get("step", 0) > 0 and "steps" in saved.get("train", {}):
            rounds = saved.get("dpo", {}).get("rounds", DpoConfig().rounds)
            kept[ROUND_LENGTH] = max(1, math.ceil(saved["train"]["steps"] / rounds))
        return kept

    def start_step(self, r: Trainer, step: int) -> None:
        """A new round: the reference becomes the current policy, and is saved so a resumed run finds it. The rounds
        are fixed at the run's first step (a resumed run has them from its checkpoint)."""
        r.mode_state.update(kept_rounds(r.cfg, r.mode_state, step))
        if step == 0 or round_start(r.mode_state, step) != step:
            return
        r.ref_model.load_state_dict(r.model.state_dict())
        weights = full_state_dict(r.model)
        if r.d.is_main:
            save_pretrained_atomic(r.hf_model, r.tokenizer, Path(r.cfg.train.output_dir) / "dpo_reference" / f"step_{step:06d}",
                                   state_dict={k: v.cpu() for k, v in weights.items()})
        barrier(r.d)

    def saved(self, r: Trainer) -> None:
        """Keep the saved references that a kept checkpoint resumes with (`reference_dir`'s rule) and delete the
        rest: one full model per round, none ever deleted, grew the run's folder by a model a round (found by
        review)."""
        out = Path(r.cfg.train.output_dir)
        steps = [checkpoint.step_number(c) for c in checkpoint.step_folders(checkpoint.checkpoint_root(out))]
        needed = {f"step_{start:06d}" for c in steps if (start := round_start(r.mode_state, c)) not in (0, c)}
        for folder in (out / "dpo_reference").glob("step_*"):
            if folder.name not in needed:
                shutil.rmtree(folder, ignore_errors=True)

    def rollouts(self, r: Trainer, examples: list[Example], *, step: int, seed: int) -> RankRollout:
        cfg = r.cfg
        return dpo_pairs(examples, engine=r.engine, tokenizer=r.tokenizer, task=r.task, cfg=cfg, seed=seed,
                         group_offset=r.d.rank * cfg.raro.questions_per_step * cfg.raro.group_size)

    def policy_sequences(self, cfg: JobConfig) -> int:
        return 2 * cfg.raro.questions_per_step * cfg.raro.group_size

    def loss_plan(self, r: Trainer, samples: list[SequenceSample], plan: list[tuple[list, float]],
                  stats: dict) -> tuple[LossConfig, list[tuple[list, float]]]:
        """DPO as the surrogate at ratio 1: summed over tokens, averaged over pairs."""
        mbs = [mb for part, _ in plan for mb in part]
        pairs, dpo_stats = dpo_advantages(samples, mbs, d=r.d, beta=r.cfg.dpo.beta)
        stats.update(dpo_stats)
        return dataclasses.replace(r.cfg.loss, loss_agg="token_sum_norm"), [(mbs, float(max(pairs, 1)))]
