"""raro_kernels: fused LM-head log-prob, entropy and policy-loss kernels (torch + triton only)."""
