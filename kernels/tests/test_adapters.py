"""The drop-ins equal the computation they replace, on the same inputs, values and gradients. TRL and verl do not
install here (their dependencies need a GPU stack or a network), so their formulas are transcribed: TRL GRPO's
`_get_per_token_logps_and_entropies` (the model's logits of the last logits_to_keep + 1 positions, the last
dropped, divided by the temperature, `selective_log_softmax` on the completion ids, `entropy_from_logits`) and
verl's `FusedLinearForPPO` reference (fp32 logits / temperature, gathered log-softmax, logsumexp - sum p·z)."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from raro_kernels.adapters import (FusedLinearForPPO, LinearLogprobsHead, fused_linear_for_ppo, linear_cross_entropy,
                                   trl_per_token_logps_and_entropies)

VOCAB, HIDDEN = 61, 24


class _Decoder(nn.Module):
    """Embeddings, then a causal mix (each position sees the running mean of those before it)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.mix = nn.Linear(2 * HIDDEN, HIDDEN)

    def forward(self, input_ids, attention_mask):
        x = self.embed_tokens(input_ids) * attention_mask[..., None]
        running = x.cumsum(1) / attention_mask.cumsum(1).clamp(min=1)[..., None]
        return SimpleNamespace(last_hidden_state=torch.tanh(self.mix(torch.cat([x, running], -1))) * 3)


class _CausalLM(nn.Module):
    """The shape of a Hugging Face causal LM: `model` (the decoder), `lm_head`, logits from forward."""

    def __init__(self, tied: bool, after_head=None) -> None:
        super().__init__()
        self.after_head = after_head  # what some models do to the logits after the head (Granite: / logits_scaling)
        torch.manual_seed(0)
        self.model = _Decoder()
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        if tied:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask, logits_to_keep=0):
        logits = self.lm_head(self.model(input_ids, attention_mask).last_hidden_state)
        if self.after_head is not None:
            logits = self.after_head(logits)
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def _trl_reference(model, input_ids, attention_mask, logits_to_keep, temperature):
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep + 1).logits
    logits = logits[:, :-1, :] / temperature
    completion_ids = input_ids[:, -logits_to_keep:]
    logps = torch.gather(logits.log_softmax(-1), -1, completion_ids[..., None]).squeeze(-1)
    with torch.no_grad():  # as TRL computes them: an entropy bonus on them trains nothing
        p = logits.softmax(-1)
        entropies = torch.logsumexp(logits, -1) - (p * logits).sum(-1)
    return logps, entropies


def _grads(model, value):
    return torch.autograd.grad(value, [p for p in model.parameters()], allow_unused=True)


@pytest.mark.parametrize("tied", [False, True])
def test_trl_per_token_logps_and_entropies_equals_trls_own_formula(tied):
    model = _CausalLM(tied)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (3, 17), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0  # left padding, as TRL's batches have
    keep, temperature = 9, 0.9
    logps, ent = trl_per_token_logps_and_entropies(model, input_ids, attention_mask, keep, temperature=temperature,
                                                   compute_entropy=True)
    # TRL's formula on the same model in float64: the reference the float32 answers are held to
    model64 = copy.deepcopy(model).double()
    ref_logps, ref_ent = _trl_reference(model64, input_ids, attention_mask, keep, temperature)
    assert logps.shape == ent.shape == (3, keep) and logps.dtype == torch.float32
    assert logps.requires_grad and not ent.requires_grad  # found by review: with a gradient TRL's have not
    torch.testing.assert_close(logps.double(), ref_logps, rtol=0, atol=2e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=0, atol=2e-5)
    w = torch.randn(3, keep, generator=g)
    ours = _grads(model, (logps * w).sum() + (ent * w.flip(0)).sum())
    theirs = _grads(model64, (ref_logps * w).sum() + (ref_ent * w.flip(0)).sum())
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=2e-5)
    no_entropy = trl_per_token_logps_and_entropies(model, input_ids, attention_mask, keep, temperature=temperature)
    assert no_entropy[1] is None and torch.equal(no_entropy[0], logps)


def test_verl_interface_equals_verls_reference_formula():
    g = torch.Generator().manual_seed(2)
    hidden = (torch.randn(2, 13, HIDDEN, generator=g) * 3).requires_grad_(True)
    weight = torch.randn(VOCAB, HIDDEN, generator=g).requires_grad_(True)
    input_ids = torch.randint(0, VOCAB, (2, 13), generator=g)
    logp, ent = FusedLinearForPPO()(hidden, weight, input_ids, temperature=0.7)
    # verl builds it as FusedLinearForPPO(chunk_size=512); that raised TypeError (found by review on 2026-12-07)
    again = FusedLinearForPPO(chunk_size=512, impl_backend="triton")(hidden, weight, input_ids, temperature=0.7)
    assert torch.equal(again[0], logp) and torch.equal(again[1], ent)
    h64, w64 = hidden.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    logits = (h64 @ w64.t()) / 0.7  # verl's formula, in float64
    ref_logp = logits.log_softmax(-1).gather(-1, input_ids[..., None]).squeeze(-1)
    ref_ent = torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=0, atol=2e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=0, atol=2e-5)
    w = torch.randn(2, 13, generator=g)
    ours = torch.autograd.grad((logp * w).sum() - (ent * w).sum(), (hidden, weight))
    theirs = torch.autograd.grad((ref_logp * w).sum() - (ref_ent * w).sum(), (h64, w64))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(fused_linear_for_ppo(hidden, weight, input_ids, 0.7)[0], logp, rtol=0, atol=0)


def test_head_module_shares_the_lm_heads_weight_and_refuses_a_bias():
    model = _CausalLM(tied=True)
    head = LinearLogprobsHead(model.lm_head)
    assert head.weight is model.model.embed_tokens.weight  # tied: one parameter, trained through both uses
    hidden = torch.randn(5, HIDDEN)
    targets = torch.tensor([3, -100, 0, VOCAB - 1, 7])
    out = head(hidden, targets, return_entropy=True)
    ref = (hidden @ model.lm_head.weight.t()).log_softmax(-1)
    torch.testing.assert_close(out.logprobs[[0, 2, 3, 4]], ref[[0, 2, 3, 4], targets[[0, 2, 3, 4]]], rtol=0, atol=2e-5)
    assert out.logprobs[1] == 0 and out.entropy[1] == 0  # ignored position
    out.logprobs.sum().backward()
    assert model.model.embed_tokens.weight.grad is not None and model.model.embed_tokens.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="has a bias"):
        LinearLogprobsHead(nn.Linear(HIDDEN, VOCAB))


def test_head_module_and_cross_entropy_pass_on_ignore_index_and_temperature():
    """A head built with ignore_index=-1 (not the default -100) called at a temperature of 0.5, and
    linear_cross_entropy with ignore_index=-1: dropping either argument on its way to linear_logprobs would
    score position 1 (target -1) as a vocabulary entry, or the others at temperature 1."""
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(VOCAB, HIDDEN, generator=g)
    hidden = torch.randn(5, HIDDEN, generator=g)
    targets = torch.tensor([3, -1, 0, VOCAB - 1, 7])
    keep = targets != -1
    logits = (hidden.double() @ weight.double().t()) / 0.5
    ref = logits.log_softmax(-1)[keep.nonzero().squeeze(1), targets[keep]]
    out = LinearLogprobsHead(weight, ignore_index=-1)(hidden, targets, temperature=0.5, return_entropy=True)
    torch.testing.assert_close(out.logprobs[keep].double(), ref, rtol=0, atol=2e-5)
    assert out.logprobs[1] == 0 and out.entropy[1] == 0
    ce = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-1)
    torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, ignore_index=-1, temperature=0.5).double(),
                               ce, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_equals_torchs_on_the_full_logits(reduction):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 6, HIDDEN, generator=g).requires_grad_(True)
    weight = torch.randn(VOCAB, HIDDEN, generator=g).requires_grad_(True)
    targets = torch.randint(0, VOCAB, (4, 6), generator=g)
    targets[1, 2:] = -100
    ours = linear_cross_entropy(hidden, weight, targets, reduction=reduction, temperature=1.5)
    h64, w64 = hidden.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    logits = (h64 @ w64.t()) / 1.5
    theirs = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), reduction=reduction,
                                               ignore_index=-100)
    theirs = theirs.reshape(4, 6) if reduction == "none" else theirs
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=2e-5)
    w = torch.randn(ours.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((ours * w.float()).sum(), (hidden, weight)),
                    torch.autograd.grad((theirs * w).sum(), (h64, w64))):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=2e-5)
    with pytest.raises(ValueError, match="reduction must be one of"):
        linear_cross_entropy(hidden, weight, targets, reduction="batchmean")


@pytest.mark.parametrize("factor", [1 / 8, 0.0625 * 4, 3.0], ids=["granite", "cohere", "times-3"])
def test_trl_adapter_folds_a_factor_applied_after_the_head(factor: float):
    """Granite divides its logits by config.logits_scaling after the head, Cohere multiplies them by
    config.logit_scale: the adapter computed softmax(h W^T / T) without the factor, and returned other numbers
    than TRL's with no error. Now the factor is measured once per model and folded into the temperature. Found by
    review on 2026-12-07."""
    model = _CausalLM(tied=False, after_head=lambda z: z * factor)
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, VOCAB, (3, 15), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    for _ in range(2):  # measured at the first call only
        logps, ent = trl_per_token_logps_and_entropies(model, input_ids, attention_mask, 6, temperature=0.9,
                                                       compute_entropy=True)
    assert len(calls) == 1
    model64 = copy.deepcopy(model).double()
    ref_logps, ref_ent = _trl_reference(model64, input_ids, attention_mask, 6, 0.9)
    torch.testing.assert_close(logps.double(), ref_logps, rtol=0, atol=2e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=0, atol=2e-5)


def test_trl_adapter_refuses_logits_that_are_not_a_multiple_of_the_heads():
    """A transform after the head that no config attribute names (here tanh): refused, not computed otherwise."""
    model = _CausalLM(tied=False, after_head=lambda z: 3 * torch.tanh(z))
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="not a multiple"):
        trl_per_token_logps_and_entropies(model, ids, torch.ones_like(ids), 4)


def test_linear_logprobs_head_on_a_slice_of_a_weight_trains_that_weight():
    """A weight given as a tensor that is not a Parameter (a vocabulary padded to 64 rows, sliced to the real
    61): it was wrapped in a new Parameter, a detached leaf, and the model's weight got no gradient."""
    emb = nn.Embedding(64, HIDDEN)
    head = LinearLogprobsHead(emb.weight[:VOCAB])
    g = torch.Generator().manual_seed(5)
    hidden, targets = torch.randn(7, HIDDEN, generator=g), torch.randint(0, VOCAB, (7,), generator=g)
    head(hidden, targets).logprobs.sum().backward()
    expected = torch.autograd.grad(torch.log_softmax(hidden @ emb.weight[:VOCAB].t(), -1)
                                   .gather(1, targets[:, None]).sum(), emb.weight)[0]
    assert emb.weight.grad is not None and list(head.parameters()) == []
    torch.testing.assert_close(emb.weight.grad, expected, rtol=1e-5, atol=1e-6)


def test_trl_adapter_refuses_a_model_that_soft_caps_its_logits():
    model = _CausalLM(tied=False)
    model.config = SimpleNamespace(final_logit_softcapping=30.0)
    ids = torch.randint(0, VOCAB, (1, 5))
    with pytest.raises(ValueError, match="soft-caps its logits"):
        trl_per_token_logps_and_entropies(model, ids, torch.ones_like(ids), 2)


def test_trl_adapter_takes_a_float32_model_whose_matmuls_run_in_tf32():
    """`torch.backends.cuda.matmul.allow_tf32` (or float32_matmul_precision "high"), common in trainers, puts fp32
    logits ~1e-3 off a float64 product: the adapter measured its factor against one and refused a plain model as
    soft-capped. The head's own product is the reference now. Found by review on 2026-12-07; TF32 emulated here by
    rounding the head's operands to its 10-bit mantissa, as a TF32 GEMM does."""
    def tf32(x):
        bits = x.contiguous().view(torch.int32)
        return ((bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF).view(torch.float32)

    model = _CausalLM(tied=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # logits of tens, so TF32's error is far past the fp32 tolerance
    model.lm_head.forward = lambda x: nn.functional.linear(tf32(x), tf32(model.lm_head.weight))
    g = torch.Generator().manual_seed(4)
    input_ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    logits = model(input_ids, attention_mask).logits.double()
    plain = model.model(input_ids, attention_mask).last_hidden_state.double() @ model.lm_head.weight.double().T
    assert float((logits - plain).abs().max()) > 1e-4 * float(logits.abs().max())  # what the old check refused
    logps, _ = trl_per_token_logps_and_entropies(model, input_ids, attention_mask, 5, temperature=1.0)
    ref_logps, _ = _trl_reference(model, input_ids, attention_mask, 5, 1.0)
    torch.testing.assert_close(logps.double(), ref_logps.double(), rtol=0, atol=0.1)  # TF32's own error, no factor
