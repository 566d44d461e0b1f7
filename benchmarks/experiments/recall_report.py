"""results.md and the plots of the associative-recall experiment, from its results.json (``recall.py``).

Runs are compared within one setup (``setup_id``): the grid is the setup with the most runs; runs of
other setups (the pilot) are listed with their recall curves. Spreads are the sample standard deviation
over seeds; intervals are Wilson 95 % intervals of pooled counts.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from recall_metrics import wilson  # noqa: E402

from flashmoba.theory import retrieval_probability  # noqa: E402

__all__ = ["write_report"]

ORDER = (
    "dense",
    "moba512_k2",
    "moba256_k4",
    "moba128_k8",
    "moba64_k16",
    "moba512_k2_kconv3",
    "moba256_k4_kconv3",
    "moba128_k8_kconv3",
    "moba64_k16_kconv3",
    "dense_kconv3",
)


def _mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return mean, sd


def _fmt(mean, sd=None, digits=3, pct=False):
    if mean is None:
        return "-"
    scale, unit = (100, "") if pct else (1, "")
    text = f"{scale * mean:.{1 if pct else digits}f}{unit}"
    return text if sd is None else f"{text} ± {scale * sd:.{1 if pct else digits}f}"


def _sig(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def _by_variant(records):
    groups = {}
    for r in sorted(records, key=lambda r: (ORDER.index(r["variant"]), r["seed"])):
        groups.setdefault(r["variant"], []).append(r)
    return groups


def _kind(r, kind):
    c = r["recall_by_key"][kind]
    return c["correct"] / c["total"] if c["total"] else None


def _config(r):
    block = "-" if r["block_size"] is None else f"{r['block_size']}/k{r['topk']}"
    return f"{block}{' + kconv' + str(r['kconv']) if r['kconv'] else ''}"


def _cell(values, **kw) -> str:
    """``mean ± sd`` of ``values`` (see :func:`_fmt`)."""
    return _fmt(*_mean_sd(values), **kw)


def _main_table(groups) -> list[str]:
    lines = [
        "| variant | block/topk | seeds | recall % | single-token keys % | multi-token keys % | router recall | "
        "router chance | SNR (measured) | router recall predicted by the SNR | held-out ppl | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, runs in groups.items():
        layers = [next(iter(r["router_layers"].values()), {}) for r in runs]
        cells = [
            variant,
            _config(runs[0]),
            str(len(runs)),
            _cell([r["recall"] for r in runs], pct=True),
            _cell([_kind(r, "single") for r in runs], pct=True),
            _cell([_kind(r, "multi") for r in runs], pct=True),
            _cell([r["router_recall"] for r in runs]),
            _fmt(_mean_sd([r["router_chance"] for r in runs])[0]),
            _cell([r["snr_measured"] for r in runs], digits=2),
            _fmt(_mean_sd([layer.get("predicted_router_recall") for layer in layers])[0]),
            _cell([r["perplexity"]["ppl"] for r in runs if r.get("perplexity")], digits=2),
            _fmt(_mean_sd([r["train_seconds"] for r in runs])[0], digits=1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _seed_table(groups) -> list[str]:
    lines = [
        "| variant | seed | recall % [95 % CI] (correct/total) | router recall (per head) | delta_mu_eff | "
        "sigma^2 | SNR | tokens | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, runs in groups.items():
        for r in runs:
            low, high = wilson(r["correct"], r["total"])
            layer = next(iter(r["router_layers"].values()), {})
            heads = "/".join(f"{h:.2f}" for h in layer.get("router_recall_by_head", []))
            lines.append(
                f"| {variant} | {r['seed']} | {100 * r['recall']:.1f} [{100 * low:.1f}, {100 * high:.1f}] "
                f"({r['correct']}/{r['total']}) | {_fmt(r['router_recall'])} ({heads or '-'}) | "
                f"{_sig(layer.get('delta_mu_eff'))} | {_sig(layer.get('noise_variance'))} | "
                f"{_fmt(r['snr_measured'], digits=2)} | {r['tokens'] / 1e6:.1f}M | {r['train_seconds']:.1f} |"
            )
    return lines


def _distance_table(groups) -> list[str]:
    edges = [(b["lo"], b["hi"]) for b in next(iter(groups.values()))[0]["recall_by_distance"]]
    lines = [
        "| variant | " + " | ".join(f"{lo}-{hi}" for lo, hi in edges) + " |",
        "|---|" + "---|" * len(edges),
    ]
    for variant, runs in groups.items():
        cells = []
        for i in range(len(edges)):
            correct = sum(r["recall_by_distance"][i]["correct"] for r in runs)
            total = sum(r["recall_by_distance"][i]["total"] for r in runs)
            ci = wilson(correct, total)
            cells.append("-" if ci is None else f"{100 * correct / total:.1f} [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return lines


def _switch_table(switch, runs) -> list[str]:
    trained = {(r["variant"], r["seed"]): r for r in runs}
    lines = [
        "| trained as | run as | seeds | recall % (trained model) | recall % (switched) | retained | "
        "router recall | router chance | SNR |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    pairs = {}
    for s in switch:
        if (s["source"], s["seed"]) in trained:
            pairs.setdefault((s["source"], s["variant"]), []).append((trained[(s["source"], s["seed"])], s))
    for (source, target), items in sorted(pairs.items(), key=lambda kv: (ORDER.index(kv[0][0]), ORDER.index(kv[0][1]))):
        retained = [s["recall"] / t["recall"] if t["recall"] else None for t, s in items]
        lines.append(
            f"| {source} | {target} | {len(items)} | {_fmt(*_mean_sd([t['recall'] for t, _ in items]), pct=True)} | "
            f"{_fmt(*_mean_sd([s['recall'] for _, s in items]), pct=True)} | {_fmt(*_mean_sd(retained), digits=2)} | "
            f"{_fmt(*_mean_sd([s['router_recall'] for _, s in items]))} | "
            f"{_fmt(_mean_sd([s['router_chance'] for _, s in items])[0])} | "
            f"{_fmt(*_mean_sd([s['snr_measured'] for _, s in items]), digits=2)} |"
        )
    return lines


def _switch_seed_table(switch, runs) -> list[str]:
    """One row per switched run: a seed that learned the task and one that did not differ in kind, so the
    seeds are shown apart and not only averaged."""
    trained = {(r["variant"], r["seed"]): r for r in runs}
    lines = [
        "| trained as | seed | recall % (trained) | run as | block/topk | recall % [95 % CI] (switched) | "
        "router recall | router chance | router recall predicted by the SNR |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [s for s in switch if (s["source"], s["seed"]) in trained]
    for s in sorted(rows, key=lambda s: (ORDER.index(s["source"]), s["seed"], ORDER.index(s["variant"]))):
        t = trained[(s["source"], s["seed"])]
        low, high = wilson(s["correct"], s["total"])
        predicted = next(iter(s["router_layers"].values()), {}).get("predicted_router_recall")
        lines.append(
            f"| {s['source']} | {s['seed']} | {100 * t['recall']:.1f} | {s['variant']} | "
            f"{s['block_size']}/k{s['topk']} | "
            f"{100 * s['recall']:.1f} [{100 * low:.1f}, {100 * high:.1f}] | {_fmt(s['router_recall'])} | "
            f"{_fmt(s['router_chance'])} | {_fmt(predicted)} |"
        )
    return lines


def _kconv_table(groups) -> list[str]:
    lines = ["| variant | seed | mean abs weight by lag (0 = current key, 1, 2) | mean weight by lag | norm |"]
    lines.append("|---|---|---|---|---|")
    for variant, runs in groups.items():
        for r in runs:
            for w in r.get("kconv_weights") or []:
                lines.append(
                    f"| {variant} | {r['seed']} | {' / '.join(f'{x:.4f}' for x in w['abs_mean_by_lag'])} | "
                    f"{' / '.join(f'{x:+.4f}' for x in w['mean_by_lag'])} | {w['norm']:.3f} |"
                )
    return lines


def _save(fig, ax, path, xlabel: str, ylabel: str, title: str, log2: bool = False) -> None:
    """Label, grid and legend the axes (a base-2 log x axis with ``log2``), then write and close the figure."""
    if log2:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_recall_vs_block(groups, path):
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colors = {"dense": "k", "dense_kconv3": "gray", "moba128_k8_kconv3": "C3"}
    for variant, runs in groups.items():
        for i, r in enumerate(runs):
            low, high = wilson(r["correct"], r["total"])
            x = r["block_size"] if r["block_size"] else None
            if x is None:
                ax.axhspan(low, high, color=colors.get(variant, "k"), alpha=0.12)
                ax.axhline(r["recall"], color=colors.get(variant, "k"), lw=0.8, label=variant if i == 0 else None)
                continue
            shift = 1.04 if r["kconv"] else 1.0
            ax.errorbar(
                x * shift * 1.015 ** (i - 1),
                r["recall"],
                yerr=[[r["recall"] - low], [high - r["recall"]]],
                fmt="o" if not r["kconv"] else "s",
                color=colors.get(variant, "C0"),
                ms=4,
                capsize=2,
                label=(variant if r["kconv"] else "MoBA")
                if i == 0 and (r["kconv"] or variant == "moba128_k8")
                else None,
            )
    _save(
        fig,
        ax,
        path,
        "MoBA block size (topk x block size fixed; bands: dense)",
        "recall (Wilson 95 % per run)",
        "associative recall vs block size (one point per seed)",
        log2=True,
    )


def _plot_switch_vs_block(switch, runs, path):
    """Recall of each trained model run with MoBA at every block size (no retraining): one line per
    (trained variant, seed), its trained recall dashed."""
    trained = {(r["variant"], r["seed"]): r for r in runs}
    lines = {}
    for s in switch:
        if (s["source"], s["seed"]) in trained:
            lines.setdefault((s["source"], s["seed"]), []).append(s)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for c, ((source, seed), items) in enumerate(
        sorted(lines.items(), key=lambda kv: (ORDER.index(kv[0][0]), kv[0][1]))
    ):
        items = sorted(items, key=lambda s: s["block_size"])
        xs = [s["block_size"] for s in items]
        ys = [s["recall"] for s in items]
        bounds = [wilson(s["correct"], s["total"]) for s in items]
        color = f"C{c % 10}"
        ax.errorbar(
            xs,
            ys,
            yerr=[[y - lo for y, (lo, _) in zip(ys, bounds)], [hi - y for y, (_, hi) in zip(ys, bounds)]],
            fmt="-o",
            color=color,
            ms=4,
            capsize=2,
            label=f"{source} seed {seed} (trained {100 * trained[(source, seed)]['recall']:.0f} %)",
        )
        ax.axhline(trained[(source, seed)]["recall"], color=color, lw=0.8, ls="--")
    _save(
        fig,
        ax,
        path,
        "MoBA block size of the switched model (topk x block size fixed)",
        "recall (Wilson 95 %)",
        "trained weights run with MoBA, no retraining (dashed: as trained)",
        log2=True,
    )


def _plot_router_vs_snr(groups, switch, path):
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    points = [(r, "o") for runs in groups.values() for r in runs if r["snr_measured"] is not None]
    points += [(s, "x") for s in switch if s["snr_measured"] is not None]
    configs = sorted({(r["block_size"], r["topk"]) for r, _ in points})
    for c, (bs, topk) in enumerate(configs):
        color = f"C{c}"
        mine = [(r, m) for r, m in points if (r["block_size"], r["topk"]) == (bs, topk)]
        for r, marker in mine:
            ax.plot(r["snr_measured"], r["router_recall"], marker, color=color, ms=5)
        blocks = _typical_past_blocks(mine[0][0])
        if blocks:
            xs = [i / 20 for i in range(-10, 81)]
            ax.plot(xs, [retrieval_probability(x, blocks, topk - 1) for x in xs], "-", color=color, lw=0.8)
        ax.plot([], [], "-o", color=color, label=f"{bs}/k{topk} (theory: top {topk - 1} of {blocks} past blocks)")
    _save(
        fig,
        ax,
        path,
        "measured router SNR at the answer queries",
        "router recall",
        "router recall vs SNR (o trained, x training-free switch; lines: theory)",
    )


def _typical_past_blocks(record) -> int | None:
    """The fully past blocks of a query at the middle of the query region (the theory curve's n)."""
    bs, seq_len = record["block_size"], record["recall_by_distance"][-1]["hi"]
    if not bs:
        return None
    return max(1, (seq_len - seq_len // 16) // bs)


def _plot_curves(pilot, setups, path):
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, r in enumerate(pilot):
        s = setups.get(r["setup_id"], {})
        label = f"{r['variant']} lr {s.get('lr')}, {s.get('steps')} x {s.get('batch_seqs')} seqs"
        label += ", curriculum" if s.get("curriculum") else ""
        xs = [p["tokens"] / 1e6 for p in r["curve"]]
        ax.plot(xs, [p["recall"] for p in r["curve"]], "-o", ms=3, color=f"C{i}", label=label)
        ax.plot(xs, [p.get("multi") for p in r["curve"]], ":", color=f"C{i}")
    ax.axhline(0.9, color="gray", lw=0.8, ls="--")
    _save(
        fig,
        ax,
        path,
        "training tokens (M)",
        "recall (solid: all keys; dotted: multi-token keys)",
        "pilot: recall during training",
    )


def _pilot_lines(pilot, setups) -> list[str]:
    lines = [
        "## Pilot: recall during training (curve on the first evaluation batch, full length)",
        "",
        "| run | setup | steps x sequences | tokens (M) | lr | curriculum | final answer loss "
        "(ln of the values: uniform answer) | recall (all eval batches) | held-out ppl | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in pilot:
        s = setups.get(r["setup_id"], {})
        lines.append(
            f"| {r['variant']} seed {r['seed']} | `{r['setup_id']}` | {s.get('steps')} x {s.get('batch_seqs')} | "
            f"{r['tokens'] / 1e6:.1f} | {s.get('lr')} | {s.get('curriculum') or '-'} | "
            f"{r['log'][-1]['loss']:.3f} ({math.log(s.get('num_values', 1)):.3f}) | "
            f"{100 * r['recall']:.2f} % ({r['correct']}/{r['total']}) | "
            f"{_fmt((r.get('perplexity') or {}).get('ppl'), digits=2)} | {r['train_seconds']:.1f} |"
        )
    lines += ["", "| run | setup | tokens (M) | recall | multi-token keys |", "|---|---|---|---|---|"]
    for r in pilot:
        for p in r["curve"]:
            lines.append(
                f"| {r['variant']} seed {r['seed']} | `{r['setup_id']}` | {p['tokens'] / 1e6:.1f} | "
                f"{p['recall']:.3f} | {_fmt(p.get('multi'))} |"
            )
    return lines


def write_report(results: dict, out: Path) -> None:
    """results.md, and the plots of what is there, into ``out``: recall_vs_block.png, router_vs_snr.png
    and switch_vs_block.png for the grid (the most common setup among the runs without a recall curve),
    pilot.png for the runs with one."""
    out = Path(out)
    runs = results["runs"]
    if not runs:
        raise ValueError("no runs to report")
    envs = sorted(
        {
            json.dumps({k: e.get(k) for k in ("device", "torch", "triton", "date", "commit")})
            for e in results["environments"]
        }
    )
    lines = ["# Associative recall: results", "", *[f"Environment: `{e}`" for e in envs], ""]
    plain = [r for r in runs if not r.get("curve")]
    if plain:
        grid_id = Counter(r["setup_id"] for r in plain).most_common(1)[0][0]
        grid = [r for r in runs if r["setup_id"] == grid_id]
        switch = [s for s in results["switch"] if s["setup_id"] == grid_id]
        groups = _by_variant(grid)
        lines += [
            f"Grid setup `{grid_id}`: `{json.dumps(results['setups'].get(grid_id, {}), sort_keys=True)}`",
            "",
            "## Per variant (mean ± sample sd over seeds)",
            "",
            *_main_table(groups),
            "",
            "## Per run",
            "",
            *_seed_table(groups),
            "",
            "## Recall % by key-query distance (tokens), seeds pooled [Wilson 95 %]",
            "",
            *_distance_table(groups),
            "",
            "## Training-free switch: the trained dense weights run with MoBA global layers",
            "",
            *_switch_table(switch, grid),
            "",
            "Per seed:",
            "",
            *_switch_seed_table(switch, grid),
            "",
            "## Learned key-convolution weights (initialised at zero, no weight decay)",
            "",
            *_kconv_table(groups),
            "",
        ]
        _plot_recall_vs_block(groups, out / "recall_vs_block.png")
        _plot_router_vs_snr(groups, switch, out / "router_vs_snr.png")
        if switch:
            _plot_switch_vs_block(switch, grid, out / "switch_vs_block.png")
    else:
        lines += ["No grid run (every run has a recall curve: pilot runs only).", ""]
    pilot = [r for r in runs if r.get("curve")]
    if pilot:
        lines += _pilot_lines(pilot, results["setups"])
        _plot_curves(pilot, results["setups"], out / "pilot.png")
    if results.get("probes"):
        lines += ["", "## Step times", "", "| variant | ms per step | first call s | setup |", "|---|---|---|---|"]
        for p in results["probes"]:
            lines.append(f"| {p['variant']} | {1000 * p['step_s']:.1f} | {p['first_run_s']:.1f} | `{p['setup_id']}` |")
    lines += ["", "Setups:", ""]
    lines += [f"- `{key}`: `{json.dumps(value, sort_keys=True)}`" for key, value in results["setups"].items()]
    (out / "results.md").write_text("\n".join(lines) + "\n")
