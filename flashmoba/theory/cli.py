"""``flashmoba snr``: the router SNR theory against the Monte-Carlo simulator, as tables and a plot.

Three key distributions are swept (see ``flashmoba.theory.simulate``):

* ``ideal``: Gaussian, independent dot products: every assumption of the paper holds, over the whole
  grid of block sizes and head dims;
* ``heavy-tailed``: Student-t dot products (at one head dim): breaks the large-B CLT assumption;
* ``correlated``: dot products of one block share a correlation (at one head dim): breaks the
  independence assumption, so the paper's ``sigma^2 / B`` block variance is wrong.

Each point is run without and with clustering (``m`` keys of the signal block with ``mu_cluster``).
A measurement "differs" when the prediction lies outside its 99.9 % Wilson interval. The tables are
printed (and written with ``--markdown PATH``); the plot is drawn only with ``--plot PATH`` (matplotlib).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from flashmoba._checks import UsageError, check_device, check_float, check_int, check_option, resolve_backend
from flashmoba.theory.simulate import RetrievalEstimate, RoutingScenario, simulate_retrieval
from flashmoba.theory.snr import failure_probability, required_snr

__all__ = ["add_arguments", "run", "demo_summary"]

DIFFERS_Z = 3.29  # two-sided 99.9 %: about 1 in 1000 ideal points is flagged by chance
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class SweepPoint:
    """One simulated configuration and its measurement."""

    distribution: str  # "ideal", "heavy-tailed" or "correlated"
    clustered: bool
    scenario: RoutingScenario
    measured: RetrievalEstimate

    def differs(self, variance_model: str) -> bool:
        """Whether the prediction under ``variance_model`` is outside the 99.9 % interval."""
        low, high = self.measured.interval(DIFFERS_Z)
        return not low <= self.scenario.predicted_retrieval(variance_model) <= high


def _scenario_grid(args) -> list[tuple[str, bool, RoutingScenario]]:
    base = RoutingScenario(num_blocks=args.num_blocks, topk=args.topk, mu_signal=args.mu_signal, mu_noise=args.mu_noise)
    clusterings = {
        False: {},
        True: {"cluster_size": args.cluster_size, "mu_cluster": args.mu_cluster},
    }
    grid = []
    for clustered, cluster in clusterings.items():
        for d in args.head_dims:
            for b in args.block_sizes:
                grid.append(("ideal", clustered, dataclasses.replace(base, head_dim=d, block_size=b, **cluster)))
        breakers = {
            "heavy-tailed": {"tail_dof": args.tail_dof},
            "correlated": {"block_correlation": args.block_correlation},
        }
        for name, breaker in breakers.items():
            for b in args.block_sizes:
                grid.append(
                    (
                        name,
                        clustered,
                        dataclasses.replace(base, head_dim=args.breakdown_head_dim, block_size=b, **cluster, **breaker),
                    )
                )
    return grid


def _sweep(args) -> list[SweepPoint]:
    points = []
    for distribution, clustered, scenario in tqdm(_scenario_grid(args), desc="snr sweep", unit="config"):
        measured = simulate_retrieval(scenario, args.trials, seed=args.seed, device=args.device, backend=args.backend)
        points.append(SweepPoint(distribution, clustered, scenario, measured))
    return points


def _measured_cell(point: SweepPoint) -> str:
    low, high = point.measured.interval()
    return f"{point.measured.rate:.3f} [{low:.3f}, {high:.3f}]"


def _ideal_table(points: list[SweepPoint], args) -> str:
    threshold = required_snr(args.num_blocks, args.topk)
    lines = [
        f"Ideal keys (the paper's assumptions hold), top-{args.topk} of {args.num_blocks} blocks; "
        f"paper rule: reliable when SNR > Phi^-1(1 - k/n) = {threshold:.2f}",
        "",
        "| keys | B | d | delta_mu_eff | SNR | p_fail | paper rule | predicted | measured [95% CI] | differs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        if p.distribution != "ideal":
            continue
        s = p.scenario
        snr = s.snr("paper")
        lines.append(
            f"| m={s.cluster_size} | {s.block_size} | {s.head_dim} | {s.delta_mu_eff:.2f} | {snr:.3f} "
            f"| {failure_probability(snr):.3f} | {'reliable' if snr > threshold else 'unreliable'} "
            f"| {s.predicted_retrieval('exact'):.3f} | {_measured_cell(p)} "
            f"| {'**yes**' if p.differs('exact') else 'no'} |"
        )
    return "\n".join(lines)


def _breakdown_table(points: list[SweepPoint], args) -> str:
    lines = [
        f"Broken assumptions at d={args.breakdown_head_dim}: heavy-tailed = Student-t "
        f"(dof {args.tail_dof}) dot products (CLT); correlated = within-block correlation "
        f"{args.block_correlation} (independence). 'paper' uses sigma^2/B, 'exact' the simulator's "
        "block variance.",
        "",
        "| keys | distribution | B | SNR paper | SNR exact | predicted paper | predicted exact "
        "| measured [95% CI] | paper differs | exact differs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        if p.distribution == "ideal":
            continue
        s = p.scenario
        lines.append(
            f"| m={s.cluster_size} | {p.distribution} | {s.block_size} | {s.snr('paper'):.3f} "
            f"| {s.snr('exact'):.3f} | {s.predicted_retrieval('paper'):.3f} "
            f"| {s.predicted_retrieval('exact'):.3f} | {_measured_cell(p)} "
            f"| {'**yes**' if p.differs('paper') else 'no'} | {'**yes**' if p.differs('exact') else 'no'} |"
        )
    return "\n".join(lines)


def _plot(points: list[SweepPoint], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    columns = [*args.head_dims, "broken"]
    fig, axes = plt.subplots(2, len(columns), figsize=(3.2 * len(columns), 6.6), sharey=True, squeeze=False)
    threshold = required_snr(args.num_blocks, args.topk)
    styles = {"ideal": ("C0", "o"), "heavy-tailed": ("C1", "^"), "correlated": ("C2", "s")}
    for row, clustered in enumerate((False, True)):
        for col, column in enumerate(columns):
            ax = axes[row, col]
            head_dim = args.breakdown_head_dim if column == "broken" else column
            chosen = [
                p
                for p in points
                if p.clustered == clustered
                and (
                    p.distribution != "ideal"
                    if column == "broken"
                    else p.distribution == "ideal" and p.scenario.head_dim == column
                )
            ]
            for distribution, (color, marker) in styles.items():
                group = [p for p in chosen if p.distribution == distribution]
                if not group:
                    continue
                blocks = [p.scenario.block_size for p in group]
                paper_color = color if distribution == "ideal" else "k"
                ax.plot(blocks, [p.scenario.predicted_retrieval("paper") for p in group], "-", color=paper_color, lw=1)
                if distribution == "correlated":
                    ax.plot(blocks, [p.scenario.predicted_retrieval("exact") for p in group], ":", color=color, lw=1.5)
                rates = [p.measured.rate for p in group]
                bounds = [p.measured.interval() for p in group]
                err = [[r - lo for r, (lo, _) in zip(rates, bounds)], [hi - r for r, (_, hi) in zip(rates, bounds)]]
                ax.errorbar(blocks, rates, yerr=err, fmt=marker, color=color, ms=4, capsize=2)
                off = [p for p in group if p.differs("paper")]
                ax.scatter(
                    [p.scenario.block_size for p in off],
                    [p.measured.rate for p in off],
                    s=110,
                    facecolors="none",
                    edgecolors="red",
                    lw=1.3,
                )
            # The paper's rule calls blocks below B* reliable, where SNR(B*) = Phi^-1(1 - k/n).
            b_star = head_dim * chosen[0].scenario.delta_mu_eff ** 2 / (2 * threshold**2)
            left, right = min(args.block_sizes) / 1.3, max(args.block_sizes) * 1.3
            ax.axvspan(left, min(max(b_star, left), right), color="0.9", zorder=0)
            ax.set_xscale("log", base=2)
            ax.set_xticks(args.block_sizes, [str(b) for b in args.block_sizes], fontsize=7)
            ax.set_xlim(left, right)
            ax.set_ylim(0, 1.02)
            name = "assumptions broken" if column == "broken" else "ideal keys"
            cluster = f"m={args.cluster_size}" if clustered else "m=1"
            ax.set_title(f"{name}, d={head_dim}, {cluster}", fontsize=9)
            if row == 1:
                ax.set_xlabel("block size B")
            if col == 0:
                ax.set_ylabel("P(signal block in top-k)")
    legend = [
        Line2D([], [], color="C0", label="prediction, ideal keys (order statistics)"),
        Line2D([], [], color="k", label="paper's prediction (sigma^2 = 1/d, independent, Gaussian)"),
        Line2D([], [], color="C2", ls=":", lw=1.5, label="prediction with exact block variance"),
        Line2D([], [], color="C0", marker="o", ls="", label="real router, ideal keys (95% CI)"),
        Line2D(
            [], [], color="C1", marker="^", ls="", label=f"real router, heavy-tailed keys (t, dof {args.tail_dof:g})"
        ),
        Line2D(
            [],
            [],
            color="C2",
            marker="s",
            ls="",
            label=f"real router, correlated keys (rho {args.block_correlation:g})",
        ),
        Line2D(
            [], [], marker="o", ls="", mfc="none", mec="red", ms=10, label="differs from the paper's prediction (99.9%)"
        ),
        Line2D([], [], color="0.85", lw=8, label="paper's rule says reliable (SNR > Phi^-1(1-k/n))"),
    ]
    fig.legend(handles=legend, loc="lower center", ncol=3, fontsize=8)
    fig.suptitle(
        f"MoBA router: probability that the signal block is in the top-{args.topk} of "
        f"{args.num_blocks} blocks, theory vs the real router ({points[0].measured.trials}+ trials "
        "per point)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.11, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``flashmoba snr``."""
    parser.add_argument("--head-dims", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--block-sizes", type=int, nargs="+", default=list(BLOCK_SIZES))
    parser.add_argument("--num-blocks", type=int, default=16, help="n, blocks competing per query")
    parser.add_argument("--topk", type=int, default=2, help="k, blocks selected per query")
    parser.add_argument("--mu-signal", type=float, default=1.0)
    parser.add_argument("--mu-noise", type=float, default=0.0)
    parser.add_argument("--cluster-size", type=int, default=4, help="m of the clustered runs")
    parser.add_argument("--mu-cluster", type=float, default=0.5)
    parser.add_argument("--tail-dof", type=float, default=2.5, help="Student-t dof, heavy-tailed runs")
    parser.add_argument("--block-correlation", type=float, default=0.01, help="rho of correlated runs")
    parser.add_argument(
        "--breakdown-head-dim", type=int, default=64, help="head dim of the heavy-tailed and correlated runs"
    )
    parser.add_argument("--trials", type=int, default=1000, help="trials per configuration")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--backend", default="auto", choices=("auto", "reference", "triton"))
    parser.add_argument(
        "--plot", type=Path, default=None, help="draw the figure into this PNG (needs matplotlib); default: no plot"
    )
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables here")


def _check_arguments(args: argparse.Namespace) -> None:
    """UsageError naming the option for any value the sweep cannot run with (before any simulation)."""
    for option, values in (("--head-dims", args.head_dims), ("--block-sizes", args.block_sizes)):
        for value in values:
            check_option(check_int, option, value, 1)
    for option, minimum in (
        ("--num-blocks", 1),
        ("--topk", 1),
        ("--cluster-size", 1),
        ("--breakdown-head-dim", 1),
        ("--trials", 1),
        ("--seed", 0),
    ):
        check_option(check_int, option, getattr(args, option[2:].replace("-", "_")), minimum)
    for option in ("--mu-signal", "--mu-noise", "--mu-cluster", "--tail-dof", "--block-correlation"):
        check_option(check_float, option, getattr(args, option[2:].replace("-", "_")))
    if not args.tail_dof > 2:
        raise UsageError(f"--tail-dof must be > 2 (finite variance), got {args.tail_dof}")
    if not 0 <= args.block_correlation < 1:
        raise UsageError(f"--block-correlation must be in [0, 1), got {args.block_correlation}")
    if args.cluster_size > min(args.block_sizes):
        raise UsageError(
            f"--cluster-size ({args.cluster_size}) must not exceed the smallest of --block-sizes "
            f"({min(args.block_sizes)})"
        )
    device = check_device("--device", args.device)
    try:
        resolve_backend(args.backend, device)
    except ValueError as e:
        raise UsageError(f"--backend {args.backend}: {e}") from None
    for option, path in (("--plot", args.plot), ("--markdown", args.markdown)):
        if path is not None and path.is_dir():
            raise UsageError(f"{option} {path} is a folder: give a file name")
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot: plotting needs matplotlib: pip install 'flashmoba[plot]'")


def run(args: argparse.Namespace) -> int:
    """Run the sweep, print the tables (markdown), write them and the plot where asked to."""
    _check_arguments(args)
    points = _sweep(args)
    tables = _ideal_table(points, args) + "\n\n" + _breakdown_table(points, args) + "\n"
    print(tables)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(tables)
    if args.plot is not None:
        _plot(points, args, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def demo_summary(trials: int = 1000, *, device=None, backend: str = "auto") -> str:
    """A compact (8-line) theory-vs-router table for ``make demo``: d = 64, clustered keys.

    Args:
        trials: trials per block size. device, backend: as in ``simulate_retrieval``.
    """
    base = RoutingScenario(head_dim=64, num_blocks=16, topk=2, cluster_size=4, mu_cluster=0.5)
    lines = [
        f"router SNR theory vs real router: d=64, top-2 of 16 blocks, delta_mu_eff={base.delta_mu_eff:g} "
        f"(m=4 clustered keys), {trials} trials per row",
        "     B    SNR  p_fail  predicted  measured [95% CI]",
    ]
    for b in BLOCK_SIZES:
        scenario = dataclasses.replace(base, block_size=b)
        measured = simulate_retrieval(scenario, trials, device=device, backend=backend)
        low, high = measured.interval()
        snr = scenario.snr("paper")
        lines.append(
            f"  {b:4d}  {snr:5.2f}  {failure_probability(snr):6.3f}  {scenario.predicted_retrieval():9.3f}"
            f"  {measured.rate:.3f} [{low:.3f}, {high:.3f}]"
        )
    return "\n".join(lines)
