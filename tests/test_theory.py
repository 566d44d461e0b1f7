"""The router SNR model: closed forms against hand values, the real router against the order-statistics
prediction (Monte-Carlo), and the real-model measurement hook against a naive float64 computation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import flashmoba
from flashmoba.cli import main as flashmoba_main
from flashmoba.nn import MoBAAttention
from flashmoba.theory import (
    RetrievalEstimate,
    RoutingScenario,
    block_score_variance,
    effective_separation,
    failure_probability,
    measure_router_snr,
    required_snr,
    retrieval_probability,
    router_snr,
    simulate_retrieval,
    snr_for_retrieval,
)
from flashmoba.theory.cli import demo_summary

BAND = 0.02  # the simulator must agree with the prediction within 2 percentage points ...
BAND_SIGMAS = 4  # ... and that band must be at least 4 binomial standard deviations wide


def trials_for(p: float) -> int:
    """Trials that make ``BAND`` at least ``BAND_SIGMAS`` binomial standard deviations at rate ``p``."""
    return math.ceil(BAND_SIGMAS**2 * p * (1 - p) / BAND**2)


def phi(x: float) -> float:
    """Standard normal CDF from math.erfc (independent of torch.special)."""
    return 0.5 * math.erfc(-x / math.sqrt(2))


# ----------------------------------------------------------------------------------------------------
# closed forms


def test_closed_forms_hand_values():
    # delta_mu_eff = (1.0 - 0.2) + 3 * (0.5 - 0.2)
    assert effective_separation(1.0, 0.2, 4, 0.5) == pytest.approx(1.7, abs=1e-15)
    assert effective_separation(1.0, 0.2) == pytest.approx(0.8, abs=1e-15)
    # SNR = 2 * sqrt(64 / 256) = 1; the paper's d=64 examples: sqrt(d / 2B) = 0.5, 0.354, 0.25
    assert router_snr(2.0, 128, head_dim=64) == pytest.approx(1.0, rel=1e-15)
    for b, factor in ((128, 0.5), (256, 0.35355339059327373), (512, 0.25)):
        assert router_snr(1.0, b, head_dim=64) == pytest.approx(factor, rel=1e-15)
    # Phi(-1) = 0.158655..., Phi^-1(0.875) = 1.150349... (normal tables); the paper's N=8K, B=128, k=8
    assert failure_probability(1.0) == pytest.approx(0.15865525393145707, rel=1e-12)
    assert required_snr(64, 8) == pytest.approx(1.1503493803760079, rel=1e-10)
    assert required_snr(8, 8) == -math.inf
    # Block variance with within-block correlation rho: sigma^2 (rho + (1 - rho) / B).
    assert block_score_variance(128, head_dim=64, block_correlation=0.01) == pytest.approx(
        (0.01 + 0.99 / 128) / 64, rel=1e-15
    )
    assert block_score_variance(128, noise_variance=0.5) == pytest.approx(0.5 / 128, rel=1e-15)


@pytest.mark.parametrize("head_dim", [32, 64, 256])
@pytest.mark.parametrize("block_size", [32, 128, 1024])
def test_halving_block_size_multiplies_snr_by_sqrt2(head_dim, block_size):
    full = router_snr(1.3, block_size, head_dim=head_dim)
    half = router_snr(1.3, block_size // 2, head_dim=head_dim)
    assert half / full == pytest.approx(math.sqrt(2), rel=1e-14)


@pytest.mark.parametrize("snr", [-1.0, 0.0, 0.4, 1.7, 3.0])
def test_retrieval_two_blocks_is_one_minus_pairwise_failure(snr):
    # With one noise block, "signal in the top-1 of 2" is exactly "D > 0".
    assert retrieval_probability(snr, 2, 1) == pytest.approx(phi(snr), abs=1e-12)
    assert retrieval_probability(snr, 2, 1) == pytest.approx(1 - failure_probability(snr), abs=1e-12)


@pytest.mark.parametrize("num_blocks,topk", [(16, 2), (64, 8), (5, 4), (100, 1)])
def test_retrieval_without_signal_is_k_over_n(num_blocks, topk):
    assert retrieval_probability(0.0, num_blocks, topk) == pytest.approx(topk / num_blocks, abs=1e-12)
    assert retrieval_probability(0.7, num_blocks, num_blocks) == 1.0


@pytest.mark.parametrize("snr,num_blocks,topk", [(0.8, 16, 2), (1.5, 64, 8), (0.3, 7, 3)])
def test_retrieval_matches_direct_sampling_of_gaussian_block_scores(snr, num_blocks, topk):
    # Independent of the integral: draw the n block scores in float64 and rank them.
    predicted = retrieval_probability(snr, num_blocks, topk)
    samples = 100_000
    scores = torch.randn(samples, num_blocks, dtype=torch.float64)
    scores[:, 0] += math.sqrt(2) * snr  # signal block: mean sqrt(2 v) SNR above the noise, v = 1
    rate = float(((scores[:, 1:] > scores[:, :1]).sum(1) < topk).double().mean())
    std = math.sqrt(predicted * (1 - predicted) / samples)
    assert abs(rate - predicted) < 5 * std


def test_snr_for_retrieval_inverts_the_retrieval_probability():
    assert snr_for_retrieval(phi(1.0), 2, 1) == pytest.approx(1.0, abs=1e-8)  # R(SNR, 2, 1) = Phi(SNR)
    for target, n, k in ((0.9, 64, 8), (0.95, 16, 2), (0.05, 16, 2)):
        assert retrieval_probability(snr_for_retrieval(target, n, k), n, k) == pytest.approx(target, abs=1e-8)
    for unreachable in (0.0, 1.0):
        with pytest.raises(ValueError, match="target"):
            snr_for_retrieval(unreachable, 16, 2)


def test_closed_forms_reject_bad_input():
    with pytest.raises(ValueError, match="mu_cluster"):
        effective_separation(1.0, 0.0, 3)
    with pytest.raises(TypeError, match="cluster_size"):
        effective_separation(1.0, 0.0, 2.0, 0.5)
    with pytest.raises(ValueError, match="block_size"):
        router_snr(1.0, 0, head_dim=64)
    with pytest.raises(ValueError, match="head_dim"):
        router_snr(1.0, 64)
    with pytest.raises(ValueError, match="block_correlation"):
        block_score_variance(64, head_dim=64, block_correlation=1.0)
    with pytest.raises(ValueError, match="noise_variance"):
        block_score_variance(64, noise_variance=0.0)
    with pytest.raises(ValueError, match="snr"):
        failure_probability(math.nan)
    with pytest.raises(TypeError, match="topk"):
        retrieval_probability(1.0, 16, True)
    with pytest.raises(ValueError, match="num_blocks"):
        required_snr(0, 1)


# ----------------------------------------------------------------------------------------------------
# Monte-Carlo with the real router


def test_wilson_interval_hand_value():
    # 8 hits of 10 at z = 1.96: the textbook Wilson interval [0.4902, 0.9433].
    low, high = RetrievalEstimate(hits=8, trials=10).interval()
    assert (low, high) == (pytest.approx(0.49016, abs=5e-5), pytest.approx(0.94332, abs=5e-5))
    # 0 of 10: [0, z^2 / (n + z^2)].
    assert RetrievalEstimate(hits=0, trials=10).interval() == (0.0, pytest.approx(1.96**2 / (10 + 1.96**2)))


@pytest.mark.parametrize("z", [1.0, 1.96, 3.29])
def test_wilson_interval_contains_its_rate_and_reaches_the_ends_exactly(z):
    # Rounding must not put a bound on the wrong side of the rate: with no miss, a high bound of
    # 1 - 1e-16 under a rate of 1.0 made the plot's error bars negative (128 of 128 at z = 1.96).
    for trials in [*range(1, 300), 512, 1024, 2048, 4096, 10**6]:
        for hits in {0, 1, trials // 2, trials - 1, trials}:
            estimate = RetrievalEstimate(hits=hits, trials=trials)
            low, high = estimate.interval(z)
            assert 0.0 <= low <= estimate.rate <= high <= 1.0, (hits, trials, low, high)
        assert RetrievalEstimate(hits=0, trials=trials).interval(z)[0] == 0.0
        assert RetrievalEstimate(hits=trials, trials=trials).interval(z)[1] == 1.0
    with pytest.raises(ValueError, match="z"):
        RetrievalEstimate(hits=1, trials=2).interval(0.0)


# Scenarios where the paper's assumptions hold (Gaussian dot products; independent, or correlated with
# the exact block variance), each with predictions from wrong formulas that the band must reject.
AGREEMENT_CASES = [
    pytest.param(RoutingScenario(head_dim=64, block_size=64), id="d64-B64"),
    pytest.param(RoutingScenario(head_dim=32, block_size=128, cluster_size=4, mu_cluster=0.5), id="d32-B128-clustered"),
    pytest.param(
        RoutingScenario(head_dim=64, block_size=128, mu_noise=0.3, mu_signal=2.3, block_correlation=0.01),
        id="d64-B128-correlated",
    ),
]


def wrong_predictions(scenario: RoutingScenario) -> dict[str, float]:
    """Retrieval predicted by plausible mistakes in the SNR formula."""
    snr = scenario.snr("exact")
    n, k = scenario.num_blocks, scenario.topk
    wrong = {
        "sqrt(d/B) (no 2)": retrieval_probability(snr * math.sqrt(2), n, k),
        "sqrt(d/4B)": retrieval_probability(snr / math.sqrt(2), n, k),
        "delta_mu_eff d/(2B) (no sqrt)": retrieval_probability(
            scenario.delta_mu_eff * scenario.head_dim / (2 * scenario.block_size), n, k
        ),
        "2x SNR": retrieval_probability(2 * snr, n, k),
        "pairwise 1 - p_fail": 1 - failure_probability(snr),
    }
    if scenario.block_correlation > 0:
        wrong["paper variance sigma^2/B"] = scenario.predicted_retrieval("paper")
    return wrong


@pytest.mark.parametrize("scenario", AGREEMENT_CASES)
def test_simulator_agrees_with_prediction_and_rejects_wrong_formulas(scenario):
    predicted = scenario.predicted_retrieval("exact")
    measured = simulate_retrieval(scenario, trials_for(predicted), seed=11, backend="reference")
    assert BAND_SIGMAS * math.sqrt(predicted * (1 - predicted) / measured.trials) <= BAND  # >= 4 sigma
    assert abs(measured.rate - predicted) <= BAND, (measured, predicted)
    for mistake, value in wrong_predictions(scenario).items():
        assert abs(measured.rate - value) > BAND, f"a {mistake} formula would pass: {value}"


def test_halving_block_size_equals_sqrt2_separation_in_simulation():
    # SNR(B / 2, delta) = SNR(B, sqrt(2) delta): the real router must not tell the two apart ...
    half_block = RoutingScenario(head_dim=64, block_size=64, mu_signal=1.0)
    stronger = RoutingScenario(head_dim=64, block_size=128, mu_signal=math.sqrt(2))
    same_signal = RoutingScenario(head_dim=64, block_size=128, mu_signal=1.0)
    trials = trials_for(half_block.predicted_retrieval())
    rates = {
        name: simulate_retrieval(s, trials, seed=seed, backend="reference")
        for seed, (name, s) in enumerate({"half": half_block, "stronger": stronger, "same": same_signal}.items())
    }
    std = math.hypot(rates["half"].std, rates["stronger"].std)
    assert abs(rates["half"].rate - rates["stronger"].rate) < BAND_SIGMAS * std
    # ... while the same signal at twice the block size is clearly worse.
    std = math.hypot(rates["half"].std, rates["same"].std)
    assert rates["half"].rate - rates["same"].rate > BAND_SIGMAS * std


def test_simulator_is_reproducible_and_leaves_the_global_rng_alone():
    scenario = RoutingScenario(head_dim=16, block_size=8, num_blocks=4, topk=1)
    state = torch.get_rng_state()
    first = simulate_retrieval(scenario, 300, seed=5, backend="reference")
    assert torch.equal(state, torch.get_rng_state())
    assert simulate_retrieval(scenario, 300, seed=5, backend="reference") == first
    assert first.trials >= 300


def test_simulator_counts_the_same_hits_with_the_triton_router():
    # Same draws, two routers: the Triton kernels (interpreted on CPU) must select the same blocks.
    scenario = RoutingScenario(head_dim=16, block_size=16, num_blocks=4, topk=2, cluster_size=3, mu_cluster=0.3)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    triton = simulate_retrieval(scenario, 64, seed=3, device=device, backend="triton")
    assert triton == simulate_retrieval(scenario, 64, seed=3, device=device, backend="reference")


def test_scenario_rejects_bad_input():
    with pytest.raises(ValueError, match="cluster_size"):
        RoutingScenario(block_size=8, cluster_size=9, mu_cluster=0.5)
    with pytest.raises(ValueError, match="tail_dof"):
        RoutingScenario(tail_dof=2.0)
    with pytest.raises(ValueError, match="block_correlation"):
        RoutingScenario(block_correlation=-0.1)
    with pytest.raises(ValueError, match="mu_cluster"):
        RoutingScenario(cluster_size=2)
    with pytest.raises(TypeError, match="head_dim"):
        RoutingScenario(head_dim=64.0)
    with pytest.raises(ValueError, match="variance_model"):
        RoutingScenario().snr("exactly")
    with pytest.raises(TypeError, match="scenario"):
        simulate_retrieval("d64", 10)
    with pytest.raises(ValueError, match="trials"):
        simulate_retrieval(RoutingScenario(), 0)


# ----------------------------------------------------------------------------------------------------
# measurement hook


class StandInMoBA(nn.Module):
    """A minimal layer honouring the MoBA-layer contract: block_size, topk, qk(hidden, cu_seqlens)."""

    def __init__(self, hidden, heads, kv_heads, head_dim, block_size, topk, attn_type="moba"):
        super().__init__()
        self.block_size, self.topk, self.attn_type = block_size, topk, attn_type
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim)
        self.o_proj = nn.Linear(heads * head_dim, hidden)

    def qk(self, hidden_states, cu_seqlens=None):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        return (
            self.q_proj(x).view(x.shape[0], self.heads, self.head_dim),
            self.k_proj(x).view(x.shape[0], self.kv_heads, self.head_dim),
        )

    def forward(self, hidden_states, cu_seqlens=None):
        q, k = self.qk(hidden_states, cu_seqlens)
        if cu_seqlens is None:  # batched [B, T, hidden]: equal-length sequences
            cu_seqlens = torch.arange(hidden_states.shape[0] + 1, dtype=torch.int32) * hidden_states.shape[1]
        v = self.v_proj(hidden_states.reshape(q.shape[0], -1)).view(k.shape)
        out = flashmoba.moba_attn_varlen(
            q, k, v, cu_seqlens, block_size=self.block_size, topk=self.topk, backend="reference"
        )
        return self.o_proj(out.reshape(q.shape[0], -1))


class TinyModel(nn.Module):
    """Embedding, a MoBA layer, a non-MoBA layer of the same class (must be skipped), a head."""

    def __init__(self, moba: nn.Module, dense: nn.Module, vocab=50, hidden=24):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.moba, self.dense = moba, dense
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids, cu_seqlens=None):
        h = self.embed(input_ids)
        h = h + self.moba(h, cu_seqlens).view_as(h)
        h = h + self.dense(h, cu_seqlens).view_as(h)
        return self.head(h)


def naive_router_stats(q, k, cu_seqlens, block_size, topk, min_past_blocks=3):
    """The hook's definitions, one query and head at a time, in float64 (shares no code with it)."""
    q, k = q.double(), k.double()
    group = q.shape[1] // k.shape[1]
    rows = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        for t in range(start, end):
            own = (t - start) // block_size
            if own < min_past_blocks:
                continue
            for h in range(q.shape[1]):
                a = k[start : start + own * block_size, h // group] @ q[t, h]
                star = int(torch.argmax(a))
                j_star = star // block_size
                in_signal = torch.zeros_like(a, dtype=torch.bool)
                in_signal[j_star * block_size : (j_star + 1) * block_size] = True
                mu = a[~in_signal].mean()
                scores = a.view(own, block_size).mean(1)
                noise_scores = torch.cat([scores[:j_star], scores[j_star + 1 :]])
                better = sum(
                    1
                    for j in range(own)
                    if j != j_star and (scores[j] > scores[j_star] or (scores[j] == scores[j_star] and j < j_star))
                )
                rows.append(
                    [
                        float(a[star] - mu),
                        float((a[in_signal] - mu).sum()),
                        float(a[~in_signal].var()),
                        float(noise_scores.var()),
                        float(better < topk - 1),
                    ]
                )
    mean = torch.tensor(rows, dtype=torch.float64).mean(0).tolist()
    return len(rows), dict(zip(("delta_mu", "delta_mu_eff", "noise_variance", "block_variance", "selected_rate"), mean))


def assert_matches_naive(result, q, k, cu_seqlens, block_size, topk):
    count, naive = naive_router_stats(q, k, cu_seqlens, block_size, topk)
    assert result.num_queries == count
    # float64 sums of up to L dot products of float32 inputs: rounding ~ L * eps64 * |a|^2.
    scale = float((q.double().abs().amax() * k.double().abs().amax() * q.shape[-1]) ** 2) + 1.0
    tol = q.shape[0] * torch.finfo(torch.float64).eps * scale * 64
    for name, value in naive.items():
        assert getattr(result, name) == pytest.approx(value, abs=tol), name
    b = block_size
    assert result.cluster_term == pytest.approx(naive["delta_mu_eff"] - naive["delta_mu"], abs=tol)
    assert result.snr == pytest.approx(naive["delta_mu_eff"] / math.sqrt(2 * b * naive["noise_variance"]), rel=1e-9)
    assert result.snr_blocks == pytest.approx(
        naive["delta_mu_eff"] / b / math.sqrt(2 * naive["block_variance"]), rel=1e-9
    )


def test_measure_hand_values():
    # d = 1, one head, B = 2: keys 0 2 | 5 1 | 1 -1 | 2 0 | 0 0 ; the two queries of block 4 are 1.
    class FixedQK(nn.Module):
        block_size, topk = 2, 2

        def forward(self, hidden_states):
            return hidden_states

        def qk(self, hidden_states, cu_seqlens=None):
            k = torch.tensor([0, 2, 5, 1, 1, -1, 2, 0, 0, 0], dtype=torch.float32).view(10, 1, 1)
            return torch.ones(10, 1, 1), k

    model = nn.Sequential(nn.Embedding(4, 3), FixedQK())
    ((name, result),) = measure_router_snr(model, torch.zeros(1, 10, dtype=torch.long), min_past_blocks=4).items()
    assert name == "1"
    # signal key 5 (block 1); noise keys 0 2 1 -1 2 0: mean 2/3, variance 22/15; noise blocks 1, 0, 1.
    expected = {
        "num_queries": 2,
        "delta_mu": 13 / 3,
        "cluster_term": 1 / 3,
        "delta_mu_eff": 14 / 3,
        "noise_variance": 22 / 15,
        "block_variance": 1 / 3,
        "selected_rate": 1.0,
        "snr": (14 / 3) / math.sqrt(2 * 2 * 22 / 15),
        "snr_blocks": (14 / 3 / 2) / math.sqrt(2 / 3),
        "block_correlation": ((1 / 3) / (22 / 15) - 1 / 2) / (1 - 1 / 2),
    }
    for field, value in expected.items():
        assert getattr(result, field) == pytest.approx(value, rel=1e-12), field


@pytest.mark.parametrize(
    "lens,heads,kv_heads,head_dim,block_size,topk",
    [
        ((37, 0, 53, 20), 4, 2, 16, 8, 3),
        ((70,), 2, 1, 8, 5, 2),
    ],
)
def test_measure_matches_naive_on_stand_in(lens, heads, kv_heads, head_dim, block_size, topk):
    hidden = 24
    model = TinyModel(
        StandInMoBA(hidden, heads, kv_heads, head_dim, block_size, topk),
        StandInMoBA(hidden, heads, kv_heads, head_dim, block_size, topk, attn_type="dense"),
    )
    ids = torch.randint(0, 50, (sum(lens),))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    results = measure_router_snr(model, ids, cu_seqlens=cu)
    assert list(results) == ["moba"]
    with torch.no_grad():
        q, k = model.moba.qk(model.embed(ids), cu)
    assert_matches_naive(results["moba"], q, k, cu, block_size, topk)


def test_measure_matches_naive_on_real_moba_attention():
    hidden = 32
    moba = MoBAAttention(hidden, 4, 2, 8, attn_type="moba", block_size=8, topk=3, kconv_size=3, backend="reference")
    dense = MoBAAttention(hidden, 4, 2, 8, attn_type="dense", backend="reference")
    model = TinyModel(moba, dense, hidden=hidden)
    ids = torch.randint(0, 50, (2, 45))
    results = measure_router_snr(model, ids)
    assert list(results) == ["moba"]
    with torch.no_grad():
        q, k = moba.qk(model.embed(ids))
    cu = torch.tensor([0, 45, 90], dtype=torch.int32)
    assert_matches_naive(results["moba"], q, k, cu, 8, 3)


def test_measure_rejects_bad_input():
    moba = StandInMoBA(24, 2, 2, 8, 16, 2)
    model = TinyModel(moba, StandInMoBA(24, 2, 2, 8, 16, 2, attn_type="dense"))
    with pytest.raises(ValueError, match="longer input_ids"):
        measure_router_snr(model, torch.randint(0, 50, (1, 40)))
    with pytest.raises(ValueError, match="min_past_blocks"):
        measure_router_snr(model, torch.randint(0, 50, (1, 40)), min_past_blocks=2)
    with pytest.raises(ValueError, match="no MoBA layer"):
        measure_router_snr(nn.Linear(3, 3), torch.zeros(1, 3))
    with pytest.raises(TypeError, match="input_ids"):
        measure_router_snr(model, [1, 2, 3])


# ----------------------------------------------------------------------------------------------------
# the command and the demo summary


def test_snr_command_writes_table_and_plot(tmp_path, capsys):
    plot, table = tmp_path / "snr.png", tmp_path / "snr.md"
    assert (
        flashmoba_main(
            [
                "snr",
                "--head-dims",
                "16",
                "--block-sizes",
                "16",
                "32",
                "--trials",
                "64",
                "--breakdown-head-dim",
                "16",
                "--device",
                "cpu",
                "--plot",
                str(plot),
                "--markdown",
                str(table),
            ]
        )
        == 0
    )
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line.strip("|").split("|") for line in table.read_text().splitlines() if line.startswith("| m=")]
    # ideal: 2 clusterings x 1 head dim x 2 block sizes; broken: 2 clusterings x 2 distributions x 2
    assert len(rows) == 4 + 8
    for keys, b, d, delta, snr, p_fail, _, predicted, *_ in rows[:4]:
        # mu_signal 1 and the default cluster m = 4, mu_cluster = 0.5
        assert float(delta) == (2.5 if keys.strip() == "m=4" else 1.0)
        assert float(snr) == pytest.approx(float(delta) * math.sqrt(int(d) / (2 * int(b))), abs=5e-4)
        # Cells have 3 decimals: 5e-4 of their own rounding plus the SNR's 5e-4 times a slope < 0.6.
        assert float(p_fail) == pytest.approx(phi(-float(snr)), abs=1e-3)
        assert float(predicted) == pytest.approx(retrieval_probability(float(snr), 16, 2), abs=1e-3)
    assert table.read_text() in capsys.readouterr().out


def test_snr_plot_draws_points_with_no_miss_or_no_hit(tmp_path, monkeypatch):
    # Every point measured at a rate of exactly 1 (or 0): the error bars end at the point itself.
    import flashmoba.theory.cli as snr_cli

    for hits in (128, 0):
        monkeypatch.setattr(
            snr_cli, "simulate_retrieval", lambda scenario, trials, hits=hits, **kwargs: RetrievalEstimate(hits, 128)
        )
        plot = tmp_path / f"snr{hits}.png"
        assert (
            flashmoba_main(
                [
                    "snr",
                    "--head-dims",
                    "128",
                    "--block-sizes",
                    "32",
                    "64",
                    "--trials",
                    "50",
                    "--device",
                    "cpu",
                    "--plot",
                    str(plot),
                ]
            )
            == 0
        )
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_summary_is_compact():
    text = demo_summary(trials=64, device="cpu")
    lines = text.splitlines()
    assert len(lines) <= 10
    for b in (32, 64, 128, 256, 512, 1024):
        assert any(line.split()[0] == str(b) for line in lines[2:])
