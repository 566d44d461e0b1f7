"""Closed forms of the router's signal-to-noise model (FlashMoBA, section 3 and appendix B).

The model: a query looks for one signal key in block ``j*``. The router scores every block by the mean
of the query's dot products with the block's keys, so the signal block scores
``s* = (mu_signal + (m - 1) mu_cluster + (B - m) mu_noise) / B`` on average and every other block
``mu_noise``. With dot products of variance ``sigma^2`` the block scores have variance ``v``:

* the paper's variance model: independent dot products with ``sigma^2 = 1 / d`` (normalised vectors),
  so ``v = sigma^2 / B``;
* the exact variance of a block mean when the dot products of one block share a correlation ``rho``:
  ``v = sigma^2 (rho + (1 - rho) / B)`` (``rho = 0`` is the paper's case).

The pairwise SNR is ``E[s* - s_j] / sqrt(2 v)``, which for the paper's model is
``delta_mu_eff * sqrt(d / (2 B))``. Every quantity is computed in float64 with ``torch.special``.
"""

from __future__ import annotations

import math

import torch

from flashmoba._checks import check_float, check_int

__all__ = [
    "effective_separation",
    "block_score_variance",
    "failure_probability",
    "required_snr",
    "retrieval_probability",
    "router_snr",
    "snr_for_retrieval",
]

# Integration grid for retrieval_probability: +-12 standard deviations around the signal block's mean,
# where the standard normal density has fallen below 1e-31. The trapezoid rule converges exponentially
# on this smooth Gaussian-weighted integrand: 1025 points agree with 32769 to 1e-16.
_GRID_HALF_WIDTH = 12.0
_GRID_POINTS = 1025
# snr_for_retrieval bisects on this SNR range to this width.
_SNR_SEARCH = (-10.0, 40.0)
_SNR_TOLERANCE = 1e-9


def _check_correlation(block_correlation) -> None:
    if not 0.0 <= check_float("block_correlation", block_correlation) < 1.0:
        raise ValueError(f"block_correlation must be in [0, 1), got {block_correlation}")


def effective_separation(
    mu_signal: float, mu_noise: float, cluster_size: int = 1, mu_cluster: float | None = None
) -> float:
    """``delta_mu_eff = (mu_signal - mu_noise) + (m - 1) (mu_cluster - mu_noise)``.

    Args:
        mu_signal: mean dot product of the query with its signal key.
        mu_noise: mean dot product with an unrelated key.
        cluster_size: ``m``, the keys of the signal block (the signal key included) that lean towards
            the query.
        mu_cluster: their mean dot product (needed when ``cluster_size > 1``).
    """
    check_float("mu_signal", mu_signal)
    check_float("mu_noise", mu_noise)
    check_int("cluster_size", cluster_size, 1)
    if cluster_size == 1:
        return float(mu_signal - mu_noise)
    if mu_cluster is None:
        raise ValueError("mu_cluster is required when cluster_size > 1")
    check_float("mu_cluster", mu_cluster)
    return float((mu_signal - mu_noise) + (cluster_size - 1) * (mu_cluster - mu_noise))


def block_score_variance(
    block_size: int,
    *,
    head_dim: int | None = None,
    noise_variance: float | None = None,
    block_correlation: float = 0.0,
) -> float:
    """Variance of one block's router score (the mean of its ``B`` dot products with the query).

    Args:
        block_size: ``B``.
        head_dim: ``d``; gives the paper's ``sigma^2 = 1 / d`` when ``noise_variance`` is not given.
        noise_variance: ``sigma^2``, the variance of one query-key dot product.
        block_correlation: ``rho``, the correlation of two dot products of the same block
            (0: the paper's independence assumption).

    Returns:
        ``sigma^2 (rho + (1 - rho) / B)``.
    """
    check_int("block_size", block_size, 1)
    _check_correlation(block_correlation)
    if noise_variance is None:
        if head_dim is None:
            raise ValueError("give head_dim (for the paper's sigma^2 = 1/d) or noise_variance")
        check_int("head_dim", head_dim, 1)
        noise_variance = 1.0 / head_dim
    else:
        check_float("noise_variance", noise_variance)
        if noise_variance <= 0:
            raise ValueError(f"noise_variance must be > 0, got {noise_variance}")
    return noise_variance * (block_correlation + (1.0 - block_correlation) / block_size)


def router_snr(
    delta_mu_eff: float,
    block_size: int,
    *,
    head_dim: int | None = None,
    noise_variance: float | None = None,
    block_correlation: float = 0.0,
) -> float:
    """Pairwise SNR of the signal block against one noise block, ``E[D] / sqrt(Var D)``.

    ``D = s* - s_j`` has mean ``delta_mu_eff / B`` and variance ``2 v`` (see
    ``block_score_variance``, which takes the same keyword arguments). With the paper's
    assumptions (``sigma^2 = 1/d``, ``rho = 0``) this is ``delta_mu_eff * sqrt(d / (2 B))``.
    """
    check_float("delta_mu_eff", delta_mu_eff)
    variance = block_score_variance(
        block_size,
        head_dim=head_dim,
        noise_variance=noise_variance,
        block_correlation=block_correlation,
    )
    return delta_mu_eff / block_size / math.sqrt(2.0 * variance)


def failure_probability(snr: float) -> float:
    """``p_fail = Phi(-SNR)``: probability that one given noise block outscores the signal block."""
    check_float("snr", snr)
    return float(torch.special.ndtr(torch.tensor(-snr, dtype=torch.float64)))


def required_snr(num_blocks: int, topk: int) -> float:
    """The paper's reliability threshold ``Phi^-1(1 - k / n)`` (``p_fail < k / n``).

    Returns ``-inf`` when ``topk >= num_blocks`` (every block is selected).
    """
    check_int("num_blocks", num_blocks, 1)
    check_int("topk", topk, 1)
    if topk >= num_blocks:
        return -math.inf
    return float(torch.special.ndtri(torch.tensor(1.0 - topk / num_blocks, dtype=torch.float64)))


def _binomial_cdf(max_successes: int, trials: int, log_p: torch.Tensor, log_q: torch.Tensor):
    """``P(Binomial(trials, p) <= max_successes)`` elementwise, from ``log p`` and ``log (1 - p)``."""
    j = torch.arange(max_successes + 1, dtype=torch.float64)
    log_choose = math.lgamma(trials + 1) - torch.lgamma(j + 1) - torch.lgamma(trials - j + 1)
    log_terms = log_choose + j * log_p[..., None] + (trials - j) * log_q[..., None]
    return torch.logsumexp(log_terms, dim=-1).exp()


def retrieval_probability(snr: float, num_blocks: int, topk: int) -> float:
    """Probability that the signal block is among the top-k of ``n`` blocks (order statistics).

    The signal block and the ``n - 1`` noise blocks have Gaussian scores of equal variance ``v``
    (large-B CLT), independent of each other, and the signal block's mean is higher by
    ``sqrt(2 v) * SNR``. In units of ``sqrt(v)`` around the noise mean the signal score is
    ``z ~ N(sqrt(2) SNR, 1)``; given ``z``, each noise block beats it independently with probability
    ``Phi(-z)``, so the signal block is retrieved when at most ``k - 1`` of them do:

        R = integral phi(z - sqrt(2) SNR) * P(Binomial(n - 1, Phi(-z)) <= k - 1) dz,

    integrated with the trapezoid rule on a fine grid. Unlike the pairwise rule ``p_fail < k/n``, this
    accounts for the noise blocks all competing against the same signal score. Checks:
    ``R(SNR, n=2, k=1) = Phi(SNR)`` and ``R(0, n, k) = k / n``.
    """
    check_float("snr", snr)
    check_int("num_blocks", num_blocks, 1)
    check_int("topk", topk, 1)
    if topk >= num_blocks:
        return 1.0
    center = math.sqrt(2.0) * snr
    z = torch.linspace(center - _GRID_HALF_WIDTH, center + _GRID_HALF_WIDTH, _GRID_POINTS, dtype=torch.float64)
    density = torch.exp(-0.5 * (z - center) ** 2) / math.sqrt(2.0 * math.pi)
    retrieved = _binomial_cdf(topk - 1, num_blocks - 1, torch.special.log_ndtr(-z), torch.special.log_ndtr(z))
    return float(torch.trapezoid(density * retrieved, z).clamp(0.0, 1.0))


def snr_for_retrieval(target: float, num_blocks: int, topk: int) -> float:
    """The SNR at which ``retrieval_probability`` reaches ``target`` (bisection; it is increasing).

    With the paper's variance model the largest block size that reaches it is
    ``B = d * delta_mu_eff^2 / (2 * SNR^2)``. ``target`` must lie strictly between the no-signal rate
    ``k / n`` reached at SNR 0 and 1 (more precisely, in the range reached for SNR in [-10, 40]).
    """
    check_float("target", target)
    check_int("num_blocks", num_blocks, 1)
    check_int("topk", topk, 1)
    low, high = _SNR_SEARCH
    if not retrieval_probability(low, num_blocks, topk) < target < retrieval_probability(high, num_blocks, topk):
        raise ValueError(
            f"target must be a retrieval probability reachable with top-{topk} of {num_blocks} blocks, got {target}"
        )
    while high - low > _SNR_TOLERANCE:
        middle = 0.5 * (low + high)
        if retrieval_probability(middle, num_blocks, topk) < target:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)
