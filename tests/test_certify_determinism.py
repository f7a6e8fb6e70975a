"""Certification outcomes never depend on wall-clock time: budgets are counted in work
(boxes, depth), so the same inputs give the same certificate on an idle machine, on a
loaded one, and under a clock that runs an hour per reading."""

import dataclasses
import subprocess
import sys
import time

import pytest
import torch

from usn_offline.certify import BabConfig, CertifyConfig, RadiusConfig, certify_dataset
from usn_offline.certify.bounds import BoundOptions
from usn_offline.data import load_split
from usn_offline.models import build_model, model_config_for
from usn_offline.perturb import PhotometricBox


@pytest.fixture(scope="module")
def setting(tiny_dataset):
    torch.manual_seed(0)
    model = build_model(model_config_for("cnn7", widths=(4, 4, 8, 8, 8), hidden=32)).eval()
    test = load_split(tiny_dataset, "test").subset(slice(0, 2))
    # A box and budget where branch and bound splits: the first image runs out of its 32
    # boxes (not_certified), the second is certified after 28; the frontier radius search
    # stops at its box budget. Forward intermediate bounds: CROWN's prove both images
    # without a split here.
    bab = BabConfig(max_boxes=32, bounds=BoundOptions(intermediate="forward"))
    config = CertifyConfig(box=PhotometricBox.symmetric(0.05, 0.05), delta=0.5, bab=bab,
                           eps_list=(0.02,), radius=RadiusConfig(eps_max=0.1, max_boxes=6))
    return model, test, config


def _outcome(model, test, config) -> list[dict]:
    """Everything the certificate says about each image, except the measured seconds."""
    report = certify_dataset(model, test, config, progress=False)
    images = [dataclasses.asdict(r) for r in report.images]
    for r in images:
        r.pop("seconds")
    return images


def test_budget_has_no_time_field():
    assert not [f.name for f in dataclasses.fields(BabConfig) if "time" in f.name or "second" in f.name]
    assert not [f.name for f in dataclasses.fields(RadiusConfig) if "time" in f.name or "second" in f.name]


def test_same_certificate_on_an_idle_a_busy_and_a_slow_clock_machine(setting, monkeypatch):
    model, test, config = setting
    idle = _outcome(model, test, config)
    summary = [(r["status"], r["boxes_bounded"]) for r in idle]
    # The setting must exercise branch and bound (more boxes than the 2 roots, the box and
    # eps = 0.02, and mixed outcomes), or a time limit could not show.
    assert any(s == "certified" and n > 2 for s, n in summary), summary
    assert len({s for s, _ in summary}) > 1, summary

    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        time.sleep(0.2)
        busy = _outcome(model, test, config)
        assert all(p.poll() is None for p in burners)  # the load was there the whole time
    finally:
        for p in burners:
            p.kill()
            p.wait()

    # A clock that advances an hour at every reading: any stop on seconds would trigger.
    clock = {"now": 0.0}

    def hour_per_reading() -> float:
        clock["now"] += 3600.0
        return clock["now"]

    for name in ("perf_counter", "monotonic", "time"):
        monkeypatch.setattr(time, name, hour_per_reading)
    slow = _outcome(model, test, config)
    monkeypatch.undo()
    assert clock["now"] > 0  # the certification did read the clock (its timings)

    for a, b, c in zip(idle, busy, slow, strict=True):
        assert a["status"] == b["status"] == c["status"]
        assert a["boxes_bounded"] == b["boxes_bounded"] == c["boxes_bounded"]
        assert a["lower_px"] == b["lower_px"] == c["lower_px"]  # exact float equality
        assert a["upper_px"] == b["upper_px"] == c["upper_px"]
        assert a == b == c  # radius, status at eps, counterexample: everything else too
