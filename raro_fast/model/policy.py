"""The trained module: a Hugging Face causal LM whose LM head is bypassed by the fused kernel.

The decoder body runs on a packed micro-batch (attention within each sequence only); its final hidden states go
straight to `raro_kernels.linear_logprobs` with the LM-head weight, so the tokens x vocab logits never exist.
FSDP2 wraps this module as the root unit, so the LM-head (or tied embedding) weight is gathered for the call.
The kernel computes softmax(hidden @ W.T / T): a model whose own logits are something else (Gemma 2's soft-capping,
Cohere's and Granite's logit scaling, an LM head with a bias) is refused when it is wrapped (`check_fused_lm_head`),
never trained on another distribution than the one it samples from.
"""
from __future__ import annotations

import torch
from torch import nn

from raro_fast.model.varlen import packed_hidden_states
from raro_fast.packing import PackedMicroBatch
from raro_kernels import linear_logprobs


# Config fields by which Hugging Face causal LMs change the LM head's output (logits = f(hidden @ W.T)), each with
# the values that leave it unchanged: the fused kernels cannot apply them.
LOGIT_TRANSFORMS: dict[str, tuple] = {
    "final_logit_softcapping": (None, 0, 0.0),  # Gemma 2/3, nanochat, ...: cap * tanh(logits / cap)
    "logit_scale": (None, 1, 1.0),  # Cohere: logits * scale
    "logits_scaling": (None, 1, 1.0),  # Granite: logits / scaling (HyperCLOVA X: * scaling)
    "output_multiplier": (None, 1, 1.0),  # MuseGlimmer/MuseSpark: logits * multiplier
    "lm_head_multiplier": (None, 1, 1.0),  # Falcon-H1: logits * multiplier
    "logits_mup_width_multiplier": (None, 1, 1.0),  # Inkling: (hidden / multiplier) @ W.T
}


def fused_lm_head_refusal(lm: nn.Module) -> str | None:
    """Why softmax(last_hidden_state @ W.T / T), what the fused kernels compute from the LM-head weight W, is not
    `lm`'s own next-token distribution, as far as its config and head show; None when nothing says so."""
    configs = [getattr(lm, "config", None)]
    if hasattr(configs[0], "get_text_config"):
        configs.append(configs[0].get_text_config())
    for config in configs:
        for name, identity in LOGIT_TRANSFORMS.items():
            value = getattr(config, name, None)
            if value not in identity:
                return (f"the model transforms its logits (config {name} = {value!r}), and the fused LM-head kernels "
                        "compute plain softmax(hidden @ W.T / T): log-probs and entropies would be another "
                        "distribution's")
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return (f"the model has no LM head with a [vocab, hidden] weight (get_output_embeddings() gave "
                f"{type(head).__name__}), which the fused LM-head kernels need")
    for config in configs:  # Inkling: logits[..., :unpadded_vocab_size]; the padded rows took probability mass
        kept = getattr(config, "unpadded_vocab_size", None)
        if kept is not None and kept != weight.shape[0]:
            return (f"the model cuts its logits to its first {kept} of {weight.shape[0]} rows (config "
                    "unpadded_vocab_size), and the fused LM-head kernels take a softmax over every row: log-probs and "
                    "entropies would be another distribution's")
    if getattr(head, "bias", None) is not None:
        return ("the model's LM head has a bias, and the fused LM-head kernels take a weight only: log-probs and "
                "entropies would leave it out")
    # Found by review: Dory's head (an nn.Linear) multiplies its logits by a learned scale, never applied or trained
    extra = [n for n, _ in [*head.named_parameters(), *head.named_buffers()] if n not in ("weight", "bias")]
    if extra or (isinstance(head, nn.Linear) and type(head).forward is not nn.Linear.forward):
        return (f"the model's LM head ({type(head).__name__}) computes more than hidden @ W.T"
                f"{' (its ' + ', '.join(extra) + ')' if extra else ''}, and the fused LM-head kernels take its weight "
                "only: log-probs and entropies would be another distribution's")
    return None


def check_fused_lm_head(lm: nn.Module, setting: str) -> None:
    """ValueError naming `setting` (the option that gave the model) where `fused_lm_head_refusal` finds a reason."""
    if (why := fused_lm_head_refusal(lm)) is not None:
        raise ValueError(f"{setting}: {why}; use a model without it")


class PolicyModel(nn.Module):
    def __init__(self, lm: nn.Module, *, setting: str = "model.path") -> None:
        super().__init__()
        check_fused_lm_head(lm, setting)  # at setup: before a step is trained on the wrong distribution
        # The decoder and its layers where Llama-style models keep them (found by review: GPT-2, Pythia and OPT
        # passed here, then stopped in an AttributeError that named decoder_layers)
        if not isinstance(getattr(getattr(lm, "model", None), "layers", None), nn.ModuleList):
            raise ValueError(f"{setting}: {type(lm).__name__} keeps no decoder layers at .model.layers, where the "
                             "trainer runs packed sequences and shards the model (Llama, Qwen, Mistral, Gemma and "
                             "the like do); use such a model")
        self.lm = lm

    @property
    def decoder_layers(self) -> list[nn.Module]:
        return list(self.lm.model.layers)

    def forward(
        self, mb: PackedMicroBatch, *, temperature: float = 1.0, return_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """fp32 log-probs [T] of mb.targets (0 where the target is -100) and optionally the entropy [T], at
        `temperature`, or at each token's own where the micro-batch carries them (`mb.temperatures`)."""
        # Where set, the LM head computes these rows only; the others read 0, as ignored. With none, every row goes to
        # the head as before: an untied head then still gets its (zero) gradient, which FSDP2 reduces on every rank.
        rows = mb.trained_rows if mb.trained_rows is not None and mb.trained_rows.numel() else None
        hidden_TH = packed_hidden_states(self.lm.model, mb, rows)
        weight_VH = self.lm.get_output_embeddings().weight
        # Per-token temperatures go to the kernel, which divides the fp32 logits: scaling the (bf16) hidden
        # states by T/T_t instead rounded both the factor and every scaled element.
        temperatures = temperature if mb.temperatures is None else mb.temperatures
        targets = mb.targets
        if rows is not None:
            targets = targets.index_select(0, rows)
            if mb.temperatures is not None:
                temperatures = temperatures.index_select(0, rows)
        out = linear_logprobs(hidden_TH, weight_VH, targets, temperature=temperatures, return_entropy=return_entropy)
        if rows is not None:
            entropy = None if out.entropy is None else _at_rows(out.entropy, rows, mb.targets)
            return _at_rows(out.logprobs, rows, mb.targets), entropy
        # Fresh tensors, not views of the kernel's buffers: FSDP2 hooks its pre-backward on the root's outputs,
        # and warns that a view could lose that hook.
        return out.logprobs.clone(), None if out.entropy is None else out.entropy.clone()

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The inner model's state dict under Hugging Face names (for weight sync and saving)."""
        return {k.removeprefix("lm."): v for k, v in self.state_dict().items()}


def _at_rows(values: torch.Tensor, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`values` of `rows` placed in a fresh [T] tensor (T = like's length), 0 elsewhere."""
    return values.new_zeros(like.shape).index_copy(0, rows, values)
