"""How much of RARO's policy advantage is about correctness, and how much is the critic's noise: every policy answer
on the first Q training questions is judged K times (K = 16 by default) against the expert's answer, nothing is
trained, and the K verdicts are then subsampled to k = 1, 2, 4, ... to show what `raro.critic_samples_per_pair = k`
would give.

    python experiments/reward_signal.py MODEL_DIR [--questions Q] [--verdicts K] [training settings ...] [--out F.json]

For each k it reports the correlation over all answers between the GRPO advantage (the answer's mean reward minus
its group's mean, as in training) and the verifier's verdict on the answer (the verifier is used only here, to
measure), averaged over 20 random subsamples; a sample with no answer is not judged and counts with reward 0, as in
training. The oracle critic's correlation (tau_pol for a right answer, 0 otherwise) is the ceiling. It also splits the
variance of wrong answers' rewards into the part that more verdicts remove (sampling: within-answer variance / k) and
the part they do not (the critic's systematic preferences among wrong answers), and compares the reward of right
answers written exactly as the expert wrote them with that of right answers in another form. With --out F.json it also
writes F.rows.json: one row per policy sample (its text, answer, failure and rewards), to read what the policy writes.
Used for docs/experiments.md, sections 9, 10, 13 and 14."""
from __future__ import annotations

import json
import random
import statistics
import sys
import time

import torch

from raro_fast import prompts
from raro_fast.config import load_config
from raro_fast.model.hf import load_pretrained
from raro_fast.modes.raro import answers_to_judge, judge_pairs
from raro_fast.rewards import group_advantages, mean_or_none, verdict_rewards
from raro_fast.rollout.embedded import EmbeddedEngine
from raro_fast.rollout.engine import SamplingParams
from raro_fast.modes.base import RankRollout
from raro_fast.tasks import countdown, make_task

QUESTIONS_PER_CALL = 8
SUBSAMPLES = 20


def _pop(argv: list[str], flag: str, default):
    if flag not in argv:
        return default, argv
    i = argv.index(flag)
    return type(default)(argv[i + 1]) if default is not None else argv[i + 1], argv[:i] + argv[i + 2:]


def _corr(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3 or statistics.pstdev(xs) == 0 or statistics.pstdev(ys) == 0:
        return None
    return statistics.correlation(xs, ys)


def judge_all(model_dir: str, cfg, questions: int, verdicts: int) -> list[dict]:
    """One row per policy sample: its group, whether it verifies, and its K per-verdict policy rewards (None for an
    invalid verdict); a sample without an answer has no verdicts (reward 0, as in training)."""
    rc, ro = cfg.raro, cfg.rollout
    model, tokenizer = load_pretrained(model_dir, dtype=torch.float32, setting="reward_signal MODEL_DIR")
    engine = EmbeddedEngine.from_tokenizer(model.eval(), tokenizer, batch_size=64)
    task = make_task(cfg.task)
    train = task.examples("train")[:questions]
    rng, rows = random.Random(cfg.train.seed), []
    critic_t = ro.temperature if ro.critic_temperature is None else ro.critic_temperature
    for start in range(0, len(train), QUESTIONS_PER_CALL):
        batch = train[start:start + QUESTIONS_PER_CALL]
        pol = SamplingParams(max_new_tokens=ro.max_new_tokens, temperature=ro.temperature, top_p=ro.top_p,
                             n=rc.group_size, seed=1000 + start)
        crit = SamplingParams(max_new_tokens=ro.critic_max_new_tokens, temperature=critic_t, top_p=ro.top_p,
                              n=verdicts, seed=2000 + start)
        policy = engine.generate([prompts.render_prompt(tokenizer, prompts.policy_messages(ex.question))
                                  for ex in batch], pol)
        judged = answers_to_judge(batch, policy, task, rng, RankRollout())
        by_sample = {(jd.question, jd.sample): (jd, comps) for jd, comps in zip(judged, judge_pairs(judged, engine,
                                                                                              tokenizer, crit))}
        for i, (ex, comps) in enumerate(zip(batch, policy)):
            for j, c in enumerate(comps):
                answer = task.final_answer(c.text, c.truncated)
                row = {"group": start + i, "correct": bool(task.verify(ex, answer)), "rewards": None,
                       "answer": answer, "expert": ex.answer, "text": c.text, "truncated": c.truncated,
                       "failure": _countdown_failure(ex, answer) if "numbers" in ex.meta else None}
                if (i, j) in by_sample:
                    jd, vs = by_sample[(i, j)]
                    row["rewards"] = [verdict_rewards(None if v.truncated else prompts.parse_verdict(v.text),
                                                      jd.expert_position, tau_pol=rc.tau_pol, tau_crit=rc.tau_crit,
                                                      invalid=rc.invalid_verdicts)[0] for v in vs]
                rows.append(row)
        print(f"judged {min(start + QUESTIONS_PER_CALL, len(train))}/{len(train)} questions", file=sys.stderr)
    return rows


def _countdown_failure(ex, answer: str | None) -> str | None:
    """Why a Countdown answer fails, in a word or two: "parse" (no answer, or not an expression), "numbers, hits
    target" / "numbers, misses target" (a number missing, repeated or not given), "value" (the right numbers, the
    wrong value), "divides by zero" (the right numbers, no value), None if it solves."""
    if answer is None:
        return "parse"
    _node, reason = countdown._check(tuple(ex.meta["numbers"]), ex.meta["target"], answer)
    if reason is None:
        return None
    if reason.startswith(("uses", "does not use")):
        hits = countdown.evaluate(answer) == ex.meta["target"]
        return "numbers, hits target" if hits else "numbers, misses target"
    if reason == "divides by zero":  # an expression that parses: "parse" hid it among answers that do not
        return "divides by zero"
    return "value" if reason.startswith("makes") else "parse"


def _advantage_correlation(rows: list[dict], reward_of) -> float | None:
    groups: dict[int, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    adv, correct = [], []
    for members in groups.values():
        rewards = [reward_of(r) for r in members]
        adv += group_advantages(rewards, [0] * len(rewards))
        correct += [float(r["correct"]) for r in members]
    return _corr(adv, correct)


def report(rows: list[dict], verdicts: int, tau_pol: float) -> dict:
    rng = random.Random(0)
    out: dict = {"answers": len(rows), "judged": sum(r["rewards"] is not None for r in rows),
                 "accuracy": round(sum(r["correct"] for r in rows) / len(rows), 3)}
    oracle = _advantage_correlation(rows, lambda r: (tau_pol if r["correct"] else 0.0)
                                    if r["rewards"] is not None else 0.0)
    out["advantage_correctness_corr"] = {"oracle": None if oracle is None else round(oracle, 3)}
    k = 1
    while k <= verdicts:
        cs = [_advantage_correlation(rows, lambda r, k=k: 0.0 if r["rewards"] is None
                                     else mean_or_none(rng.sample(r["rewards"], k)))
              for _ in range(SUBSAMPLES if k < verdicts else 1)]
        cs = [c for c in cs if c is not None]
        out["advantage_correctness_corr"][f"k={k}"] = round(statistics.fmean(cs), 3) if cs else None
        k *= 2
    wrong = [[x for x in r["rewards"] if x is not None] for r in rows if r["rewards"] is not None and not r["correct"]]
    wrong = [w for w in wrong if len(w) >= 2]
    right = [mean_or_none(r["rewards"]) for r in rows if r["rewards"] is not None and r["correct"]]
    if wrong:
        within = statistics.fmean(statistics.variance(w) for w in wrong)  # per verdict
        means = [statistics.fmean(w) for w in wrong]
        n_mean = statistics.fmean(len(w) for w in wrong)
        systematic = max(statistics.variance(means) - within / n_mean, 0.0) if len(means) > 1 else 0.0
        out["wrong_answers"] = {"n": len(wrong), "mean_reward": round(statistics.fmean(means), 3),
                                "verdict_variance_within_answer": round(within, 4),
                                "variance_between_answers_systematic": round(systematic, 4)}
    by_failure = _mean_reward_by(rows, lambda r: None if r["correct"] else r.get("failure"))
    if by_failure:
        out["wrong_answers_by_failure"] = by_failure
    right = [x for x in right if x is not None]
    if right:
        out["right_answers"] = {"n": len(right), "mean_reward": round(statistics.fmean(right), 3)}
    # A critic that learned the expert's wording pays a right answer written the expert's way more than one
    # written another way; a critic that checks answers pays them alike.
    by_form = _mean_reward_by(rows, lambda r: None if not r["correct"] or "expert" not in r else (
        "same_text_as_expert" if _squeeze(r["answer"]) == _squeeze(r["expert"]) else "other_form"))
    if by_form:
        out["right_answers_by_form"] = by_form
    return out


def _mean_reward_by(rows: list[dict], key_of) -> dict:
    """{key: {n, mean_reward}} over the judged rows with a valid verdict, grouped by `key_of(row)` (None: left out)."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        key = key_of(r) if r["rewards"] is not None else None
        m = mean_or_none(r["rewards"]) if key is not None else None
        if m is not None:
            groups.setdefault(key, []).append(m)
    return {k: {"n": len(v), "mean_reward": round(statistics.fmean(v), 3)} for k, v in sorted(groups.items())}


def _squeeze(text: str | None) -> str:
    return "".join((text or "").split())


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__)
        return 2
    model_dir, rest = argv[0], argv[1:]
    out_path, rest = _pop(rest, "--out", "")
    questions, rest = _pop(rest, "--questions", 64)
    verdicts, rest = _pop(rest, "--verdicts", 16)
    t0 = time.perf_counter()
    try:
        cfg = load_config(rest)
        rows = judge_all(model_dir, cfg, questions, verdicts)
    except ValueError as e:  # a bad model directory or setting: one line naming it, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = report(rows, verdicts, cfg.raro.tau_pol)
    result["seconds"] = round(time.perf_counter() - t0)
    text = json.dumps(result, indent=1)
    print(text)
    if out_path:
        with open(out_path, "w") as f:
            f.write(text + "\n")
        with open(out_path.removesuffix(".json") + ".rows.json", "w") as f:
            json.dump(rows, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
