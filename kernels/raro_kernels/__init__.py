"""raro_kernels: fused LM-head log-prob, entropy and policy-loss kernels (torch + triton only).

Public API:
- linear_logprobs(hidden, weight, targets, ...) -> LinearLogprobs(logprobs, entropy)
- policy_loss(logprobs, old_logprobs, advantages, mask, ...) -> (loss, metrics)
- linear_policy_loss(hidden, weight, targets, old_logprobs, advantages, mask, ...) -> (loss, metrics)

CUDA tensors run cuBLAS + Triton kernels; CPU tensors run a chunked PyTorch path with the same semantics and
memory bound. `backend="triton"` forces the kernels (for CPU tensors only under TRITON_INTERPRET=1, which must
be set before the first Triton call; safest before this package is imported), `backend="torch"` the PyTorch path.
"""
from raro_kernels.linear_logprobs import LinearLogprobs, linear_logprobs
from raro_kernels.linear_policy_loss import linear_policy_loss
from raro_kernels.policy_loss import policy_loss

__all__ = ["LinearLogprobs", "linear_logprobs", "linear_policy_loss", "policy_loss"]
