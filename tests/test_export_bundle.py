"""Export round trip (ONNX Runtime equals torch), tamper detection and schema validation
of the deployment bundle."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from usn_offline.certify import CertifyConfig, certify_dataset
from usn_offline.certify.region import certified_region
from usn_offline.certify.report import CertificateReport, load_report, report_to_dict, write_report
from usn_offline.cli import main
from usn_offline.data import load_split
from usn_offline.errors import BundleError
from usn_offline.export import ExportConfig, write_bundle
from usn_offline.perturb import PhotometricBox
from usn_offline.runtime.backends import OnnxRuntimeBackend
from usn_offline.runtime.bundle import Bundle
from usn_offline.runtime.tensorrt_engine import tensorrt_available
from usn_offline.train import load_checkpoint


@pytest.fixture(scope="module")
def exported(tiny_dataset, tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    ckpt = tiny_checkpoint
    train = load_split(tiny_dataset, "train")
    model, info = load_checkpoint(ckpt)
    test = load_split(tiny_dataset, "test")
    report = certify_dataset(model, test.subset(slice(0, 3)),
                             CertifyConfig(box=PhotometricBox(1.0, 1.0, 0.0, 0.0), delta=2.0), progress=False)
    cert_path = write_report(root / "cert.json", report_to_dict(report, ckpt, tiny_dataset, "test"))
    bundle = write_bundle(root / "bundle", model, info, ckpt, load_report(cert_path), test, train,
                          ExportConfig(build_engine=False))
    return {"root": root, "ckpt": ckpt, "cert": cert_path, "bundle": bundle, "model": model, "test": test}


def _copy(exported, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(exported["bundle"].root, dst)
    return dst


def test_onnx_runtime_matches_torch(exported):
    bundle, model, test = exported["bundle"], exported["model"], exported["test"]
    backend = OnnxRuntimeBackend(bundle.onnx_path)
    rng = np.random.default_rng(0)
    for batch in (test.images[:8, None], rng.random((4, 1, 64, 64), dtype=np.float32)):
        with torch.no_grad():
            expected = model(torch.from_numpy(np.ascontiguousarray(batch))).numpy()
        np.testing.assert_allclose(backend.infer(batch), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread affinities are read from Linux's /proc")
def test_onnx_runtime_threads_are_not_pinned_to_cores(exported):
    """ONNX Runtime's default pins each worker thread to one core; the backend sets the
    thread count itself, so the node's threads may move away from a busy core."""
    script = ("import glob, sys, numpy as np\n"
              "from usn_offline.runtime.backends import OnnxRuntimeBackend\n"
              "backend = OnnxRuntimeBackend(sys.argv[1])\n"
              "backend.infer(np.zeros((1, 1, 64, 64), np.float32))\n"
              "for task in glob.glob('/proc/self/task/*/status'):\n"
              "    print([l.split()[1] for l in open(task) if l.startswith('Cpus_allowed_list')][0])\n")
    out = subprocess.run([sys.executable, "-c", script, str(exported["bundle"].onnx_path)], capture_output=True,
                         text=True, check=True).stdout.split()
    def cores(listed: str) -> set[int]:  # "0-3,6" -> {0, 1, 2, 3, 6}
        ranges = [part.split("-") for part in listed.split(",")]
        return {c for r in ranges for c in range(int(r[0]), int(r[-1]) + 1)}

    assert len(out) >= 2  # the main thread and the workers
    assert all(cores(listed) == os.sched_getaffinity(0) for listed in out), out


def test_torch_backend_matches_onnx_runtime(exported, device):
    """The torch backend (the checkpoint itself, on CPU or CUDA) gives the exported model's outputs."""
    from usn_offline.runtime.backends import TorchBackend

    backend = TorchBackend(exported["ckpt"], device)
    assert backend.device.type == device
    batch = exported["test"].images[:8, None]
    # CUDA convolutions may run in TF32 (10-bit mantissa): 1e-3 of the normalised range is
    # 0.03 px at 64x64; CPU float32 agrees to 1e-5.
    tol = 1e-5 if device == "cpu" else 1e-3
    np.testing.assert_allclose(backend.infer(batch), OnnxRuntimeBackend(exported["bundle"].onnx_path).infer(batch),
                               atol=tol, rtol=tol)


def test_onnx_file_is_static_checked_and_carries_metadata(exported):
    proto = onnx.load(str(exported["bundle"].onnx_path))
    onnx.checker.check_model(proto)
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 1, 64, 64] and proto.graph.input[0].name == "image"
    assert proto.opset_import[0].version == 17
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["keypoint_names"]) == ["top_left", "top_right", "bottom_right", "bottom_left"]
    assert json.loads(meta["preprocessing"])["input_height"] == 64


def test_the_deployment_gap_counts_float32_rounding(tiny_checkpoint, tiny_dataset):
    """The certificate bounds the network in float64; the very same network run in float32
    (as every backend runs it) is measured against that, so its rounding is in the gap."""
    from usn_offline.export.bundle_writer import deployment_gap_px

    model, _ = load_checkpoint(tiny_checkpoint)
    test = load_split(tiny_dataset, "test")

    def float32_torch(x):
        with torch.no_grad():
            return model.float()(torch.from_numpy(x)).numpy()

    gap = deployment_gap_px(model, float32_torch, test, 8)
    assert 0 < gap < 1e-3


def test_bundle_contents(exported):
    bundle = Bundle.load(exported["bundle"].root)
    assert bundle.keypoint_names[0] == "top_left"
    assert bundle.preprocess.input_width == 64
    assert 0 <= bundle.deployment_gap_px < 1e-3
    assert bundle.effective_delta_px == pytest.approx(2.0 + bundle.deployment_gap_px)
    assert bundle.in_region(1.0, 0.0) and not bundle.in_region(1.5, 0.0)
    assert 0 < bundle.nominal.mean_of_means < 1 and bundle.nominal.num_images == 96
    assert bundle.engine_path is None
    assert bundle.manifest["engine_status"].startswith("not built")  # exported with build_engine=False


def test_one_changed_byte_of_the_model_is_rejected(exported, tmp_path):
    root = _copy(exported, tmp_path)
    data = bytearray((root / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (root / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model.onnx: SHA-256 does not match manifest.json"):
        Bundle.load(root)


def test_truncated_model_is_rejected(exported, tmp_path):
    root = _copy(exported, tmp_path)
    data = (root / "model.onnx").read_bytes()
    (root / "model.onnx").write_bytes(data[:-10])
    with pytest.raises(BundleError, match=r"model.onnx: size .* \(truncated or replaced\)"):
        Bundle.load(root)


def test_edited_certificate_field_is_rejected(exported, tmp_path):
    root = _copy(exported, tmp_path)
    doc = json.loads((root / "certificate.json").read_text())
    doc["delta_px"] = 50.0
    (root / "certificate.json").write_text(json.dumps(doc, indent=1))
    with pytest.raises(BundleError, match=r"certificate.json: (size|SHA-256)"):
        Bundle.load(root)


def test_deleted_file_is_rejected(exported, tmp_path):
    root = _copy(exported, tmp_path)
    (root / "model.onnx").unlink()
    with pytest.raises(BundleError, match=r"bundle is missing model.onnx"):
        Bundle.load(root)
    root2 = _copy(exported, tmp_path / "b2")
    (root2 / "manifest.json").unlink()
    with pytest.raises(BundleError, match=r"bundle is missing manifest.json"):
        Bundle.load(root2)


def _rewrite(root, name, edit):
    """Edit a JSON file and re-hash it in the manifest, as a careless tool would."""
    from usn_offline.runtime.hashing import sha256_file

    doc = json.loads((root / name).read_text())
    edit(doc)
    (root / name).write_text(json.dumps(doc))
    if name != "manifest.json":
        manifest = json.loads((root / "manifest.json").read_text())
        manifest["files"][name] = {"sha256": sha256_file(root / name), "bytes": (root / name).stat().st_size}
        (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name,edit,message", [
    ("certificate.json", lambda d: d.update(model_sha256="0" * 64), "was issued for another model"),
    ("certificate.json", lambda d: d.update(delta_px=-1), "'delta_px' must be >= 0.0, got -1"),
    ("certificate.json", lambda d: d.update(delta_px="2"), "'delta_px' must be a finite number"),
    ("certificate.json", lambda d: d["region"]["boxes"][0].update(a_lo=2.0), "region.boxes[0] is empty"),
    ("certificate.json", lambda d: d["region"].update(boxes=[]), "region.boxes must be a non-empty list"),
    ("certificate.json", lambda d: d.pop("nominal_statistics"), "missing field 'nominal_statistics'"),
    ("certificate.json", lambda d: d.update(schema_version=7), "unsupported schema_version 7"),
    ("manifest.json", lambda d: d.update(keypoint_names=[]), "keypoint_names must be a list of 1..1024 strings"),
    ("manifest.json", lambda d: d.update(keypoint_names=["k"] * 5000), "keypoint_names must be a list of 1..1024"),
    ("manifest.json", lambda d: d["preprocessing"].update(input_height=10 ** 6),
     "input size 1000000x64 must lie within 1..4096 pixels per side"),
    ("manifest.json", lambda d: d.update(schema_version=None), "manifest.json: unsupported schema_version"),
    ("manifest.json", lambda d: d["files"].pop("certificate.json"), "does not list certificate.json"),
    # Types are checked, not coerced: true is not 1, "false" is not false, 64.9 is not 64.
    ("manifest.json", lambda d: d.update(schema_version=True), "manifest.json: unsupported schema_version True"),
    ("certificate.json", lambda d: d.update(schema_version=True), "unsupported schema_version True"),
    ("manifest.json", lambda d: d["preprocessing"].update(grayscale="false"),
     "invalid preprocessing (grayscale must be true (networks read one grey channel), got 'false')"),
    ("manifest.json", lambda d: d["preprocessing"].update(input_height=64.9),
     "invalid preprocessing (input_height must be an integer, got 64.9)"),
    ("certificate.json", lambda d: d["nominal_statistics"].update(num_images=True),
     "num_images must be a positive integer"),
])
def test_schema_validation(exported, tmp_path, name, edit, message):
    root = _copy(exported, tmp_path)
    _rewrite(root, name, edit)
    with pytest.raises(BundleError, match=re.escape(message)):
        Bundle.load(root)


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["preprocessing"].update(input_height=32, input_width=48),
     r"input shape \[1, 1, 64, 64\] does not match the manifest's preprocessing \(N, 1, 32, 48\)"),
    (lambda d: d.update(keypoint_names=d["keypoint_names"] + ["extra"]),
     r"output shape \[1, 8\] does not match the manifest's 5 keypoint names \(N, 10\)"),
])
def test_manifest_runtime_fields_are_checked_against_the_model_at_load(exported, tmp_path, edit, message):
    """A manifest that describes another input size or keypoint count than the ONNX model is
    refused when the backend loads the model, not at the first frame."""
    from usn_offline.runtime.backends import create_backend

    root = _copy(exported, tmp_path)
    _rewrite(root, "manifest.json", edit)
    bundle = Bundle.load(root)
    with pytest.raises(BundleError, match=message):
        create_backend("onnxruntime", bundle)
    with pytest.raises(BundleError, match=message):
        create_backend("auto", bundle)


def test_an_engine_the_certificate_does_not_name_is_refused(exported, tmp_path):
    from usn_offline.runtime.hashing import sha256_file

    root = _copy(exported, tmp_path)
    (root / "model.engine").write_bytes(b"not the certified engine")
    _rewrite(root, "manifest.json", lambda d: d["files"].update(
        {"model.engine": {"sha256": sha256_file(root / "model.engine"), "bytes": 24}}))
    with pytest.raises(BundleError, match="lists model.engine but certificate.json names no engine"):
        Bundle.load(root)
    _rewrite(root, "certificate.json", lambda d: d.update(engine={"sha256": "0" * 64}))
    with pytest.raises(BundleError, match="names another engine"):
        Bundle.load(root)
    (root / "model.engine").unlink()
    _rewrite(root, "manifest.json", lambda d: d["files"].pop("model.engine"))
    with pytest.raises(BundleError, match="names an engine that manifest.json does not list"):
        Bundle.load(root)


def test_certificate_of_another_checkpoint_is_refused(exported, tmp_path):
    doc = json.loads(exported["cert"].read_text())
    doc["model"]["sha256"] = "f" * 64
    model, info = load_checkpoint(exported["ckpt"])
    with pytest.raises(BundleError, match="computed for another checkpoint"):
        write_bundle(tmp_path / "b", model, info, exported["ckpt"], CertificateReport.from_document(doc),
                     exported["test"], exported["test"])


def test_region_falls_back_to_the_radius():
    report = {"summary": {"certified_fraction": 0.5, "radius_at_coverage": 0.02},
              "perturbation": {"a_lo": 0.8, "a_hi": 1.2, "b_lo": -0.2, "b_hi": 0.2},
              "method": {"coverage": 0.95, "radius_search": {"contrast_scale": 1.0, "brightness_scale": 0.5}}}
    region = certified_region(report)
    assert region["kind"] == "symmetric_radius"
    assert region["boxes"][0] == pytest.approx({"a_lo": 0.98, "a_hi": 1.02, "b_lo": -0.01, "b_hi": 0.01})
    report["summary"]["radius_at_coverage"] = None
    with pytest.raises(BundleError, match="proves no region for 95 % of the images"):
        certified_region(report)


def _fallback_report(fraction=0.5, eps=None, radius=None, cells=None):
    """A certification report as export reads it: the requested box certified for
    ``fraction`` of the images, ``eps`` {eps: certified fraction} from --eps (keys as
    report.py writes them), an optional radius at coverage and region-map cells."""
    eps = eps or {}
    report = {"summary": {"certified_fraction": fraction, "radius_at_coverage": radius,
                          "certified_fraction_at_eps": {f"{e:g}": v for e, v in eps.items()}},
              "perturbation": {"a_lo": 0.8, "a_hi": 1.2, "b_lo": -0.2, "b_hi": 0.2},
              "method": {"coverage": 0.95, "eps_list": list(eps), "radius_search": None}}
    if cells is not None:
        report["summary"]["region_cells_at_coverage"] = cells
        report["region_edges"] = {"a": [0.8, 1.0, 1.2], "b": [-0.2, 0.0, 0.2]}
    return report


def test_region_is_the_requested_box_when_it_reaches_coverage():
    region = certified_region(_fallback_report(fraction=0.95, eps={0.3: 1.0}, radius=0.3))
    assert region["kind"] == "box" and "reason" not in region
    assert region["boxes"] == [{"a_lo": 0.8, "a_hi": 1.2, "b_lo": -0.2, "b_hi": 0.2}]


def test_region_falls_back_to_the_largest_symmetric_eps_reaching_coverage():
    report = _fallback_report(eps={0.005: 1.0, 0.01: 1.0, 0.02: 0.95, 0.04: 0.6})
    region = certified_region(report)
    assert region["kind"] == "symmetric_eps" and region["eps"] == 0.02 and region["certified_fraction"] == 0.95
    # Exactly the box certify checked (PhotometricBox.symmetric(0.02, 0.02)).
    assert region["boxes"] == [{"a_lo": 1 - 0.02, "a_hi": 1 + 0.02, "b_lo": -0.02, "b_hi": 0.02}]
    assert region["requested_box"] == {"a_lo": 0.8, "a_hi": 1.2, "b_lo": -0.2, "b_hi": 0.2}
    assert region["requested_certified_fraction"] == 0.5
    reason = region["reason"]
    assert "requested box a in [0.8, 1.2], b in [-0.2, 0.2] is certified for 50.0 % of the images" in reason
    assert "below the 95 % coverage" in reason and "eps = 0.02" in reason and len(reason.splitlines()) == 1
    assert "largest of" not in reason  # the only region proved
    # The eps order in the certificate does not matter: the largest qualifying one wins.
    report = _fallback_report(eps={0.04: 0.96, 0.01: 1.0, 0.08: 0.5})
    assert certified_region(report)["eps"] == 0.04


def test_fallback_is_the_largest_region_proved_for_the_coverage():
    """Among the symmetric eps box, the radius and the region-map cells that reach the
    coverage, the largest in (a, b) area is used, and the reason says it was chosen."""
    eps = {0.02: 1.0}  # 0.04 x 0.04
    region = certified_region(_fallback_report(eps=eps, radius=0.03))  # 0.06 x 0.06
    assert region["kind"] == "symmetric_radius" and region["radius"] == 0.03
    assert "the largest of the 2 regions proved for the coverage" in region["reason"]
    region = certified_region(_fallback_report(eps=eps, radius=0.01))  # 0.02 x 0.02
    assert region["kind"] == "symmetric_eps" and region["eps"] == 0.02
    cells = [[False, True], [False, False]]  # one 0.2 x 0.2 cell
    region = certified_region(_fallback_report(eps=eps, radius=0.03, cells=cells))
    assert region["kind"] == "region_map_cells" and "largest of the 3 regions" in region["reason"]


def test_symmetric_eps_region_uses_the_exact_eps_not_its_rounded_key():
    eps = 0.0123456789  # its key "0.0123457" is larger than the eps certified
    report = _fallback_report(eps={eps: 1.0})
    assert list(report["summary"]["certified_fraction_at_eps"]) == ["0.0123457"]
    region = certified_region(report)
    assert region["eps"] == eps and region["boxes"][0]["a_hi"] == 1 + eps and region["boxes"][0]["b_hi"] == eps
    # A fraction whose eps the certificate does not list exactly is not used; neither is eps = 0.
    report = _fallback_report(eps={0.0: 1.0}, radius=0.01)
    report["summary"]["certified_fraction_at_eps"]["0.05"] = 1.0
    assert certified_region(report)["kind"] == "symmetric_radius"


def test_region_without_a_qualifying_eps_falls_back_to_radius_then_cells_then_fails():
    eps = {0.01: 0.9, 0.02: 0.5}  # none reaches 95 %
    region = certified_region(_fallback_report(eps=eps, radius=0.015))
    assert region["kind"] == "symmetric_radius" and region["radius"] == 0.015
    assert region["boxes"][0] == pytest.approx({"a_lo": 0.985, "a_hi": 1.015, "b_lo": -0.015, "b_hi": 0.015})
    assert "certified for 50.0 %" in region["reason"] and "radius 0.015" in region["reason"]
    region = certified_region(_fallback_report(eps=eps, cells=[[False, True], [False, False]]))
    assert region["kind"] == "region_map_cells"
    assert region["boxes"] == [{"a_lo": 0.8, "a_hi": 1.0, "b_lo": 0.0, "b_hi": 0.2}]
    assert "1 of 4 region-map cells" in region["reason"]
    with pytest.raises(BundleError, match="proves no region for 95 % of the images"):
        certified_region(_fallback_report(eps=eps, cells=[[False, False], [False, False]]))


def test_export_says_when_it_falls_back_from_the_requested_box(exported, tmp_path, capsys, caplog):
    doc = json.loads(exported["cert"].read_text())
    doc["summary"]["certified_fraction"] = 0.0  # as if the requested box had missed coverage
    for image in doc["images"]:
        image["status"] = "not_certified"
    doc["summary"]["certified_fraction_at_eps"] = {"0.01": 1.0}
    doc["method"]["eps_list"] = [0.01]
    cert = tmp_path / "fallback.json"
    cert.write_text(json.dumps(doc))
    with caplog.at_level("WARNING"):
        code = main(["export", "--checkpoint", str(exported["ckpt"]), "--certificate", str(cert),
                     "--out", str(tmp_path / "b"), "--no-engine"])
    out = capsys.readouterr().out
    assert code == 0
    assert [r.getMessage() for r in caplog.records if "requested box" in r.getMessage()] == [
        "the requested box a in [1, 1], b in [0, 0] is certified for 0.0 % of the images, below the 95 % "
        "coverage: the runtime uses the largest symmetric box certified for the coverage, eps = 0.01 "
        "(a in [0.99, 1.01], b in [-0.01, 0.01], certified for 100.0 %)"]
    assert "requested box" in out and "region used instead" in out and "symmetric eps = 0.01" in out
    bundle = Bundle.load(tmp_path / "b")  # the torch-free loader accepts the region kind
    assert bundle.certificate["region"]["kind"] == "symmetric_eps"
    assert bundle.in_region(1.01, -0.01) and not bundle.in_region(1.02, 0.0)


def test_export_cli(exported, tmp_path, capsys):
    code = main(["export", "--checkpoint", str(exported["ckpt"]), "--certificate", str(exported["cert"]),
                 "--out", str(tmp_path / "cli_bundle"), "--no-engine"])
    out = capsys.readouterr().out
    assert code == 0 and "certified region" in out and "deployment gap" in out
    Bundle.load(tmp_path / "cli_bundle")
    code = main(["export", "--checkpoint", str(exported["ckpt"]), "--certificate", str(tmp_path / "no.json"),
                 "--out", str(tmp_path / "x")])
    assert code == 2 and "certificate not found" in capsys.readouterr().err


def test_engine_building(exported, tmp_path):
    ok, why = tensorrt_available()
    if not ok:
        pytest.skip(f"TensorRT engine build not testable here: {why}")
    from usn_offline.export.engine_update import add_engine_to_bundle

    bundle = add_engine_to_bundle(Bundle.load(_copy(exported, tmp_path)))
    assert bundle.engine_path is not None and bundle.certificate["engine"]["precision"] == "fp32"


def test_build_engine_cli_explains_why_not_here(exported, tmp_path, capsys):
    if tensorrt_available()[0]:
        pytest.skip("TensorRT is available: the engine path is tested above")
    code = main(["build-engine", "--bundle", str(_copy(exported, tmp_path))])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cannot build a TensorRT engine here" in err and len(err.splitlines()) == 1


def test_bundle_loads_and_runs_without_torch(exported):
    """The robot side: validate the bundle and run ONNX Runtime with torch unavailable."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from usn_offline.runtime.bundle import Bundle\n"
        "from usn_offline.runtime.backends import OnnxRuntimeBackend\n"
        f"b = Bundle.load({str(exported['bundle'].root)!r})\n"
        "out = OnnxRuntimeBackend(b.onnx_path).infer(np.zeros((1, 1, 64, 64), np.float32))\n"
        "print(out.shape)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "(1, 8)"


def test_export_out_never_deletes_anything_but_a_bundle(exported, tmp_path, capsys, monkeypatch):
    """--out must be new, empty or an earlier bundle: a folder with other files, the
    checkpoint's own folder, a parent, '.', or a file are refused before any work, and
    nothing is deleted or left behind."""
    def export(out):
        code = main(["export", "--checkpoint", str(exported["ckpt"]), "--certificate", str(exported["cert"]),
                     "--out", str(out), "--no-engine"])
        return code, capsys.readouterr()

    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    (work / "sub" / "data.bin").write_bytes(b"x")
    shutil.copy(exported["ckpt"], work / "m.pt")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    monkeypatch.chdir(work)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    for out, message in ((work, "holds files that are not part of a bundle (m.pt, notes.txt, sub)"),
                         (".", "holds files that are not part of a bundle"),
                         ("..", "holds files that are not part of a bundle"),
                         (a_file, "is a file, not a folder")):
        code, streams = export(out)
        assert code == 2 and message in streams.err, (out, streams.err)
        assert len(streams.err.strip().splitlines()) == 1  # one line, no traceback
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before  # nothing lost or left
    # A folder that only looks like a bundle (a manifest of another kind) is not replaced either.
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "manifest.json").write_text('{"kind": "something-else"}')
    code, streams = export(fake)
    assert code == 2 and "not a bundle written by usn-offline" in streams.err
    # New, empty, and an earlier bundle of ours (replaced whole) are fine.
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (tmp_path / "new", empty, tmp_path / "new"):
        code, streams = export(out)
        assert code == 0, streams.err
        Bundle.load(out)
    assert not list(tmp_path.glob("*.partial"))


def test_a_failed_export_keeps_the_previous_bundle_and_every_other_folder(exported, tmp_path, capsys):
    """The new bundle is checked before it replaces an earlier one; the work folder is the
    export's own (a folder named like '<out>.partial' is someone else's)."""
    out = tmp_path / "bundle"
    assert main(["export", "--checkpoint", str(exported["ckpt"]), "--certificate", str(exported["cert"]),
                 "--out", str(out), "--no-engine"]) == 0
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    theirs = tmp_path / "bundle.partial"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    # images whose statistics are NaN: the export fails after everything is written
    model, info = load_checkpoint(exported["ckpt"])
    nan_train = dataclasses.replace(exported["test"], images=np.full_like(exported["test"].images, np.nan))
    with pytest.raises(BundleError, match="certificate.json would hold NaN or infinite values"):
        write_bundle(out, model, info, exported["ckpt"], load_report(exported["cert"]), exported["test"], nan_train)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert (theirs / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")) == ["bundle.partial"]


@pytest.mark.parametrize("edit,message", [
    (lambda r: r["summary"].pop("certified_fraction"), "no field 'summary.certified_fraction'"),
    (lambda r: r.pop("model"), "no field 'model'"),
    (lambda r: r["property"].update(delta_px="2"), "'property.delta_px' must be a finite number"),
    (lambda r: r["perturbation"].update(a_lo=[0.9]), "'perturbation.a_lo' must be a finite number"),
    (lambda r: r["perturbation"].update(a_lo=float("nan")), "NaN is not a JSON number"),
    (lambda r: r["summary"].update(num_images=True), "'summary.num_images' must be an integer"),
    (lambda r: r.update(kind="other"), "not a usn-offline certification report"),
    (lambda r: r.pop("data"), "no field 'data'"),
    (lambda r: r["data"].update(split=3), "'data.split' must be a string"),
    # claims certify cannot make, or that its per-image results do not back
    (lambda r: r["summary"].update(certified_fraction=5.0), "disagrees with its per-image results"),
    (lambda r: r["images"][0].update(status="falsified"), "disagrees with its per-image results"),
    (lambda r: r["summary"].update(num_images=0), "counts 0 images"),
    (lambda r: r["property"].update(norm="foo"), "norm 'foo' is not linf or l2"),
    (lambda r: r["property"].update(reference="foo"), "reference 'foo' is not prediction"),
    (lambda r: r["property"].update(delta_px=-1.0), "delta_px -1.0 is negative"),
    (lambda r: r["perturbation"].update(a_lo=1.5), "is empty or has a contrast <= 0"),
    (lambda r: r["perturbation"].update(clip="yes"), "not for clipped images"),
    (lambda r: r["perturbation"].update(clip=False), "not for clipped images"),
])
def test_export_refuses_an_incomplete_certificate(exported, tmp_path, capsys, edit, message):
    report = json.loads(exported["cert"].read_text())
    edit(report)
    cert = tmp_path / "cert.json"
    cert.write_text(json.dumps(report))
    code = main(["export", "--checkpoint", str(exported["ckpt"]), "--certificate", str(cert),
                 "--out", str(tmp_path / "b"), "--no-engine"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("text,message", [
    ('{"a": ' + "[" * 100000 + "]" * 100000 + "}", "nested too deeply"),
    ('{"delta_px": 1' + "0" * 400 + "}", "an integer of 401 digits"),
    ('{"delta_px": 1e400}', "overflows a float"),
    ('{"delta_px": NaN}', "NaN is not a JSON number"),
])
def test_hostile_json_gives_one_clear_error(exported, tmp_path, text, message):
    """Deep nesting, huge integers, overflowing floats and NaN in a (re-hashed) bundle
    file: BundleError naming the file, never RecursionError or OverflowError."""
    from usn_offline.errors import BundleError
    from usn_offline.runtime.hashing import sha256_file

    root = _copy(exported, tmp_path)
    (root / "certificate.json").write_text(text)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"]["certificate.json"] = {"sha256": sha256_file(root / "certificate.json"),
                                             "bytes": (root / "certificate.json").stat().st_size}
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=f"certificate.json: not acceptable JSON .*{message}"):
        Bundle.load(root)
