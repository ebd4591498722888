"""Drop-ins for the trainers people already run: the same inputs and outputs as the computation they replace, the
logits never whole.

- `LinearLogprobsHead`: an `nn.Module` around an LM head for any trainer: (hidden, targets) -> log-probs, entropy.
- `FusedLinearForPPO` / `fused_linear_for_ppo`: verl's fused-kernel interface, (hidden_states, vocab_weights,
  input_ids, temperature) -> (log_probs, entropy).
- `linear_cross_entropy`: cross-entropy with `reduction` as Liger's fused linear cross-entropy and Cut-Cross-
  Entropy take it, for code that switches from them.
- `trl_per_token_logps_and_entropies`: what TRL's GRPO trainer computes per completion token from a causal LM
  (log-probs of the completion ids at the sampling temperature, and optionally the entropies), from the decoder's
  last hidden state and the LM head instead of the model's logits.

Each equals its counterpart's own formula on the same inputs (kernels/tests/test_adapters.py).
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from raro_kernels.linear_logprobs import LinearLogprobs, linear_logprobs


class LinearLogprobsHead(nn.Module):
    """Per-token log-probs (and entropy) of `targets` under softmax(head(hidden) / temperature), from an LM head
    given as an `nn.Linear` without bias or as its weight [V, H] (e.g. a tied embedding's). The weight is shared,
    not copied: training the head trains the model's. A weight that is a tensor and not an `nn.Parameter` (a slice
    of one, `emb.weight[:V]`) is used as it is, in its graph, and is not one of this module's parameters (wrapped in
    a new Parameter it was a detached leaf: the model's weight got no gradient)."""

    def __init__(self, head: nn.Linear | nn.Parameter | torch.Tensor, *, ignore_index: int = -100) -> None:
        super().__init__()
        if isinstance(head, nn.Linear):
            if head.bias is not None:
                raise ValueError("LinearLogprobsHead: the LM head has a bias; the fused kernels take a weight only "
                                 "(LM heads of decoder models have none)")
            head = head.weight
        if head.dim() != 2:
            raise ValueError(f"LinearLogprobsHead: the head's weight must be [V, H], got shape {tuple(head.shape)}")
        self.weight = head  # nn.Module registers a Parameter and keeps any other tensor as a plain attribute
        self.ignore_index = ignore_index

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                return_entropy: bool = False) -> LinearLogprobs:
        return linear_logprobs(hidden, self.weight, targets, temperature=temperature, return_entropy=return_entropy,
                               ignore_index=self.ignore_index)


def fused_linear_for_ppo(hidden_states: torch.Tensor, vocab_weights: torch.Tensor, input_ids: torch.Tensor,
                         temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's interface: hidden_states [..., H], vocab_weights [V, H], input_ids [...] (the tokens to score) ->
    (log-probs [...], entropy [...]) of softmax(hidden_states @ vocab_weights.T / temperature), both fp32."""
    out = linear_logprobs(hidden_states, vocab_weights, input_ids, temperature=temperature, return_entropy=True)
    return out.logprobs, out.entropy


class FusedLinearForPPO(nn.Module):
    """verl's `FusedLinearForPPO` module interface (`forward(hidden_states, vocab_weights, input_ids, temperature)`),
    on the fused kernels; it has no parameters of its own. verl's constructor arguments (`chunk_size`,
    `impl_backend`) are accepted and unused: the kernels choose their own chunks and backend."""

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch") -> None:
        super().__init__()

    def forward(self, hidden_states: torch.Tensor, vocab_weights: torch.Tensor, input_ids: torch.Tensor,
                temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        return fused_linear_for_ppo(hidden_states, vocab_weights, input_ids, temperature)


def trl_per_token_logps_and_entropies(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                      logits_to_keep: int, *, temperature: float = 1.0, compute_entropy: bool = False,
                                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """TRL GRPO's per-token log-probs of the last `logits_to_keep` tokens of `input_ids` (the completion), each
    predicted from the position before it at `temperature`, and their entropies if `compute_entropy`: [B,
    logits_to_keep] fp32 each. `model` is a Hugging Face causal LM whose decoder is `model.model` (returning
    `last_hidden_state`) and whose head is `model.get_output_embeddings()` (Llama, Qwen2, Mistral, Gemma without
    soft-capping, ...). A model that scales its logits after the head (Granite divides by `logits_scaling`,
    Cohere multiplies by `logit_scale`) is measured once (`_logit_factor`) and the factor folded into the
    temperature; one that transforms them otherwise is refused. The entropies carry no gradient, as TRL's (computed
    under no_grad there): an entropy bonus built on them trains nothing in either (found by review)."""
    head = model.get_output_embeddings()
    if getattr(getattr(model, "config", None), "final_logit_softcapping", None):
        raise ValueError("trl_per_token_logps_and_entropies: the model soft-caps its logits (Gemma 2's "
                         "final_logit_softcapping); the fused kernels compute plain softmax(hidden @ W.T / T)")
    if getattr(head, "bias", None) is not None:
        raise ValueError("trl_per_token_logps_and_entropies: the LM head has a bias; the fused kernels take a weight only")
    factor = _logit_factor(model, head, input_ids, attention_mask)
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    # position t predicts token t + 1: the hidden states before each completion token
    hidden = hidden[:, -logits_to_keep - 1 : -1]
    out = linear_logprobs(hidden, head.weight, input_ids[:, -logits_to_keep:], temperature=temperature / factor,
                          return_entropy=compute_entropy)
    return out.logprobs, None if out.entropy is None else out.entropy.detach()


# model -> c, its logits being c * (last hidden state @ W.T): measured once per model (a property of its code and
# config, not of its weights).
_LOGIT_FACTORS: "weakref.WeakKeyDictionary[nn.Module, float]" = weakref.WeakKeyDictionary()


def _logit_factor(model: nn.Module, head: nn.Module, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor) -> float:
    """c with model(...).logits = c * (model.model(...).last_hidden_state @ weight.T), from the model's own forward
    on the last position of the first sequence (one sequence, one position's logits; the decoder's output is
    caught by a hook in that same forward, so dropout cannot tell them apart). Names of post-head scalings differ
    across models (Granite divides by `logits_scaling`, HyperCLOVA X multiplies by one of that name), so the
    factor is measured, not read. A transform that is not a factor raises ValueError."""
    if model in _LOGIT_FACTORS:
        return _LOGIT_FACTORS[model]
    caught = []
    hook = model.model.register_forward_hook(lambda _m, _args, out: caught.append(out.last_hidden_state[:, -1]))
    try:
        with torch.no_grad():
            logits = model(input_ids=input_ids[:1], attention_mask=attention_mask[:1], logits_to_keep=1).logits
    finally:
        hook.remove()
    if not caught:
        raise ValueError("trl_per_token_logps_and_entropies: the model's forward did not call model.model")
    theirs = logits[:, -1].double()
    # By the model's own head where it has one: the same product in the same dtype and matmul precision (found by
    # review: in float64 here, a float32 model under TF32 matmuls, ~1e-3 off, was refused as soft-capped).
    with torch.no_grad():
        plain = (head(caught[-1]) if isinstance(head, nn.Linear)
                 else caught[-1].double() @ head.weight.double().t()).double()
    # The model's logits come from its own product in its dtype (16-bit: ~3 significant digits).
    tol = (3e-2 if logits.dtype in (torch.float16, torch.bfloat16) else 1e-4) * float(theirs.abs().max()) + 1e-6
    factor = 1.0
    if float((theirs - plain).abs().max()) > tol:
        factor = float((theirs * plain).sum() / (plain * plain).sum().clamp_min(1e-300))
        if not factor > 0 or float((theirs - factor * plain).abs().max()) > tol:
            raise ValueError("trl_per_token_logps_and_entropies: the model's logits are not a multiple of its last "
                             "hidden state times the LM head's weight (a transform after the head, such as "
                             "soft-capping); the fused kernels compute plain softmax(hidden @ W.T / T)")
    _LOGIT_FACTORS[model] = factor
    return factor


REDUCTIONS = ("mean", "sum", "none")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         reduction: str = "mean", ignore_index: int = -100, temperature: float = 1.0) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T / temperature, targets) without the logits: "none" gives fp32 [...] (0 at
    ignored positions), "sum" their sum, "mean" their mean over the positions not ignored (as torch's, NaN when
    every position is ignored)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    loss = -linear_logprobs(hidden, weight, targets, temperature=temperature, ignore_index=ignore_index).logprobs
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (targets != ignore_index).sum()
