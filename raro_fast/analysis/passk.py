"""pass@k: the unbiased estimator from n samples with c correct, and curves over k = 1, 2, 4, ..., n."""
from __future__ import annotations

from typing import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k), computed as 1 - prod_{i=n-c+1..n} (1 - k/i): finite at n = 8192 where the
    binomials overflow a float. Exactly 1 when n - c < k (every k-subset holds a correct sample)."""
    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"pass_at_k: {name} must be an integer, got {v!r}")
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need n >= 1, 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, with n itself last even when it is not a power of two."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def pass_at_k_curve(counts: Sequence[tuple[int, int]], ks: Sequence[int] | None = None) -> dict[int, float]:
    """Mean pass@k over problems, `counts` = [(n, c), ...]; ks default to `default_ks` of the smallest n."""
    if not counts:
        raise ValueError("pass_at_k_curve: no problems")
    n_min = min(n for n, _ in counts)
    ks = list(ks) if ks is not None else default_ks(n_min)
    if max(ks) > n_min:
        raise ValueError(f"pass_at_k_curve: k={max(ks)} exceeds the fewest samples of a problem ({n_min})")
    return {k: sum(pass_at_k(n, c, k) for n, c in counts) / len(counts) for k in ks}


def avg_at_n(counts: Sequence[tuple[int, int]]) -> float:
    """Mean over problems of the fraction of correct samples (avg@n)."""
    if not counts:
        raise ValueError("avg_at_n: no problems")
    return sum(c / n for n, c in counts) / len(counts)
