"""Baselines on the shared trainer: SFT through the clipped-surrogate update is exactly NLL on the expert
answers; RLVR's rewards are the verifier's, with GRPO groups."""
import random

import pytest
import torch

from raro_fast.baselines import rlvr_rollouts, sft_samples
from raro_fast.config import LossConfig, load_config
from raro_fast.model.hf import build_embedded_model, load_project_tokenizer
from raro_fast.model.policy import PolicyModel
from raro_fast.model.varlen import use_varlen_attention
from raro_fast.packing import plan_micro_batches
from raro_fast.tasks import get_task
from raro_fast.update import recompute_logprobs, update_step
from test_raro_game import ScriptedEngine


@pytest.fixture(scope="module")
def setting():
    cfg = load_config(["--raro.group_size", "4", "--task.num_train", "30", "--task.num_heldout", "5"])
    return cfg, load_project_tokenizer(), get_task("countdown", cfg.task)


def test_sft_update_gradient_is_nll_gradient(setting):
    cfg, tok, task = setting
    examples = task.examples("train")[:5]
    samples = sft_samples(examples, tokenizer=tok).samples
    for uid, s in enumerate(samples):
        s.uid = uid
    model = build_embedded_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                                 max_position=256, seed=0)
    use_varlen_attention(model)
    policy = PolicyModel(model)
    mbs = plan_micro_batches(samples, max_tokens_per_micro_batch=256, world_size=1, rank=0)
    recompute_logprobs(policy, mbs, temperature=1.0)
    opt = torch.optim.SGD(policy.parameters(), lr=0.0)  # lr 0: read the gradient, leave the weights
    update_step(policy, opt, mbs, loss_cfg=LossConfig(loss_agg="token_mean"), temperature=1.0, norm_constant=1.0,
                grad_clip=0.0)
    g_update = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()
    nll = sum(-(policy(mb)[0] * (mb.targets != -100)).sum() for mb in mbs) / mbs[0].num_tokens
    nll.backward()
    for n, p in policy.named_parameters():
        torch.testing.assert_close(g_update[n], p.grad, rtol=1e-5, atol=1e-7)
    # The expert completion is the answer only, in the policy format.
    text = tok.decode(samples[0].input_ids[samples[0].prompt_len :], skip_special_tokens=True)
    assert text == f"<think></think><answer>{examples[0].answer}</answer>"


def test_rlvr_rewards_are_the_verifiers(setting):
    cfg, tok, task = setting
    examples = [e for e in task.examples("train") if sum(e.meta["numbers"]) != 24][:2]
    out = rlvr_rollouts(examples, engine=ScriptedEngine(tok, task), tokenizer=tok, task=task, cfg=cfg, seed=0)
    # Scripted samples per question: expert (1), wrong (0), no tag (0), truncated expert (0: truncated counts as no answer).
    assert out.stats["reward/policy_mean"] == [1.0, 0.0, 0.0, 0.0] * 2
    advs = [s.advantage for s in out.samples]
    assert advs == pytest.approx([0.75, -0.25, -0.25] * 2)  # truncated sample filtered from the loss
    assert all(s.role == "policy" and s.loss_weight == 1.0 for s in out.samples)
