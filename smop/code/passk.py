"""pass@k: the unbiased estimator of Chen et al. (2021), as mxeval and CRUXEval compute it."""

from __future__ import annotations

from collections.abc import Sequence

# The ks reported when the samples allow them: CRUXEval's 1 and 5, mxeval's 1, 10 and 100.
STANDARD_KS = (1, 5, 10, 100)


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k): the chance that k of the n samples, drawn without replacement, hold a pass.

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the large binomials."""
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"pass_at_k: {name}={value!r} must be an int")
    if n < 1:
        raise ValueError(f"pass_at_k: n={n} samples; need n >= 1")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: c={c} passing samples out of n={n}; need 0 <= c <= n")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k={k} with n={n} samples; need 1 <= k <= n")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """The mean of pass@k over problems, each given as (n samples, c passing)."""
    if not counts:
        raise ValueError("mean_pass_at_k: no problems to average over")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


def allowed_ks(n: int, ks: Sequence[int] = STANDARD_KS) -> list[int]:
    """The ks of `ks` that n samples per problem allow (k <= n), as mxeval reports only those."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"allowed_ks: n={n!r} samples per problem; need an int >= 1")
    return [k for k in ks if k <= n]
