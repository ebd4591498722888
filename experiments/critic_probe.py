"""How much signal a base's critic gives before any RARO step: every training demonstration is played once
(`raro_rollouts`: the policy's samples, each judged against the expert's answer), nothing is trained, and the RARO
statistics are pooled over all of them — about 800 judged answers on the default task instead of one step's 32.

    python experiments/critic_probe.py BASE_MODEL_DIR [training settings ...] [--out FILE.json]

Prints (and with --out writes) the critic's decisive accuracy, its agreement with the verifier, the policy reward of
right and wrong answers and their gap; BASE_MODEL_DIR_critic_samples.txt holds the critic's first completions to
read what it gets wrong. Used for the warm-up table in docs/experiments.md."""
from __future__ import annotations

import json
import random
import sys
import time

import torch

from raro_fast.config import load_config
from raro_fast.model.hf import load_pretrained
from raro_fast.modes.raro import raro_rollouts
from raro_fast.prompts import completion_decoder
from raro_fast.rollout.embedded import EmbeddedEngine
from raro_fast.tasks import make_task

KEYS = ("policy/answer_accuracy", "critic/decisive_accuracy", "critic/oracle_agreement", "critic/tie_rate",
        "critic/invalid_rate", "reward/policy_mean_correct", "reward/policy_mean_incorrect")
QUESTIONS_PER_CALL = 10
SAMPLES_KEPT = 400


def probe(base: str, argv: list[str]) -> tuple[dict, list[str]]:
    cfg = load_config(argv)
    model, tokenizer = load_pretrained(base, dtype=torch.float32, setting="critic_probe BASE_MODEL_DIR")
    engine = EmbeddedEngine.from_tokenizer(model.eval(), tokenizer, batch_size=64)
    task = make_task(cfg.task)
    train = task.examples("train")
    rng, pooled, samples = random.Random(cfg.train.seed), {}, []
    decode = completion_decoder(tokenizer)  # the format's tags kept where the tokenizer marks them special
    t0 = time.perf_counter()
    for start in range(0, len(train), QUESTIONS_PER_CALL):
        out = raro_rollouts(train[start : start + QUESTIONS_PER_CALL], engine=engine, tokenizer=tokenizer, task=task,
                            cfg=cfg, rng=rng, seed=1000 + start, fresh_cap=None, draw_replay=lambda n: [])
        for key, values in out.stats.items():
            pooled.setdefault(key, []).extend(values)
        samples += [decode(s.input_ids).replace("\n", " | ")
                    for s in out.samples if s.role == "critic"][: SAMPLES_KEPT - len(samples)]
    report = {k: round(sum(pooled[k]) / len(pooled[k]), 3) if pooled.get(k) else None for k in KEYS}
    right, wrong = report["reward/policy_mean_correct"], report["reward/policy_mean_incorrect"]
    report["reward/policy_gap"] = None if right is None or wrong is None else round(right - wrong, 3)
    report["judged_right"] = len(pooled.get("reward/policy_mean_correct", []))
    report["judged_wrong"] = len(pooled.get("reward/policy_mean_incorrect", []))
    report["seconds"] = round(time.perf_counter() - t0)
    return report, samples


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__)
        return 2
    base, rest = argv[0], argv[1:]
    out = None
    if "--out" in rest:
        i = rest.index("--out")
        out, rest = rest[i + 1], rest[:i] + rest[i + 2 :]
    report, samples = probe(base, rest)
    text = json.dumps(report, indent=1)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    with open(base.rstrip("/") + "_critic_samples.txt", "w") as f:
        f.write("\n".join(samples) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
