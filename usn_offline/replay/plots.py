"""The replay report's pictures (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from usn_offline.replay.records import FrameRecord

CERTIFIED, FLAGGED, SILENT = "#2a9d3f", "#d1495b", "#000000"


def _scenario_spans(records: list[FrameRecord]) -> list[tuple[str, int, int]]:
    spans: list[tuple[str, int, int]] = []
    for r in records:
        name = r.scenario or ""
        if spans and spans[-1][0] == name:
            spans[-1] = (name, spans[-1][1], r.index)
        else:
            spans.append((name, r.index, r.index))
    return spans


def _mark_scenarios(ax, spans, label: bool) -> None:
    for name, start, end in spans:
        ax.axvline(start - 0.5, color="0.7", lw=0.8)
        if label and name:
            ax.text((start + end) / 2, 1.01, name, transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                    fontsize=7, rotation=30)


def write_plots(out: Path, records: list[FrameRecord], report: dict, run_live_latencies: list[float] = ()
                ) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = np.array([r.index for r in records])
    certified = np.array([r.certified for r in records])
    spans = _scenario_spans(records)
    # The band is what "in range" means: the range the per-frame decisions cover.
    region = [report["proof_range"]] if report.get("proof_range") else report["bundle"]["region"]
    files = []

    # 1. Estimated against true (a, b), the proofs' range as a band, flagged frames marked.
    fig, axes = plt.subplots(2, 1, figsize=(12, 6.5), sharex=True)
    for ax, (est, true, label, lo, hi) in zip(axes, (("contrast", "true_contrast", "contrast a", 0, 1),
                                                      ("brightness", "true_brightness", "brightness b", 2, 3)),
                                              strict=True):
        for box in region:
            ax.axhspan(box[lo], box[hi], color=CERTIFIED, alpha=0.18, lw=0)
        values = np.array([np.nan if getattr(r, est) is None else getattr(r, est) for r in records])
        truth = np.array([np.nan if getattr(r, true) is None else getattr(r, true) for r in records])
        if np.isfinite(truth).any():
            ax.plot(index, truth, color="0.2", lw=1.2, label="true")
        ax.scatter(index[certified], values[certified], s=8, color=CERTIFIED, label="estimate, certified")
        ax.scatter(index[~certified], values[~certified], s=8, color=FLAGGED, marker="x", label="estimate, flagged")
        ax.set_ylabel(label)
        _mark_scenarios(ax, spans, label=ax is axes[0])
    axes[0].legend(loc="lower left", fontsize=7, ncol=3)
    axes[1].set_xlabel("frame")
    fig.suptitle("Monitor estimate vs true lighting (green band: the range the per-frame proofs cover)", y=0.995,
                 fontsize=10)
    fig.tight_layout()
    files.append(out / "timeline.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    # 2. Keypoint deviation from the nominal output, in units of the certified bound.
    judged = [r for r in records if r.deviation_ratio is not None]
    if judged:
        fig, ax = plt.subplots(figsize=(12, 4))
        x = np.array([r.index for r in judged])
        y = np.maximum(np.array([r.deviation_ratio for r in judged]), 1e-4)
        ok = np.array([r.certified for r in judged])
        silent = np.array([r.certified and bool(r.moved) for r in judged])
        ax.scatter(x[ok], y[ok], s=9, color=CERTIFIED, label="certified")
        ax.scatter(x[~ok], y[~ok], s=9, color=FLAGGED, marker="x", label="flagged")
        if silent.any():
            ax.scatter(x[silent], y[silent], s=60, facecolors="none", edgecolors=SILENT, label="silent failure")
        ax.axhline(1.0, color="0.3", ls="--", lw=1, label="certified bound δ")
        ax.set_yscale("log")
        ax.set_ylabel("keypoint deviation / δ")
        ax.set_xlabel("frame")
        _mark_scenarios(ax, _scenario_spans(judged), label=True)
        ax.legend(loc="upper left", fontsize=7, ncol=4)
        fig.tight_layout()
        files.append(out / "deviation.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)

    # 3. Latency.
    fig, ax = plt.subplots(figsize=(6, 3.5))
    latency = np.array([r.latency_ms for r in records])
    bins = np.linspace(0, np.percentile(latency, 99.5) * 1.1 + 1e-3, 50)
    ax.hist(np.clip(latency, 0, bins[-1]), bins=bins, color="#4062bb", alpha=0.8, label="offline (per frame)")
    live = run_live_latencies
    if live:
        ax.hist(np.clip(live, 0, bins[-1]), bins=bins, color="#f28f3b", alpha=0.6, label="live (round trip)")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("frames")
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(out / "latency.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    # 4. The confusion table.
    c = report["confusion"]
    if report["ground_truth"]:
        table = np.array([[c["certified_moved"], c["certified_held"]], [c["flagged_moved"], c["flagged_held"]]])
        fig, ax = plt.subplots(figsize=(4.6, 3.4))
        ax.imshow(np.array([[1.0, 0.0], [0.0, 0.3]]), cmap="Reds", vmin=0, vmax=1)
        for (i, j), value in np.ndenumerate(table):
            note = ["silent failures", "", "caught", ""][2 * i + j]
            ax.text(j, i, f"{value}\n{note}".strip(), ha="center", va="center", fontsize=10)
        ax.set_xticks([0, 1], ["moved > δ", "held ≤ δ"])
        ax.set_yticks([0, 1], ["certified", "flagged"])
        ax.set_title("decision vs outcome (judged frames)", fontsize=9)
        fig.tight_layout()
        files.append(out / "confusion.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    return files
