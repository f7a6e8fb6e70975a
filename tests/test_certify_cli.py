"""Certification of a trained model end to end: bounds hold on real images, the CLI writes
a schema-versioned certificate, and bad arguments give one-line errors."""

import json

import numpy as np
import pytest
import torch

from usn_offline.certify import Boxes, CertifyConfig, PixelMap, RadiusConfig, Status, certify_dataset, lower
from usn_offline.certify.bounds import output_bounds
from usn_offline.certify.errors import CertificationError
from usn_offline.cli import main
from usn_offline.data import load_split
from usn_offline.perturb import PhotometricBox
from usn_offline.train import load_checkpoint


@pytest.fixture(scope="module")
def trained(tiny_checkpoint):
    return tiny_checkpoint


def test_bounds_hold_on_the_trained_model(trained, tiny_dataset):
    model, _ = load_checkpoint(trained)
    test = load_split(tiny_dataset, "test")
    graph = lower(model, (1, 64, 64))
    pixels = PixelMap.for_image(4, 64, 64)
    rng = np.random.default_rng(0)
    boxes = [PhotometricBox(0.9, 1.1, -0.1, 0.1), PhotometricBox(0.97, 1.0, 0.0, 0.02)]
    for i in range(3):
        image = torch.from_numpy(test.images[i]).double()[None, None]
        for method in ("ibp", "crown", "alpha-crown"):
            lo, hi = output_bounds(graph, image, Boxes.from_boxes(boxes), pixels, method)
            for k, box in enumerate(boxes):
                a = torch.tensor(rng.uniform(box.a_lo, box.a_hi, 300))
                b = torch.tensor(rng.uniform(box.b_lo, box.b_hi, 300))
                with torch.no_grad():
                    px = pixels(graph.evaluate(image, a, b))
                assert (px >= lo[k]).all() and (px <= hi[k]).all()


def test_certify_dataset_results(trained, tiny_dataset):
    model, _ = load_checkpoint(trained)
    test = load_split(tiny_dataset, "test").subset(slice(0, 2))
    config = CertifyConfig(box=PhotometricBox(0.99, 1.01, -0.01, 0.01), delta=3.0,
                           radius=RadiusConfig(eps_max=0.05, steps=2), eps_list=(0.0, 0.005),
                           region_grid=(2, 2))
    report = certify_dataset(model, test, config, progress=False)
    assert len(report.images) == 2
    assert report.config.radius.max_boxes == 256  # the CPU default, recorded instead of "auto" (0)
    for r in report.images:
        # Each status carries what it claims: bounds within delta, or a counterexample beyond it.
        deviation = max(max(ref - lo, hi - ref) for lo, ref, hi in zip(r.lower_px, r.reference_px, r.upper_px,
                                                                       strict=True))
        if r.status is Status.CERTIFIED:
            assert deviation <= config.delta and r.counterexample is None
        elif r.status is Status.FALSIFIED:
            assert r.counterexample is not None and r.counterexample_deviation_px > config.delta
        else:
            assert r.counterexample is None
        assert all(lo <= ref <= hi for lo, ref, hi in zip(r.lower_px, r.reference_px, r.upper_px, strict=True))
        assert r.certified_at_eps["0"] == "certified"  # eps = 0: the reference itself
        assert r.radius is not None and 0 <= r.radius <= 0.05
        if r.status is Status.CERTIFIED:  # the +-0.5 % box lies inside the certified +-1 % box
            assert r.certified_at_eps["0.005"] != "falsified"
        assert np.array(r.region_status).shape == (2, 2)


def test_certify_cli_writes_a_certificate(trained, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "certificate.json"
    code = main(["certify", "--checkpoint", str(trained), "--data", str(tiny_dataset), "--num-images", "2",
                 "--delta", "2", "--contrast", "0.99", "1.01", "--brightness", "-0.01", "0.01",
                 "--eps", "0.002", "--region-grid", "2x1", "--out", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "certified" in printed and "certificate written to" in printed
    doc = json.loads(out.read_text())
    assert doc["schema_version"] == 1 and doc["kind"] == "usn-certification-report"
    assert len(doc["model"]["sha256"]) == 64
    assert doc["perturbation"]["a_lo"] == 0.99 and doc["property"]["delta_px"] == 2.0
    assert doc["data"]["split"] == "test" and doc["method"]["bound"] == "crown"
    # The budget is recorded as work (boxes, depth, the batch used here), never as seconds.
    bab = doc["method"]["bab"]
    assert bab["max_boxes"] == 512 and bab["max_depth"] == 10 and bab["batch_size"] >= 1  # auto resolved
    assert not any("time" in key for key in bab)
    image = doc["images"][0]
    for key in ("status", "reference_px", "lower_px", "upper_px", "seconds"):
        assert key in image
    assert len(image["lower_px"]) == 8
    assert doc["summary"]["num_images"] == 2
    assert len(doc["summary"]["region_certified_fraction"]) == 2


@pytest.mark.parametrize("args,fragment", [
    (["--contrast", "1.2", "0.8"], "contrast range is empty: a_lo=1.2 > a_hi=0.8"),
    (["--brightness", "0.2", "-0.2"], "brightness range is empty"),
    (["--delta", "-1"], "delta must be a finite number >= 0 pixels, got -1.0"),
])
def test_certify_bad_arguments(args, fragment, trained, tiny_dataset, tmp_path, capsys):
    code = main(["certify", "--checkpoint", str(trained), "--data", str(tiny_dataset), "--out",
                 str(tmp_path / "c.json"), "--quiet", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and fragment in err


def test_certify_missing_checkpoint(tiny_dataset, tmp_path, capsys):
    code = main(["certify", "--checkpoint", str(tmp_path / "none.pt"), "--data", str(tiny_dataset),
                 "--out", str(tmp_path / "c.json")])
    assert code == 2 and "checkpoint not found" in capsys.readouterr().err


def test_bad_grid_argument(capsys):
    with pytest.raises(SystemExit):
        main(["certify", "--checkpoint", "x", "--data", "y", "--out", "z", "--region-grid", "3by3"])
    assert "expected a grid like 21x21" in capsys.readouterr().err


def test_config_validation():
    with pytest.raises(CertificationError, match="coverage"):
        CertifyConfig(box=PhotometricBox(1, 1, 0, 0), coverage=1.5)
