"""The replay report: ``report.json`` (machine-readable), ``summary.md`` and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

from usn_offline import __version__
from usn_offline.jsonio import finite_only
from usn_offline.replay.offline import ReplayRun
from usn_offline.replay.records import by_scenario, confusion, summarise
from usn_offline.runtime.bundle import CERTIFICATE, Bundle
from usn_offline.runtime.hashing import sha256_file

SCHEMA_VERSION = 1
# The columns of the summary table: (key, header, format).
COLUMNS = (
    ("frames", "frames", "d"), ("certified_fraction", "certified", "%"),
    ("certified_fraction_in_range", "certified in range", "%"), ("moved_frames", "moved", "d"),
    ("silent_failures", "silent failures", "d"), ("silent_failures_in_range", "… in range", "d"),
    ("silent_failures_outside_range", "… outside", "d"), ("silent_failure_rate", "silent-failure rate", "%"),
    ("failure_recall", "failure recall", "%"), ("false_alarm_rate", "false alarms", "%"),
    ("bad_input_frames", "bad input", "d"), ("mean_error_px", "mean error px", ".2f"),
    ("latency_ms_p50", "latency p50 ms", ".2f"), ("latency_ms_p99", "p99 ms", ".2f"),
)


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if fmt == "%":
        return f"{100 * value:.1f} %"
    return format(value, fmt)


def summary_rows(report: dict) -> list[list[str]]:
    """Header row and one row per scenario plus the overall row."""
    rows = [["scenario", *(header for _, header, _ in COLUMNS)]]
    groups = {**report["scenarios"], "**all**": report["overall"]}
    for name, figures in groups.items():
        rows.append([name, *(_cell(figures.get(key), fmt) for key, _, fmt in COLUMNS)])
    return rows


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths, strict=True))) for row in rows)


def build_report(run: ReplayRun, bag: Path | str, bundle: Bundle, params_file: Path | str, mode: str = "offline"
                 ) -> dict:
    h, w = bundle.preprocess.input_height, bundle.preprocess.input_width
    sizes = sorted({(r.width, r.height) for r in run.records if r.width})
    delta = bundle.effective_delta_px
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "usn-replay-report",
        "tool_version": __version__,
        "mode": mode,
        "bag": str(bag),
        "image_topic": run.image_topic,
        "ground_truth": run.has_truth,
        "complete": run.complete,
        "problem": run.problem,
        "frames_in_bag": run.frames_in_bag,
        "frames_replayed": len(run.records),
        "truth_without_image": run.truth_without_image,
        "seconds": run.seconds,
        "frames_per_second": len(run.records) / run.seconds if run.seconds > 0 else None,
        "params_file": str(params_file),
        "bundle": {
            "path": str(bundle.root), "model_sha256": bundle.model_sha256,
            "certificate_id": sha256_file(bundle.root / CERTIFICATE),
            "region": [[b.a_lo, b.a_hi, b.b_lo, b.b_hi] for b in bundle.region],
            "delta_px": bundle.delta_px, "effective_delta_px": delta, "norm": bundle.certificate.get("norm"),
            "network_input": [w, h],
        },
        "proof_range": None if run.covered is None else [run.covered.a_lo, run.covered.a_hi, run.covered.b_lo,
                                                         run.covered.b_hi],
        "frame_sizes": [list(s) for s in sizes],
        "delta_image_px": [{"frame": [fw, fh], "x": delta * fw / w, "y": delta * fh / h} for fw, fh in sizes],
        "overall": summarise(run.records),
        "confusion": confusion(run.records),
        "scenarios": {name: summarise(group) for name, group in by_scenario(run.records).items()},
        **run.extra,
    }


def write_report(out: Path | str, report: dict, run: ReplayRun, plots: bool = True) -> list[Path]:
    """Write report.json, summary.md and (``plots``) the PNGs into ``out``; returns the files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "report.json", out / "summary.md"]
    files[0].write_text(json.dumps(finite_only(report), indent=1, allow_nan=False))
    pictures = []
    if plots and run.records:
        from usn_offline.replay.plots import write_plots

        pictures = write_plots(out, run.records, report, run.live_latencies_ms)
    files[1].write_text(summary_markdown(report, [p.name for p in pictures]))
    return files + pictures


def summary_markdown(report: dict, pictures: list[str]) -> str:
    b = report["bundle"]
    region = "; ".join(f"a ∈ [{r[0]:g}, {r[1]:g}], b ∈ [{r[2]:g}, {r[3]:g}]" for r in b["region"])
    lines = [f"# Replay of `{report['bag']}` ({report['mode']})", "",
             f"{report['frames_replayed']} of {report['frames_in_bag']} frames of `{report['image_topic']}` "
             f"through the node's runtime with `{report['params_file']}`; model `{b['model_sha256'][:12]}`, "
             f"certified region {region}"
             + ("" if not report.get("proof_range") else
                "; per-frame proofs (and *in range*) cover a ∈ [{:g}, {:g}], b ∈ [{:g}, {:g}]".format(
                    *report["proof_range"]))
             + f", δ = {b['effective_delta_px']:.4g} px ({b['norm']}) on the "
             f"{b['network_input'][0]}×{b['network_input'][1]} network input"
             + "".join(f"; at {d['frame'][0]}×{d['frame'][1]} that is {d['x']:.3g} px in x and {d['y']:.3g} px in y"
                       for d in report["delta_image_px"]) + "."]
    if not report["complete"]:
        lines += ["", f"**The bag ended early**: {report['problem']}. Figures cover the frames read."]
    if not report["ground_truth"]:
        lines += ["", "The bag has no ground truth (`usn_keypoint_msgs/FrameTruth`): only the decisions and "
                  "latency are reported."]
    lines += ["", markdown_table(summary_rows(report)), ""]
    c = report["confusion"]
    if report["ground_truth"]:
        lines += ["| decision \\ outcome | moved > δ | held ≤ δ |", "|---|---|---|",
                  f"| certified | {c['certified_moved']} (silent failures) | {c['certified_held']} |",
                  f"| flagged | {c['flagged_moved']} (caught) | {c['flagged_held']} (false alarms when in range) |",
                  ""]
    if "live" in report:
        live = report["live"]
        lines += ["## Live replay through the node over DDS", "",
                  f"{live['frames_sent']} frames published, {live['statuses_received']} statuses received "
                  f"({live['missing_statuses']} missing, {live['duplicate_statuses']} duplicated); "
                  f"{_cell(live['frames_per_second'], '.1f')} frames/s; round-trip latency p50 "
                  f"{_cell(live['latency_ms_p50'], '.2f')} ms, p99 {_cell(live['latency_ms_p99'], '.2f')} ms. "
                  f"Against the offline replay: "
                  f"{live['agreement']['frames_compared']} frames compared, flags identical: "
                  f"{live['agreement']['flags_identical']} (frames the node left NOT_CHECKED while proving "
                  f"another: {live['agreement'].get('not_checked_live', 0)}), largest keypoint difference "
                  f"{live['agreement']['max_keypoint_difference_px']:.2e} px.", ""]
    lines += ["Definitions: *moved* = some keypoint deviates from the detector's output on the frame's nominal "
              "image by more than δ (image pixels, per axis); *silent failures* = certified frames that moved, "
              "*… in range* those whose true (a, b) lies in the range the proofs cover (the promise broken), "
              "*… outside* the others (its stated assumption violated); *certified in range* = certified among "
              "the frames whose true (a, b) is in that range; *silent-failure rate* = moved among certified frames; "
              "*failure recall* = flagged among moved frames; *false alarms* = flagged among frames whose true "
              "(a, b) is in that range and that did not move. Keys of report.json: docs/REPLAY.md "
              "in the repository.", ""]
    lines += [f"![{name}]({name})" for name in pictures]
    return "\n".join(lines) + "\n"
