"""The update: each role normalised by its own constant (lambda_pol J_pol + lambda_crit J_crit as written), the KL
penalty outside the role weights, and PPO mini-batches (k optimizer steps; k = 1 is the single update)."""
import copy
import json
import math
import os
import subprocess
import sys
import typing

import pytest
import torch

from raro_fast.config import LossConfig, load_config
from raro_fast.model.hf import build_embedded_model, load_project_tokenizer
from raro_fast.model.policy import PolicyModel
from raro_fast.model.varlen import use_varlen_attention
from raro_fast.packing import SequenceSample, plan_micro_batches
from raro_fast.modes import make_mode
from raro_fast.update import recompute_logprobs, split_mini_batches, update_mini_batches, update_step, weigh_roles


@pytest.fixture(scope="module")
def tok():
    return load_project_tokenizer()


def tiny_policy(tok, seed=0):
    model = build_embedded_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                                 max_position=256, seed=seed)
    use_varlen_attention(model)
    return PolicyModel(model)


def mixed_samples(n_policy=6, n_critic=10, seed=0):
    """Policy sequences with short completions, critic sequences with long ones, random advantages."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_policy + n_critic):
        role = "policy" if i < n_policy else "critic"
        prompt = torch.randint(5, 200, (int(torch.randint(4, 9, (1,), generator=g)),), generator=g).tolist()
        length = int(torch.randint(3, 8 if role == "policy" else 20, (1,), generator=g))
        completion = torch.randint(5, 200, (length,), generator=g).tolist()
        out.append(SequenceSample(input_ids=prompt + completion, prompt_len=len(prompt),
                                  advantage=float(torch.randn((), generator=g)), role=role, group=i // 2, uid=i,
                                  loss_weight=1 / 9 if role == "policy" else 8 / 9))
    return out


def grads_of(policy, samples, *, loss_cfg, norm, lr=0.0):
    policy = copy.deepcopy(policy)
    mbs = plan_micro_batches(samples, max_tokens_per_micro_batch=64, world_size=1, rank=0)
    recompute_logprobs(policy, mbs, temperature=1.0)
    opt = torch.optim.SGD(policy.parameters(), lr=lr)
    stats = update_step(policy, opt, mbs, loss_cfg=loss_cfg, temperature=1.0, norm_constant=norm, grad_clip=0.0)
    return {n: p.grad.clone() for n, p in policy.named_parameters()}, stats


def role_constants(cfg):
    return make_mode(cfg.train.mode).role_constants(cfg)


def test_role_constants_are_each_roles_planned_sequences_times_its_own_length():
    cfg = load_config(["--raro.questions_per_step", "4", "--raro.group_size", "8", "--rollout.max_new_tokens", "48",
                       "--rollout.critic_max_new_tokens", "96"])
    # policy: 4 x 8 sequences x 48 tokens; critic: (32 fresh + 32 replayed pairs) x 4 samples x 96 tokens
    assert role_constants(cfg) == {"policy": 4 * 8 * 48.0, "critic": 64 * 4 * 96.0}
    capped = load_config(["--raro.critic_pairs_per_step", "10", "--raro.replay_ratio", "0.75"])
    assert role_constants(capped)["critic"] == (10 + 30) * 4 * 96.0
    rlvr = load_config(["--train.mode", "rlvr", "--rollout.max_new_tokens", "96"])
    assert role_constants(rlvr) == {"policy": 4 * 8 * 96.0}


def test_every_mode_the_config_offers_has_an_object_that_plans_its_own_sequences():
    from raro_fast.config import TrainConfig
    from raro_fast.modes import MODES

    offered = typing.get_args(typing.get_type_hints(TrainConfig)["mode"])
    assert set(offered) == set(MODES)
    # planned policy sequences per step at 4 questions x 8 samples: a group per question, one expert answer per
    # question, or a (chosen, rejected) pair per sample
    planned = {"raro": 32, "rlvr": 32, "rl_logit": 32, "sft": 4, "rationalization": 4, "dpo": 64}
    for name in offered:
        cfg = load_config(["--train.mode", name])
        assert role_constants(cfg)["policy"] == planned[name] * cfg.rollout.max_new_tokens, name
    with pytest.raises(ValueError, match="unknown mode 'ppo'.*raro, rlvr"):
        make_mode("ppo")


@pytest.mark.parametrize("loss_agg", ["token_sum_norm", "token_mean", "seq_mean_token_sum"])
def test_mixed_update_is_the_lambda_weighted_sum_of_each_roles_own_objective(tok, loss_agg):
    """Fix 1: the gradient of the mixed batch equals lambda_pol * grad J_pol + lambda_crit * grad J_crit, where each
    J is the role's loss alone, normalised by that role's own constant (or own counts). Before, both roles shared
    one constant: the policy's gradient shrank with every critic token in the batch."""
    policy = tiny_policy(tok)
    loss_cfg = LossConfig(loss_agg=loss_agg)
    constants = {"policy": 6 * 10.0, "critic": 10 * 25.0}
    samples = mixed_samples()
    norm = weigh_roles(samples, loss_agg=loss_agg, role_constants=constants)
    mixed, _ = grads_of(policy, samples, loss_cfg=loss_cfg, norm=norm)
    expected = None
    for role, lam in (("policy", 1 / 9), ("critic", 8 / 9)):
        alone = [s for s in mixed_samples() if s.role == role]
        for s in alone:
            s.loss_weight = 1.0
        g, _ = grads_of(policy, alone, loss_cfg=loss_cfg, norm=constants[role])
        expected = {n: lam * v for n, v in g.items()} if expected is None else {n: expected[n] + lam * v for n, v in g.items()}
    for n in mixed:  # fp32 sums in another order: compared as relative Frobenius error
        assert float((mixed[n] - expected[n]).norm() / expected[n].norm()) < 1e-5, n
    if loss_agg == "token_sum_norm":
        for s in samples:  # per token: lambda_role / C_role
            lam = 1 / 9 if s.role == "policy" else 8 / 9
            assert s.loss_weight / norm == pytest.approx(lam / constants[s.role], rel=1e-12)


def test_one_role_weights_are_unchanged_bit_for_bit():
    samples = mixed_samples(n_critic=0)
    before = [s.loss_weight for s in samples]
    for agg in ("token_sum_norm", "token_mean", "seq_mean_token_mean"):
        norm = weigh_roles(samples, loss_agg=agg, role_constants={"policy": 123.0})
        assert [s.loss_weight for s in samples] == before
    assert norm == float(len(samples))
    assert weigh_roles(samples, loss_agg="token_sum_norm", role_constants={"policy": 123.0}, parts=4) == 123.0 / 4


@pytest.mark.parametrize("loss_agg", ["token_sum_norm", "token_mean", "seq_mean_token_sum", "seq_mean_token_mean"])
def test_kl_penalty_sits_outside_the_role_weights(tok, loss_agg):
    """Fix 5: -beta * KL is not multiplied by lambda. With zero advantages only the KL term is left: the loss is
    beta * sum KL / D whatever the weights (before, it was beta * sum w * KL / D), aggregated as loss.loss_agg says
    (only token_sum_norm was tested: an update that aggregated the KL so whatever the setting passed; review)."""
    policy, ref = tiny_policy(tok, seed=0), tiny_policy(tok, seed=1)
    samples = mixed_samples()
    for s in samples:
        s.advantage = 0.0
    mbs = plan_micro_batches(samples, max_tokens_per_micro_batch=64, world_size=1, rank=0)
    recompute_logprobs(policy, mbs, temperature=1.0)
    recompute_logprobs(ref, mbs, temperature=1.0, field="ref_logprobs")
    beta, norm = 0.3, 500.0
    stats = update_step(copy.deepcopy(policy), torch.optim.SGD(policy.parameters(), lr=0.0), mbs,
                        loss_cfg=LossConfig(kl_coef=beta, loss_agg=loss_agg), temperature=1.0, norm_constant=norm,
                        grad_clip=0.0)
    per_seq: dict[int, list[float]] = {}
    for mb in mbs:
        m = mb.targets != -100
        log_r = mb.ref_logprobs.double() - mb.old_logprobs.double()
        for uid, kl in zip(mb.uids[mb.seq_ids][m].tolist(), (log_r.exp() - 1 - log_r)[m].tolist()):
            per_seq.setdefault(uid, []).append(kl)
    every = [kl for kls in per_seq.values() for kl in kls]
    expected = beta * {"token_sum_norm": sum(every) / norm, "token_mean": sum(every) / len(every),
                       "seq_mean_token_sum": sum(sum(k) for k in per_seq.values()) / len(per_seq),
                       "seq_mean_token_mean": sum(sum(k) / len(k) for k in per_seq.values()) / len(per_seq)}[loss_agg]
    assert expected > 0 and len(per_seq) == len(samples)
    assert stats.loss == pytest.approx(expected, rel=1e-5)


def _kernel_reference():
    """kernels/tests' float64 policy loss, loaded by path: that folder is on sys.path only when pytest collects it."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "kernels" / "tests" / "kernel_helpers.py"
    spec = importlib.util.spec_from_file_location("_kernel_helpers_for_update_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reference_policy_loss


def _off_policy_batch(tok, samples=None):
    """Micro-batches of mixed_samples with a reference model's log-probs, and old / rollout log-probs moved off the
    current ones per position, so ratios and importance weights spread well away from 1 (both clip sides, the
    dual clip and the TIS cap all act). Returns the policy, the micro-batches and the current log-probs."""
    policy, ref = tiny_policy(tok, seed=0), tiny_policy(tok, seed=1)
    mbs = plan_micro_batches(mixed_samples() if samples is None else samples, max_tokens_per_micro_batch=64,
                             world_size=1, rank=0)
    recompute_logprobs(policy, mbs, temperature=1.0)
    recompute_logprobs(ref, mbs, temperature=1.0, field="ref_logprobs")
    current = [mb.old_logprobs.clone() for mb in mbs]
    for mb in mbs:
        i = torch.arange(mb.targets.numel(), dtype=torch.float32)
        mb.old_logprobs = mb.old_logprobs + 0.8 * torch.sin(3.0 * i)
        mb.rollout_logprobs = mb.old_logprobs + 0.6 * torch.cos(5.0 * i)
    return policy, mbs, current


@pytest.mark.parametrize("settings", [
    dict(clip_low=0.1, clip_high=0.3),
    dict(dual_clip=1.5),
    dict(kl_coef=0.2, kl_estimator="k1"),
    dict(kl_coef=0.2, kl_estimator="k2"),
    dict(kl_coef=0.2, kl_estimator="k3"),
    dict(tis_cap=1.2),
], ids=["clip", "dual_clip", "kl_k1", "kl_k2", "kl_k3", "tis"])
def test_every_loss_setting_reaches_the_loss_of_a_real_update(tok, settings):
    """The kernel's own tests check each setting inside policy_loss; this checks the update hands every one of them
    over (each clip bound as itself, the dual clip, the KL estimator of the KL term, the rollout's log-probs to
    TIS), against the float64 reference: role-weighted surrogate plus beta * KL with unit weights."""
    reference_policy_loss = _kernel_reference()
    policy, mbs, current = _off_policy_batch(tok)
    cfg, norm = LossConfig(**settings), 300.0
    expected = 0.0
    for mb, cur in zip(mbs, current):
        m = mb.targets != -100
        common = dict(loss_agg="token_sum_norm", norm_constant=norm)
        expected += float(reference_policy_loss(
            cur.double(), mb.old_logprobs.double(), mb.advantages.double(), m, clip_low=cfg.clip_low,
            clip_high=cfg.clip_high, dual_clip=cfg.dual_clip, rollout=mb.rollout_logprobs.double(),
            tis_cap=cfg.tis_cap, weights=mb.loss_weights.double(), **common))
        if cfg.kl_coef > 0:
            expected += float(reference_policy_loss(
                cur.double(), mb.old_logprobs.double(), torch.zeros_like(mb.advantages, dtype=torch.float64), m,
                ref=mb.ref_logprobs.double(), kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator, **common))
    stats = update_step(policy, torch.optim.SGD(policy.parameters(), lr=0.0), mbs, loss_cfg=cfg, temperature=1.0,
                        norm_constant=norm, grad_clip=0.0)
    assert stats.loss == pytest.approx(expected, rel=1e-5)
    assert stats.metrics["actor/clip_frac_low"] > 0 and stats.metrics["actor/clip_frac_high"] > 0
    if cfg.dual_clip is not None:
        assert stats.metrics["actor/dual_clip_frac"] > 0
    if cfg.tis_cap is not None:
        assert stats.metrics["actor/tis_frac_capped"] > 0


def test_split_mini_batches_is_a_seeded_partition_and_one_keeps_the_batch():
    samples = mixed_samples()
    assert split_mini_batches(samples, 1, "s") == [samples]
    parts = split_mini_batches(samples, 3, "s")
    assert [len(p) for p in parts] == [5, 5, 6]
    assert sorted(s.uid for p in parts for s in p) == list(range(16))
    assert [s.uid for p in parts for s in p] != list(range(16))
    assert split_mini_batches(samples, 3, "s") == parts and split_mini_batches(samples, 3, "t") != parts
    # fewer sequences than mini-batches: no empty optimizer step (its 0 loss and grad norm diluted the means)
    assert [len(p) for p in split_mini_batches(samples[:2], 4, "s")] == [1, 1]
    assert split_mini_batches([], 4, "s") == [[]]


def test_one_mini_batch_is_the_single_update_bit_for_bit(tok):
    """Fix 4, k = 1: the mini-batch path gives exactly the weights of the one update it replaces."""
    policy = tiny_policy(tok)
    samples = mixed_samples()
    a, b = copy.deepcopy(policy), copy.deepcopy(policy)
    mbs_a = plan_micro_batches(samples, max_tokens_per_micro_batch=64, world_size=1, rank=0)
    recompute_logprobs(a, mbs_a, temperature=1.0)
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2)
    update_step(a, opt_a, mbs_a, loss_cfg=LossConfig(), temperature=1.0, norm_constant=300.0, grad_clip=1.0)
    (part,) = split_mini_batches(samples, 1, "x")
    mbs_b = plan_micro_batches(part, max_tokens_per_micro_batch=64, world_size=1, rank=0)
    recompute_logprobs(b, mbs_b, temperature=1.0)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2)
    update_mini_batches(b, opt_b, [(mbs_b, 300.0)], loss_cfg=LossConfig(), temperature=1.0, grad_clip=1.0)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_old_logprobs_from_the_update_forward_equal_a_recompute_bit_for_bit(tok):
    """One optimizer step per round: taking the old log-probs from the update's own forward (no recompute pass)
    gives the weights, metrics, old log-probs and entropies of recompute-then-update exactly."""
    policy = tiny_policy(tok)
    samples = mixed_samples()
    a, b = copy.deepcopy(policy), copy.deepcopy(policy)
    mbs_a = plan_micro_batches(samples, max_tokens_per_micro_batch=64, world_size=1, rank=0)
    entropies_a = recompute_logprobs(a, mbs_a, temperature=0.7)
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2)
    upd_a = update_mini_batches(a, opt_a, [(mbs_a, 300.0)], loss_cfg=LossConfig(), temperature=0.7, grad_clip=1.0)
    mbs_b = plan_micro_batches(samples, max_tokens_per_micro_batch=64, world_size=1, rank=0)
    for mb in mbs_b:
        mb.old_logprobs = torch.full_like(mb.targets, float("nan"), dtype=torch.float32)  # poison: must be replaced
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2)
    upd_b = update_mini_batches(b, opt_b, [(mbs_b, 300.0)], loss_cfg=LossConfig(), temperature=0.7, grad_clip=1.0,
                                old_from_forward=True)
    assert len(mbs_a) > 1 and upd_a.entropies is None and len(upd_b.entropies) == len(mbs_b)
    for mb_a, mb_b, ent_a, ent_b in zip(mbs_a, mbs_b, entropies_a, upd_b.entropies):
        assert torch.equal(mb_a.old_logprobs, mb_b.old_logprobs) and not mb_b.old_logprobs.requires_grad
        assert torch.equal(ent_a, ent_b) and not ent_b.requires_grad
    assert (upd_a.loss, upd_a.grad_norm, upd_a.metrics) == (upd_b.loss, upd_b.grad_norm, upd_b.metrics)
    assert upd_b.metrics["actor/ratio_mean"] == 1.0
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
        assert not torch.equal(p, dict(policy.named_parameters())[n]), n  # the step did move the weights
    with pytest.raises(ValueError, match="exactly one optimizer step, got 2"):
        update_mini_batches(b, opt_b, [(mbs_b[:1], 1.0), (mbs_b[1:], 1.0)], loss_cfg=LossConfig(), temperature=0.7,
                            grad_clip=1.0, old_from_forward=True)


def test_several_mini_batches_move_the_ratio_and_clipping_acts(tok):
    """Fix 4, k > 1: after the first optimizer step the later mini-batches see ratios off 1, so clipping acts;
    with one update the ratio is exactly 1 and nothing is ever clipped."""
    policy = tiny_policy(tok)
    samples = mixed_samples(n_policy=16, n_critic=16)
    for s in samples:
        s.advantage = 4.0 if s.uid % 2 else -4.0
    results = {}
    for k in (1, 4):
        model = copy.deepcopy(policy)
        plan = []
        for part in split_mini_batches(samples, k, "clip"):
            mbs = plan_micro_batches(part, max_tokens_per_micro_batch=64, world_size=1, rank=0)
            plan.append((mbs, 200.0 / k))
        recompute_logprobs(model, [mb for mbs, _ in plan for mb in mbs], temperature=1.0)
        opt = torch.optim.AdamW(model.parameters(), lr=0.05)
        results[k] = update_mini_batches(model, opt, plan, loss_cfg=LossConfig(), temperature=1.0, grad_clip=0.0)
    assert results[1].metrics["actor/clip_frac"] == 0.0 and results[1].metrics["actor/ratio_mean"] == 1.0
    assert results[4].metrics["actor/clip_frac"] > 0.05
    assert results[4].metrics["actor/approx_kl"] > 0


def _adam_step(policy, samples, opt):
    mbs = plan_micro_batches(samples, max_tokens_per_micro_batch=64, world_size=1, rank=0)
    recompute_logprobs(policy, mbs, temperature=1.0)
    return update_step(policy, opt, mbs, loss_cfg=LossConfig(), temperature=1.0, norm_constant=100.0, grad_clip=1.0)


def test_a_non_finite_loss_skips_the_step_and_leaves_weights_and_adam_untouched(tok):
    policy = tiny_policy(tok)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    assert _adam_step(policy, mixed_samples(seed=1), opt).skipped == 0
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    moments = {k: v["exp_avg"].clone() for k, v in enumerate(opt.state.values())}
    bad = mixed_samples(seed=2)
    bad[3].advantage = float("nan")
    stats = _adam_step(policy, bad, opt)
    assert stats.skipped == 1 and not torch.isfinite(torch.tensor(stats.loss))
    assert all(torch.equal(before[n], p) for n, p in policy.named_parameters())
    assert all(torch.equal(moments[k], v["exp_avg"]) for k, v in enumerate(opt.state.values()))
    assert _adam_step(policy, mixed_samples(seed=3), opt).skipped == 0  # the next good batch trains as usual
    assert any(not torch.equal(before[n], p) for n, p in policy.named_parameters())


def test_an_update_that_overflows_the_weights_raises_diverged(tok):
    from raro_fast.update import DivergedError

    policy = tiny_policy(tok)
    with pytest.raises(DivergedError, match="overflowed"):  # Adam's own step size is not representable
        _adam_step(policy, mixed_samples(seed=1), torch.optim.AdamW(policy.parameters(), lr=1e38))
    policy = tiny_policy(tok)

    class Overshoot(torch.optim.SGD):  # a step whose result is infinite, whatever the optimizer
        def step(self, closure=None):
            super().step(closure)
            with torch.no_grad():
                next(iter(policy.parameters()))[0].fill_(float("inf"))

    with pytest.raises(DivergedError, match="not finite after the optimizer step"):
        _adam_step(policy, mixed_samples(seed=1), Overshoot(policy.parameters(), lr=0.1))


def _flat(tensors):
    return torch.cat([t.detach().double().reshape(-1) for t in tensors])


def test_grad_clip_scales_the_step_to_the_clip_norm_and_logs_the_raw_norm(tok):
    """With SGD at lr 1 the weight change is minus the (clipped) gradient, so its norm shows the clip that was
    applied: G / 10 under a clip of G / 10, all of G under a clip above it; the logged grad norm stays the raw one."""
    policy, mbs, _ = _off_policy_batch(tok)
    raw = copy.deepcopy(policy)
    unclipped = update_step(raw, torch.optim.SGD(raw.parameters(), lr=0.0), mbs, loss_cfg=LossConfig(),
                            temperature=1.0, norm_constant=100.0, grad_clip=0.0)
    grad = _flat(p.grad for p in raw.parameters())
    G = float(grad.norm())
    assert G > 0 and unclipped.grad_norm == pytest.approx(G, rel=1e-5)
    start = _flat(policy.parameters())
    for clip, step_norm in ((G / 10, G / 10), (2 * G, G)):
        model = copy.deepcopy(policy)
        stats = update_step(model, torch.optim.SGD(model.parameters(), lr=1.0), mbs, loss_cfg=LossConfig(),
                            temperature=1.0, norm_constant=100.0, grad_clip=clip)
        change = start - _flat(model.parameters())
        assert stats.skipped == 0 and stats.grad_norm == pytest.approx(G, rel=1e-5)
        assert float(change.norm()) == pytest.approx(step_norm, rel=1e-5), clip
        cosine = float(change @ grad / (change.norm() * grad.norm()))
        assert cosine == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("total, grad_norm, skipped", [
    (float("inf"), 1.0, True), (1.0, float("nan"), True), (float("nan"), float("inf"), True), (1.0, 1.0, False),
])
def test_either_non_finite_number_skips_the_step(total, grad_norm, skipped):
    """Loss and grad norm are each enough to skip: a finite loss can still have an overflowed gradient, and a
    non-finite loss with a finite norm must not reach Adam either. A skip also drops the gradients."""
    from raro_fast.update import _step_unless_non_finite

    model = torch.nn.Linear(3, 2)
    model(torch.ones(4, 3)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    assert _step_unless_non_finite(model, opt, total, grad_norm, 1) is skipped
    unchanged = all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    if skipped:
        assert unchanged and len(opt.state) == 0
        assert all(p.grad is None for p in model.parameters())
    else:
        assert not unchanged and len(opt.state) == 2


def test_an_infinite_gradient_under_a_finite_loss_skips_the_step(tok):
    policy = tiny_policy(tok)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    weight = dict(policy.named_parameters())["lm.model.layers.0.mlp.down_proj.weight"]
    weight.register_hook(lambda g: g * float("inf"))  # the loss itself never sees this
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    stats = _adam_step(policy, mixed_samples(seed=1), opt)
    assert stats.skipped == 1 and torch.isfinite(torch.tensor(stats.loss)) and not math.isfinite(stats.grad_norm)
    assert all(torch.equal(before[n], p) for n, p in policy.named_parameters()) and len(opt.state) == 0


def test_several_mini_batches_report_the_mean_loss_and_token_weighted_metrics(tok):
    """Two optimizer steps of unequal size at lr 0 (so each sees the same weights as it would alone): the round's
    loss and grad norm are the mean of the two steps', its actor metrics their means weighted by trained tokens,
    its tokens their sum."""
    samples = mixed_samples()
    policy, mbs, _ = _off_policy_batch(tok, samples)
    # the same packed, perturbed micro-batches, as two steps of 1 and len - 1 micro-batches
    plan = [(mbs[:1], 100.0), (mbs[1:], 100.0)]
    kw = dict(loss_cfg=LossConfig(dual_clip=1.5), temperature=1.0, grad_clip=0.0)
    alone = [update_step(policy, torch.optim.SGD(policy.parameters(), lr=0.0), part, norm_constant=norm, **kw)
             for part, norm in plan]
    both = update_mini_batches(policy, torch.optim.SGD(policy.parameters(), lr=0.0), plan, **kw)
    t = [float(sum(int((mb.targets != -100).sum()) for mb in part)) for part, _ in plan]
    assert t[0] != t[1] and [a.tokens for a in alone] == t
    assert both.tokens == t[0] + t[1] == sum(len(s.input_ids) - s.prompt_len for s in samples)
    assert both.loss == pytest.approx((alone[0].loss + alone[1].loss) / 2, rel=1e-12)
    assert both.grad_norm == pytest.approx((alone[0].grad_norm + alone[1].grad_norm) / 2, rel=1e-12)
    assert set(both.metrics) == set(alone[0].metrics)
    spread = 0
    for k, v in both.metrics.items():
        a, b = alone[0].metrics[k], alone[1].metrics[k]
        assert v == pytest.approx((a * t[0] + b * t[1]) / (t[0] + t[1]), rel=1e-9, abs=1e-12), k
        spread += abs(a - b) > 1e-3
    assert spread >= 3  # the metrics do differ between the steps, so the weighting shows


def test_a_filler_micro_batch_adds_nothing_even_to_the_kl_term(tok):
    """The filler's loss weight already zeroes its surrogate, but the KL term sits outside the weights: only the
    filler's x0 keeps its (here large) KL out of the loss and the gradient."""
    from raro_fast.packing import _filler

    policy, mbs, _ = _off_policy_batch(tok)
    filler = _filler(mixed_samples(), mbs[0].num_sequences, mbs[0].num_tokens)
    recompute_logprobs(policy, [filler], temperature=1.0)
    filler.ref_logprobs = filler.old_logprobs - 3.0
    filler.rollout_logprobs = filler.old_logprobs.clone()
    assert filler.is_padding and bool((filler.targets != -100).any())
    results = []
    for batch in (mbs, mbs + [filler]):
        model = copy.deepcopy(policy)
        stats = update_step(model, torch.optim.SGD(model.parameters(), lr=0.0), batch,
                            loss_cfg=LossConfig(kl_coef=0.1), temperature=1.0, norm_constant=100.0, grad_clip=0.0)
        results.append((stats, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, g_plain), (padded, g_padded) = results
    assert padded.loss == plain.loss and padded.tokens == plain.tokens and padded.metrics == plain.metrics
    for n in g_plain:
        torch.testing.assert_close(g_padded[n], g_plain[n], rtol=1e-6, atol=1e-9, msg=n)


def test_three_skipped_steps_in_a_row_stop_the_run_naming_the_last_good_weights(tmp_path, capsys):
    from types import SimpleNamespace

    from raro_fast.train import check_health
    from raro_fast.update import DivergedError

    r = SimpleNamespace(skipped_in_a_row=0, warned_uniform=False, first_entropy=None, d=SimpleNamespace(is_main=True),
                        hf_model=SimpleNamespace(config=SimpleNamespace(vocab_size=400)),
                        cfg=load_config(["--train.output_dir", str(tmp_path)]))
    for step, skipped in [(1, 1), (2, 1), (3, 0), (4, 1), (5, 1)]:  # a good step in between resets the count
        check_health(r, step, {"update/skipped": skipped, "policy/entropy": 2.0})
    with pytest.raises(DivergedError, match=r"steps 4-6: .* 3 times in a row .* the weights are those of step 3"):
        check_health(r, 6, {"update/skipped": 1})
    assert "warning" not in capsys.readouterr().out  # entropy 2.0 of ln 400 = 6.0: no uniform warning
    # Of several optimizer steps, a step counts as skipped only when all were: with some taken, the weights moved
    # (found by review on 2026-12-07: the run stopped saying the weights were step 0's)
    r.skipped_in_a_row = 0
    for step in (1, 2, 3, 4):
        check_health(r, step, {"update/skipped": 1, "update/optimizer_steps": 2})
    with pytest.raises(DivergedError, match=r"steps 5-7: .* 3 times in a row"):
        for step in (5, 6, 7):
            check_health(r, step, {"update/skipped": 2, "update/optimizer_steps": 2})


def test_a_skipped_mini_batch_leaves_the_others_loss_and_gradient_norm(monkeypatch):
    """One non-finite mini-batch of two made the whole step's loss and grad norm NaN (found by review on
    2026-12-07); they are the mean over the optimizer steps taken."""
    from raro_fast.update import UpdateStats, update_mini_batches
    import raro_fast.update as update

    stats = iter([UpdateStats(loss=float("nan"), grad_norm=float("nan"), metrics={}, tokens=5, skipped=1),
                  UpdateStats(loss=0.25, grad_norm=2.0, metrics={}, tokens=7, skipped=0)])
    monkeypatch.setattr(update, "update_step", lambda *a, **k: next(stats))
    u = update_mini_batches(None, None, [([], 1.0), ([], 1.0)])
    assert (u.loss, u.grad_norm, u.skipped, u.optimizer_steps) == (0.25, 2.0, 1, 2)
    # the skips are counted, not flagged: a step is whole only when all of its k were (a planted `max` counted 1 of
    # 4, and a run whose every mini-batch diverged never stopped: found by mutation testing)
    nan = UpdateStats(loss=float("nan"), grad_norm=float("nan"), metrics={}, tokens=5, skipped=1)
    ok = UpdateStats(loss=0.5, grad_norm=1.0, metrics={}, tokens=5, skipped=0)
    for pattern, skipped in (([nan, ok, nan, ok], 2), ([nan] * 4, 4)):
        stats = iter(pattern)
        u = update_mini_batches(None, None, [([], 1.0)] * 4)
        assert (u.skipped, u.optimizer_steps) == (skipped, 4)


def test_each_role_is_recomputed_at_the_temperature_it_was_sampled_at(tok):
    """Engine -> sequences -> packed batch -> recompute: with the critic at its own temperature, the trainer's
    log-probs equal the engine's for both roles (recomputing the critic's at the policy's temperature would not)."""
    from raro_fast.rollout.embedded import EmbeddedEngine
    from raro_fast.rollout.engine import SamplingParams

    policy = tiny_policy(tok, seed=3)
    engine = EmbeddedEngine.from_tokenizer(  # the same weights, with the engine's own (cached sdpa) attention
        build_embedded_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                             max_position=256, seed=3), tok)
    prompt = tok("<|im_start|>user\n3 4 2<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    samples = []
    for role, temperature in (("policy", 1.0), ("critic", 0.3)):
        for c in engine.generate([prompt], SamplingParams(max_new_tokens=12, temperature=temperature, n=3, seed=1))[0]:
            samples.append(SequenceSample(input_ids=prompt + c.token_ids, prompt_len=len(prompt), advantage=1.0, role=role,
                                          group=0, uid=len(samples), rollout_logprobs=c.logprobs, temperature=temperature))
    mbs = plan_micro_batches(samples, max_tokens_per_micro_batch=4096, world_size=1, rank=0)
    recompute_logprobs(policy, mbs, temperature=1.0)
    for mb in mbs:
        m = mb.targets != -100
        torch.testing.assert_close(mb.old_logprobs[m], mb.rollout_logprobs[m], rtol=0, atol=1e-4)
    for s in samples:
        s.temperature = None  # the run's one temperature for every sequence: the critic's no longer match
    mbs = plan_micro_batches(samples, max_tokens_per_micro_batch=4096, world_size=1, rank=0)
    recompute_logprobs(policy, mbs, temperature=1.0)
    gap = max((mb.old_logprobs - mb.rollout_logprobs)[mb.targets != -100].abs().max().item() for mb in mbs)
    assert gap > 0.05


def test_a_resumed_run_warns_about_uniform_entropy_against_its_start(tmp_path, capsys):
    """After a resume the uniform-entropy warning compared against the first step *after* the resume: a model that
    had become uniform before the checkpoint set its own baseline there and was never warned about."""
    from types import SimpleNamespace

    from raro_fast.metrics import MetricsLog
    from raro_fast.train import check_health, first_logged_entropy

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"step": 0, "eval/heldout_avg_at_n": 0.1},
                                                           {"step": 1, "policy/entropy": None},
                                                           {"step": 2, "policy/entropy": 1.5},
                                                           {"step": 3, "policy/entropy": 5.9},
                                                           {"step": 4, "policy/entropy": 5.9}]))
    log = MetricsLog(path, enabled=True, resume_step=3)  # the resumed run keeps steps 0-3
    assert first_logged_entropy(log.read()) == 1.5
    assert first_logged_entropy([{"step": 1, "policy/entropy": float("nan")}]) is None
    r = SimpleNamespace(skipped_in_a_row=0, warned_uniform=False, first_entropy=first_logged_entropy(log.read()),
                        d=SimpleNamespace(is_main=True),
                        hf_model=SimpleNamespace(config=SimpleNamespace(vocab_size=400)),
                        cfg=load_config(["--train.output_dir", str(tmp_path)]))
    check_health(r, 4, {"update/skipped": 0, "policy/entropy": 5.9})  # 0.9 * ln 400 = 5.39
    assert "at the run's start: 1.50" in capsys.readouterr().out


class _KeepGrads(torch.optim.SGD):
    """SGD at lr 0 that keeps a copy of the gradient of every step."""

    def __init__(self, named_parameters):
        self.named = list(named_parameters)
        self.grads = []
        super().__init__([p for _, p in self.named], lr=0.0)

    def step(self, closure=None):
        self.grads.append({n: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for n, p in self.named})
        return super().step(closure)


def _sharded_update(world: int, rank: int):
    """Rank `rank`'s share of one PPO round (2 mini-batches, KL term on) over mixed_samples, at SGD lr 0 so the
    weights stay; the old log-probs are perturbed per (sequence, position), the same on whichever rank holds the
    sequence, so ratios move off 1 and clipping acts. The second mini-batch is one sequence: on two ranks, one of
    them trains only a filler there. Also returns the gradient each optimizer step was given."""
    tok = load_project_tokenizer()
    policy, ref = tiny_policy(tok, seed=0), tiny_policy(tok, seed=1)
    samples = mixed_samples()
    plan = []
    for part in (samples[:-1], samples[-1:]):
        norm = weigh_roles(part, loss_agg="token_sum_norm", role_constants={"policy": 60.0, "critic": 250.0}, parts=2)
        plan.append((plan_micro_batches(part, max_tokens_per_micro_batch=40, world_size=world, rank=rank), norm))
    mbs = [mb for part, _ in plan for mb in part]
    recompute_logprobs(policy, mbs, temperature=1.0)
    recompute_logprobs(ref, mbs, temperature=1.0, field="ref_logprobs")
    for mb in mbs:
        mb.old_logprobs = mb.old_logprobs + torch.sin(mb.uids[mb.seq_ids].float() * 7.0 + mb.position_ids.float() * 3.0) * 0.5
    opt = _KeepGrads(policy.named_parameters())
    upd = update_mini_batches(policy, opt, plan, loss_cfg=LossConfig(kl_coef=0.1), temperature=1.0, grad_clip=0.0)
    return upd, sum(mb.is_padding for mb in mbs), opt.grads


def test_two_ranks_log_the_global_batchs_actor_metrics(tmp_path):
    """Only rank 0 writes metrics.jsonl: its actor/* metrics (and the token counts that weigh the mini-batches)
    must be the whole batch's, added over ranks, not rank 0's own share of the tokens."""
    result = tmp_path / "rank0.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                          __file__, str(result)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-6000:]
    got = json.loads(result.read_text())
    single, _, single_grads = _sharded_update(1, 0)
    assert got["tokens"] == single.tokens == sum(len(s.input_ids) - s.prompt_len for s in mixed_samples())
    assert set(got["metrics"]) == set(single.metrics) >= {"actor/clip_frac", "actor/ratio_mean", "actor/ref_kl"}
    assert single.metrics["actor/clip_frac"] > 0.05
    for key, value in single.metrics.items():
        assert got["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert got["loss"] == pytest.approx(single.loss, rel=1e-5)
    assert got["padding"] > 0  # a rank with a filler micro-batch still lines its sums up with the other's
    # FSDP averages the ranks' gradients; each rank's loss is pre-multiplied by the world size so that the average
    # is the whole batch's gradient (here the average is taken by hand, the model not being sharded)
    averaged = torch.load(str(result) + ".grads.pt")
    assert len(averaged) == len(single_grads) == 2
    for got_step, single_step in zip(averaged, single_grads):
        assert set(got_step) == set(single_step)
        for n, g in single_step.items():
            assert float(g.norm()) > 0, n
            torch.testing.assert_close(got_step[n], g, rtol=1e-5, atol=1e-8, msg=n)


if __name__ == "__main__":  # one rank of test_two_ranks_log_the_global_batchs_actor_metrics, under torchrun
    import torch.distributed as dist

    dist.init_process_group("gloo")
    upd, padding, grads = _sharded_update(dist.get_world_size(), dist.get_rank())
    padding_t = torch.tensor(padding)
    dist.all_reduce(padding_t)
    for step_grads in grads:
        for n in sorted(step_grads):
            dist.all_reduce(step_grads[n])
            step_grads[n] /= dist.get_world_size()
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"loss": upd.loss, "tokens": upd.tokens, "metrics": upd.metrics, "padding": int(padding_t)}, f)
        torch.save(grads, sys.argv[1] + ".grads.pt")
    dist.destroy_process_group()


def test_a_rank_with_only_a_filler_updates_under_sft_at_temperature_0(tok):
    """SFT may set rollout.temperature 0 (greedy evaluation; its own sequences carry temperature 1). A rank with
    no sequence of its own (one question on two ranks) gets a filler micro-batch, which had no temperature and
    ran at rollout.temperature: the LM-head kernel refused 0 on that rank only, and the run stopped. Found by
    review on 2026-12-07."""
    from raro_fast.modes.sft import sft_samples
    from raro_fast.tasks import make_task

    cfg = load_config(["--train.mode", "sft", "--rollout.temperature", "0", "--raro.questions_per_step", "1"])
    samples = sft_samples(make_task(cfg.task).examples("train")[:1], tokenizer=tok).samples
    for uid, s in enumerate(samples):
        s.uid = uid
    norm = weigh_roles(samples, loss_agg=cfg.loss.loss_agg, role_constants={"policy": 1.0})
    policy = tiny_policy(tok)
    for rank in (0, 1):
        mbs = plan_micro_batches(samples, max_tokens_per_micro_batch=cfg.train.max_tokens_per_micro_batch,
                                 world_size=2, rank=rank)
        assert [mb.is_padding for mb in mbs] == [rank == 1]
        stats = update_step(policy, torch.optim.SGD(policy.parameters(), lr=0.0), mbs, loss_cfg=cfg.loss,
                            temperature=cfg.rollout.temperature, norm_constant=norm, grad_clip=0.0,
                            old_from_forward=True)
        assert math.isfinite(stats.loss) and (stats.loss == 0.0) == (rank == 1)


def test_a_step_with_nothing_to_train_reduces_on_the_models_device(tok, monkeypatch):
    """Every rank with no micro-batch (every RLVR sample truncated): the totals were a CPU tensor, which NCCL does
    not reduce, and a multi-GPU run stopped. They are on the model's device now. Found by review on 2026-12-07."""
    policy = tiny_policy(tok)
    devices = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, *a, **k: devices.append(t.device))
    sentinel = torch.device("meta")
    monkeypatch.setattr(type(policy), "parameters",
                        lambda self, recurse=True: iter([torch.empty(0, device=sentinel)]))
    with pytest.raises(Exception):  # the step itself needs real parameters; the reduce came first
        update_step(policy, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0), [],
                    loss_cfg=LossConfig(), temperature=1.0, norm_constant=1.0, grad_clip=0.0)
    assert devices and devices[0] == sentinel
