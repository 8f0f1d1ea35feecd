"""Matplotlib figures of the end-to-end runs (PNG, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from benchmark.end_to_end.e2e_common import SYSTEM_LABELS, SYSTEMS

STYLE = {"muxserve": dict(color="tab:red", marker="o"), "temporal": dict(color="tab:blue", marker="s"),
         "spatial": dict(color="tab:green", marker="^"), "instances": dict(color="tab:purple", marker="D")}


def _systems(rows):
    present = {r["system"] for r in rows}
    return [s for s in SYSTEMS if s in present]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def throughput_vs_group(rows: list[dict], out: Path) -> Path:
    """Throughput (req/s) vs alpha, one panel per rate scale (or vs offered rate without alpha)."""
    if any("alpha" in r for r in rows):
        scales = sorted({r["rate_scale"] for r in rows})
        fig, axes = plt.subplots(1, len(scales), figsize=(4.2 * len(scales), 3.6), squeeze=False)
        for ax, scale in zip(axes[0], scales):
            for system in _systems(rows):
                pts = sorted((r["alpha"], r.get("throughput_req_s", 0.0)) for r in rows
                             if r["system"] == system and r["rate_scale"] == scale)
                ax.plot(*zip(*pts), label=SYSTEM_LABELS[system], **STYLE[system])
            offered = sorted({(r["alpha"], r["offered_req_s"]) for r in rows if r["rate_scale"] == scale})
            ax.plot(*zip(*offered), color="gray", linestyle="--", label="offered")
            ax.set_title(f"rate scale {scale:g}")
            ax.set_ylim(bottom=0)
            ax.set_xlabel("alpha (popularity skew)")
            ax.set_ylabel("throughput (req/s)")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        return _save(fig, out / "throughput_vs_alpha.png")
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for system in _systems(rows):
        pts = sorted((r["offered_req_s"], r.get("throughput_req_s", 0.0)) for r in rows if r["system"] == system)
        ax.plot(*zip(*pts), label=SYSTEM_LABELS[system], **STYLE[system])
    lim = max(r["offered_req_s"] for r in rows)
    ax.plot([0, lim], [0, lim], color="gray", linestyle="--", label="offered")
    ax.set_xlabel("offered rate (req/s)")
    ax.set_ylabel("throughput (req/s)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / "throughput_vs_rate.png")


def _grid(rows):
    """Panels: rows = alpha (or one), columns = the point's rate (scale or offered rate)."""
    groups = sorted({r.get("alpha") for r in rows}, key=lambda x: (x is None, x))
    cols = sorted({r.get("rate_scale", r["offered_req_s"]) for r in rows})
    return groups, cols


def slo_vs_scale(rows: list[dict], out: Path, target: float) -> Path:
    groups, cols = _grid(rows)
    fig, axes = plt.subplots(len(groups), len(cols), figsize=(3.4 * len(cols), 2.8 * len(groups)), squeeze=False)
    for i, g in enumerate(groups):
        for j, c in enumerate(cols):
            ax = axes[i][j]
            for system in _systems(rows):
                match = [r for r in rows if r["system"] == system and r.get("alpha") == g
                         and r.get("rate_scale", r["offered_req_s"]) == c]
                if match:
                    curve = match[0]["slo_curve"]
                    xs = sorted(curve)
                    ax.plot(xs, [100 * curve[k] for k in xs],
                            label=SYSTEM_LABELS[system], markersize=3, **STYLE[system])
            ax.axhline(100 * target, color="gray", linestyle=":", linewidth=1)
            title = (f"alpha {g:g}, " if g is not None else "") + (f"scale {c:g}" if "rate_scale" in rows[0]
                                                                   else f"{c:.2f} req/s")
            ax.set_title(title, fontsize=9)
            ax.set_ylim(0, 102)
            ax.set_xlabel("SLO scale")
            ax.set_ylabel("SLO attainment (%)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return _save(fig, out / "slo_attainment_vs_scale.png")


def latency_vs_rate(rows: list[dict], out: Path) -> Path:
    """p99 TTFT and p99 TPOT vs offered rate, one column per alpha."""
    groups = sorted({r.get("alpha") for r in rows}, key=lambda x: (x is None, x))
    fig, axes = plt.subplots(2, len(groups), figsize=(4.2 * len(groups), 6), squeeze=False)
    for j, g in enumerate(groups):
        for i, (key, label) in enumerate((("ttft_p99", "p99 TTFT (s)"), ("tpot_p99", "p99 TPOT (s)"))):
            ax = axes[i][j]
            for system in _systems(rows):
                pts = sorted((r["offered_req_s"], r[key]) for r in rows
                             if r["system"] == system and r.get("alpha") == g and key in r)
                if pts:
                    ax.plot(*zip(*pts), label=SYSTEM_LABELS[system], **STYLE[system])
            ax.set_yscale("log")
            ax.set_xlabel("offered rate (req/s)")
            ax.set_ylabel(label)
            if g is not None:
                ax.set_title(f"alpha {g:g}")
            ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8)
    return _save(fig, out / "p99_latency_vs_rate.png")


def slo_vs_rate(rows: list[dict], out: Path, slo_scale: int, target: float) -> Path:
    """SLO attainment at one scale vs offered rate (where each system crosses the target)."""
    groups = sorted({r.get("alpha") for r in rows}, key=lambda x: (x is None, x))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    for ax, g in zip(axes[0], groups):
        for system in _systems(rows):
            pts = sorted((r["offered_req_s"], 100 * (r["slo_at_scale"] or 0.0)) for r in rows
                         if r["system"] == system and r.get("alpha") == g)
            ax.plot(*zip(*pts), label=SYSTEM_LABELS[system], **STYLE[system])
        ax.axhline(100 * target, color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel("offered rate (req/s)")
        ax.set_ylabel(f"SLO attainment at {slo_scale}x (%)")
        if g is not None:
            ax.set_title(f"alpha {g:g}")
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(fig, out / "slo_attainment_vs_rate.png")
