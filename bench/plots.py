"""Pictures of replays: tokens per step along the trajectories, drafters side by side, live per-call figures."""

from __future__ import annotations

import pathlib
from array import array
from collections.abc import Mapping

BINS = 20  # points along a trajectory (5 % of its steps each)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _binned(yields: array, bins: int = BINS) -> list[float]:
    """Tokens per step in each equal slice of a trajectory's steps."""
    n = len(yields)
    out = []
    for b in range(bins):
        part = yields[b * n // bins : (b + 1) * n // bins]
        out.append(sum(part) / len(part) if part else float("nan"))
    return out


def plot_oracle(reports: Mapping[str, dict], per_step: Mapping[str, Mapping[str, array]],
                out: pathlib.Path) -> None:
    """Top: tokens per step along each trajectory (thin: the first drafter's trajectories; thick: every
    drafter pooled). Bottom: the drafters side by side."""
    plt = _pyplot()
    fig, (along, side) = plt.subplots(2, 1, figsize=(10, 9), gridspec_kw={"height_ratios": [3, 2]})
    x = [(b + 0.5) * 100 / BINS for b in range(BINS)]
    first = next(iter(reports))
    for yields in per_step[first].values():
        if len(yields) >= BINS:
            along.plot(x, _binned(yields), color="grey", alpha=0.15, linewidth=0.8)
    for name in reports:
        series = [y for y in per_step[name].values() if y]
        pooled = []
        for b in range(BINS):
            tokens = steps = 0
            for y in series:
                part = y[b * len(y) // BINS : (b + 1) * len(y) // BINS]
                tokens += sum(part)
                steps += len(part)
            pooled.append(tokens / steps if steps else float("nan"))
        along.plot(x, pooled, linewidth=2.2, label=f"{name} (all trajectories)")
    along.set_xlabel("position along the trajectory (% of its verification steps)")
    along.set_ylabel("tokens per step (accepted + 1)")
    along.set_title(f"Oracle replay of {len(per_step[first])} trajectories: tokens per step along each "
                    f"(grey: {first}, one line per trajectory)")
    along.grid(alpha=0.3)
    along.legend(loc="upper left")

    names = list(reports)
    values = [reports[n]["tokens_per_step"] for n in names]
    bars = side.bar(names, values, color=[f"C{i}" for i in range(len(names))])
    for bar, n in zip(bars, names, strict=True):
        r = reports[n]
        side.annotate(f"{r['tokens_per_step']:.3f}\n{r['drafted_per_step']:.1f} drafted, "
                      f"{r['draft_us_per_step']:.0f} µs", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                      ha="center", va="bottom", fontsize=9)
    side.set_ylabel("tokens per step")
    side.set_ylim(0, max(values) * 1.3)
    side.set_title("Drafters side by side (same trajectories, same budget)")
    side.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_live(report: dict, out: pathlib.Path) -> None:
    """Per call of a live replay: tokens per step, and speculative vs plain time (speedup)."""
    plt = _pyplot()
    calls = report.get("per_call") or []
    fig, (steps_ax, speed_ax) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    idx = list(range(len(calls)))
    steps_ax.bar(idx, [c["completion_tokens"] / c["steps"] if c["steps"] else 0 for c in calls], color="C0")
    steps_ax.set_ylabel("tokens per step")
    steps_ax.set_title(f"Live replay through {report['proxy']} ({report['model']}): "
                       f"{report['tokens_per_step']:.2f} tokens/step, speedup {report['speedup']:.2f}x")
    speed_ax.plot(idx, [c["wall_ms_plain"] / c["wall_ms"] if c["wall_ms"] else 0 for c in calls], "o-",
                  color="C1", label="speedup (plain time / speculative time)")
    speed_ax.axhline(1.0, color="grey", linewidth=0.8)
    speed_ax.set_ylabel("speedup")
    speed_ax.set_xlabel("call (in replay order; a new trajectory starts where the grey line is)")
    for i in range(1, len(calls)):
        if calls[i]["trajectory"] != calls[i - 1]["trajectory"]:
            for ax in (steps_ax, speed_ax):
                ax.axvline(i - 0.5, color="grey", linestyle=":", linewidth=0.8)
    speed_ax.legend(loc="upper left")
    for ax in (steps_ax, speed_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
