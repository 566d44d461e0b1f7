"""Monte-Carlo check of the SNR model: plant a signal key, run the project's real router, count hits.

One trial is one query looking for its signal key among ``n`` blocks of ``B`` keys (no causal mask:
plain top-k over all blocks). By default the dot products follow the paper's model exactly, so any gap
between the measured hit rate and ``flashmoba.theory.snr.retrieval_probability`` comes either from
sampling noise or from an assumption the scenario breaks on purpose (heavy tails, correlated keys).

How the vectors are built (every query head has its own KV head, ``HQ = HKV``):

* Queries are unit basis vectors: the query of trial ``a`` is ``e_a``. Dot products do not depend on
  the basis, so this is any orthonormal set of ``d`` query directions seen in its own coordinates.
* Keys are ``mu_noise * (1, ..., 1) + z`` with noise ``z`` of variance ``1 / d`` per coordinate, so a
  key has ``E|z|^2 = 1`` (the paper's normalised vectors) and ``<e_a, k> = mu_noise + z_a`` has
  variance ``sigma^2 = 1 / d``: this is where the head dim enters. For trial ``a`` the signal key gets
  ``mu_signal`` and ``m - 1`` neighbouring keys of the same block get ``mu_cluster`` in coordinate
  ``a`` only.
* Because the noise coordinates are independent, the ``d`` orthogonal queries of one head are ``d``
  independent trials over the same keys; a routing call batches many heads of one sequence. The
  remaining tokens carry zero queries and are ignored: the router needs ``n * B`` keys, but only ``d``
  of its queries per head are useful.

Noise distributions (``z = (sqrt(1 - rho) * e + sqrt(rho) * b) / sqrt(d)``, ``b`` shared by a block):

* ``e`` standard Gaussian (default): the paper's assumptions hold exactly when ``rho = 0``;
* ``e`` Student-t with ``tail_dof`` degrees of freedom, rescaled to unit variance: heavy-tailed dot
  products, where the block means are far from Gaussian for small ``B`` (the CLT assumption);
* ``rho = block_correlation > 0``: dot products of the same block are correlated (as neighbouring keys
  of a real model are), so a block mean has variance ``sigma^2 (rho + (1 - rho) / B)`` instead of the
  paper's ``sigma^2 / B`` (the independence assumption).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

import flashmoba
from flashmoba._checks import check_float, check_int
from flashmoba.theory.snr import effective_separation, retrieval_probability, router_snr

__all__ = ["RoutingScenario", "RetrievalEstimate", "VARIANCE_MODELS", "simulate_retrieval"]

VARIANCE_MODELS = ("paper", "exact")
# Key elements (tokens * heads * head dim) generated per routing call: ~32 MB of float32 keys.
_KEYS_PER_CALL = 1 << 23


@dataclass(frozen=True)
class RoutingScenario:
    """One configuration of the routing problem (see the module docstring for the distributions).

    Attributes:
        head_dim: ``d``. block_size: ``B``. num_blocks: ``n``. topk: ``k`` (plain top-k, no own block).
        mu_signal, mu_noise: mean dot product with the signal key / with an unrelated key.
        cluster_size: ``m``, keys of the signal block (signal key included) with mean ``mu_cluster``.
        mu_cluster: required when ``cluster_size > 1``.
        tail_dof: None for Gaussian noise, else Student-t degrees of freedom (> 2).
        block_correlation: ``rho`` in [0, 1), correlation of dot products within a block.
    """

    head_dim: int = 64
    block_size: int = 128
    num_blocks: int = 16
    topk: int = 2
    mu_signal: float = 1.0
    mu_noise: float = 0.0
    cluster_size: int = 1
    mu_cluster: float | None = None
    tail_dof: float | None = None
    block_correlation: float = 0.0

    def __post_init__(self):
        for name in ("head_dim", "block_size", "num_blocks", "topk", "cluster_size"):
            check_int(name, getattr(self, name), 1)
        if self.cluster_size > self.block_size:
            raise ValueError(f"cluster_size ({self.cluster_size}) must not exceed block_size ({self.block_size})")
        if self.tail_dof is not None and not check_float("tail_dof", self.tail_dof) > 2:
            raise ValueError(f"tail_dof must be > 2 (finite variance), got {self.tail_dof}")
        # Validates the means, mu_cluster and block_correlation through the closed forms.
        self.snr("exact")

    @property
    def delta_mu_eff(self) -> float:
        """``delta_mu + (m - 1)(mu_cluster - mu_noise)``."""
        return effective_separation(self.mu_signal, self.mu_noise, self.cluster_size, self.mu_cluster)

    def snr(self, variance_model: str = "exact") -> float:
        """Pairwise router SNR. ``"paper"``: ``sigma^2 = 1/d``, independent dot products;
        ``"exact"``: the simulator's block-mean variance ``(rho + (1 - rho) / B) / d``."""
        if variance_model not in VARIANCE_MODELS:
            raise ValueError(f"variance_model must be one of {VARIANCE_MODELS}, got {variance_model!r}")
        rho = self.block_correlation if variance_model == "exact" else 0.0
        return router_snr(self.delta_mu_eff, self.block_size, head_dim=self.head_dim, block_correlation=rho)

    def predicted_retrieval(self, variance_model: str = "exact") -> float:
        """Order-statistics probability that the signal block is in the top-k (Gaussian block scores)."""
        return retrieval_probability(self.snr(variance_model), self.num_blocks, self.topk)


@dataclass(frozen=True)
class RetrievalEstimate:
    """Measured hit rate of the signal block: ``hits`` out of ``trials``."""

    hits: int
    trials: int

    @property
    def rate(self) -> float:
        return self.hits / self.trials

    @property
    def std(self) -> float:
        """Binomial standard error of ``rate``."""
        return math.sqrt(self.rate * (1.0 - self.rate) / self.trials)

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        """Wilson score interval ``(low, high)`` for the hit probability at ``z`` > 0 standard deviations.

        It always contains ``rate``, is ``[0, ...]`` with no hit and ``[..., 1]`` with no miss.
        """
        z = check_float("z", z, positive=True)
        n, hits, misses = self.trials, self.hits, self.trials - self.hits
        # The textbook form, center -/+ half-width, cancels at the ends: with no hit (no miss) it rounds to
        # a low bound just above a rate of 0 (a high bound just below a rate of 1), so the interval misses
        # its own point estimate. Multiplying center - half by its conjugate gives each bound as its
        # distance to its own end of [0, 1], with h hits, f misses and r = z sqrt(z^2 + 4 h f / n):
        #     low = 2 h^2 / (n (2 h + z^2 + r)),    1 - high = 2 f^2 / (n (2 f + z^2 + r)),
        # products and sums of non-negative terms: exactly 0 and 1 at the ends, no cancellation elsewhere.
        root = z * math.sqrt(z * z + 4 * hits * misses / n)
        low = 2 * hits * hits / (n * (2 * hits + z * z + root))
        high = 1 - 2 * misses * misses / (n * (2 * misses + z * z + root))
        return low, high


def _sample_keys(scenario: RoutingScenario, heads: int, device) -> torch.Tensor:
    """Noise keys ``[n, B, heads, d]`` plus ``mu_noise`` (no signal planted yet)."""
    s = scenario
    shape = (s.num_blocks, s.block_size, heads, s.head_dim)
    if s.tail_dof is None:
        e = torch.randn(shape, device=device)
    else:
        dof = torch.tensor(float(s.tail_dof), device=device)
        e = torch.distributions.StudentT(dof).sample(shape) * math.sqrt((s.tail_dof - 2) / s.tail_dof)
    rho = s.block_correlation
    if rho > 0:
        shared = torch.randn(s.num_blocks, 1, heads, s.head_dim, device=device)
        e.mul_(math.sqrt(1 - rho)).add_(shared, alpha=math.sqrt(rho))
    return e.mul_(1 / math.sqrt(s.head_dim)).add_(s.mu_noise)


def _run_batch(scenario: RoutingScenario, heads: int, device, backend: str) -> int:
    """Route ``heads * min(n B, d)`` independent trials (one sequence) in one call; return the hits."""
    s = scenario
    seq_len = s.num_blocks * s.block_size
    directions = min(seq_len, s.head_dim)
    keys = _sample_keys(s, heads, device)

    # Plant the signal and its cluster: trial (head, a) owns coordinate a of its m keys.
    signal_block = torch.randint(s.num_blocks, (heads, directions), device=device)
    start = torch.randint(s.block_size - s.cluster_size + 1, (heads, directions), device=device)
    offsets = torch.arange(s.cluster_size, device=device)
    lift = torch.full((s.cluster_size,), float((s.mu_cluster or 0.0) - s.mu_noise), device=device)
    lift[0] = s.mu_signal - s.mu_noise
    head_ix = torch.arange(heads, device=device).view(-1, 1, 1)
    dir_ix = torch.arange(directions, device=device).view(1, -1, 1)
    index = torch.broadcast_tensors(signal_block[..., None], start[..., None] + offsets, head_ix, dir_ix)
    keys.index_put_(index, lift.expand(index[0].shape), accumulate=True)

    queries = torch.zeros(seq_len, heads, s.head_dim, device=device)
    token = torch.arange(directions, device=device)
    queries[token, :, token] = 1.0  # token a queries along e_a in every head

    routing = flashmoba.moba_route_varlen(
        queries,
        keys.view(seq_len, heads, s.head_dim),
        torch.tensor([0, seq_len], dtype=torch.int32, device=device),
        block_size=s.block_size,
        topk=s.topk,
        causal=False,
        backend=backend,
    )
    chosen = routing.indices[:directions]  # [a, heads, topk]
    return int((chosen == signal_block.T[..., None]).any(-1).sum())


def simulate_retrieval(
    scenario: RoutingScenario,
    trials: int,
    *,
    seed: int = 0,
    device: str | torch.device | None = None,
    backend: str = "auto",
    progress: bool = False,
) -> RetrievalEstimate:
    """Measure how often the real router puts the signal block into the top-k.

    Args:
        scenario: the distributions and shapes (``RoutingScenario``).
        trials: minimum number of independent trials; whole routing calls are run, so slightly more
            may be counted (``RetrievalEstimate.trials`` says how many).
        seed: the random draws are reproducible per seed (the global RNG is left untouched).
        device: where to draw and route; default CUDA when available, else CPU.
        backend: router backend for ``flashmoba.moba_route_varlen`` ("auto": Triton on CUDA,
            the PyTorch reference on CPU).
        progress: show a tqdm bar over trials.

    Returns:
        ``RetrievalEstimate`` with the hit count and its Wilson interval.
    """
    if not isinstance(scenario, RoutingScenario):
        raise TypeError(f"scenario must be a RoutingScenario, got {type(scenario).__name__}")
    check_int("trials", trials, 1)
    check_int("seed", seed, 0)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    # Each head of a call is `directions` trials; spread the heads needed evenly over the fewest calls.
    seq_keys = scenario.num_blocks * scenario.block_size * scenario.head_dim
    directions = min(scenario.num_blocks * scenario.block_size, scenario.head_dim)
    heads_needed = math.ceil(trials / directions)
    calls = math.ceil(heads_needed / max(1, _KEYS_PER_CALL // seq_keys))
    heads = math.ceil(heads_needed / calls)
    per_call = heads * directions

    hits = done = 0
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices), torch.no_grad():
        torch.manual_seed(seed)
        with tqdm(total=trials, disable=not progress, unit="trial", leave=False) as bar:
            while done < trials:
                hits += _run_batch(scenario, heads, device, backend)
                done += per_call
                bar.update(min(per_call, trials - bar.n))
    return RetrievalEstimate(hits=hits, trials=done)
