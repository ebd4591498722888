"""The trained module: a Hugging Face causal LM whose LM head is bypassed by the fused kernel.

The decoder body runs on a packed micro-batch (attention within each sequence only); its final hidden states go
straight to `raro_kernels.linear_logprobs` with the LM-head weight, so the tokens x vocab logits never exist.
FSDP2 wraps this module as the root unit, so the LM-head (or tied embedding) weight is gathered for the call.
"""
from __future__ import annotations

import torch
from torch import nn

from raro_fast.model.varlen import packed_hidden_states
from raro_fast.packing import PackedMicroBatch
from raro_kernels import linear_logprobs


class PolicyModel(nn.Module):
    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    @property
    def decoder_layers(self) -> list[nn.Module]:
        return list(self.lm.model.layers)

    def forward(
        self, mb: PackedMicroBatch, *, temperature: float = 1.0, return_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """fp32 log-probs [T] of mb.targets (0 where the target is -100) and optionally the entropy [T], at
        `temperature`, or at each token's own where the micro-batch carries them (`mb.temperatures`)."""
        hidden_TH = packed_hidden_states(self.lm.model, mb)
        weight_VH = self.lm.get_output_embeddings().weight
        # Per-token temperatures go to the kernel, which divides the fp32 logits: scaling the (bf16) hidden
        # states by T/T_t instead rounded both the factor and every scaled element.
        temperatures = temperature if mb.temperatures is None else mb.temperatures
        out = linear_logprobs(
            hidden_TH, weight_VH, mb.targets, temperature=temperatures, return_entropy=return_entropy
        )
        # Fresh tensors, not views of the kernel's buffers: FSDP2 hooks its pre-backward on the root's outputs,
        # and warns that a view could lose that hook.
        return out.logprobs.clone(), None if out.entropy is None else out.entropy.clone()

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The inner model's state dict under Hugging Face names (for weight sync and saving)."""
        return {k.removeprefix("lm."): v for k, v in self.state_dict().items()}
