"""Which TensorRT engine file may serve a bundle (runtime/tensorrt_engine.py, choose_engine),
and the torch-free CUDA buffers of the runner where a GPU and cuda-python are present.

The choice is pure bookkeeping over files and records, so it is tested here with engine
files of arbitrary bytes: TensorRT itself only runs where the package and a GPU are."""

import json
import shutil

import numpy as np
import pytest

from usn_offline.runtime.bundle import Bundle
from usn_offline.runtime.hashing import sha256_file
from usn_offline.runtime.tensorrt_engine import (
    EngineTarget,
    cached_engine_paths,
    choose_engine,
    record_mismatch,
    write_cache_record,
)

HERE = EngineTarget("10.9.0", "NVIDIA Orin", "8.7", "fp32")


def _bundle_with_engine(exported_bundle, tmp_path, target: EngineTarget = HERE) -> Bundle:
    """A copy of the bundle holding an engine file recorded for ``target``, as build-engine writes it."""
    root = tmp_path / "bundle"
    shutil.copytree(exported_bundle, root)
    engine = root / "model.engine"
    engine.write_bytes(b"serialized engine for " + target.gpu_name.encode())
    certificate = json.loads((root / "certificate.json").read_text())
    certificate["engine"] = {"sha256": sha256_file(engine), **target.record()}
    (root / "certificate.json").write_text(json.dumps(certificate))
    manifest = json.loads((root / "manifest.json").read_text())
    for name in ("model.engine", "certificate.json"):
        manifest["files"][name] = {"sha256": sha256_file(root / name), "bytes": (root / name).stat().st_size}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return Bundle.load(root)


def test_the_bundles_engine_is_used_only_on_the_target_it_was_built_for(exported_bundle, tmp_path):
    bundle = _bundle_with_engine(exported_bundle, tmp_path)
    cache = tmp_path / "cache"
    choice = choose_engine(bundle, HERE, cache)
    assert (choice.path, choice.build, choice.reason) == (bundle.engine_path, False, "")
    for other, why in ((EngineTarget("10.3.0", "NVIDIA Orin", "8.7", "fp32"), "tensorrt_version '10.9.0'"),
                       (EngineTarget("10.9.0", "NVIDIA H100", "9.0", "fp32"), "gpu 'NVIDIA Orin'"),
                       (EngineTarget("10.9.0", "NVIDIA Orin", "8.7", "fp16"), "precision 'fp32'")):
        choice = choose_engine(bundle, other, cache)
        assert choice.build and choice.path.parent == cache and why in choice.reason, choice
        assert choice.path.name.endswith("-1x1x64x64.engine")
    assert choose_engine(bundle, HERE, cache, force_update=True).build


def test_a_modified_engine_file_is_rebuilt_not_loaded(exported_bundle, tmp_path):
    """The bundle's hashes are checked at load; an engine swapped afterwards (or a cached
    one edited) fails its recorded hash and is rebuilt."""
    bundle = _bundle_with_engine(exported_bundle, tmp_path)
    bundle.engine_path.write_bytes(b"swapped after loading")
    choice = choose_engine(bundle, HERE, tmp_path / "cache")
    assert choice.build and "SHA-256 differs" in choice.reason


def test_cached_engines_are_keyed_recorded_and_checked(exported_bundle, tmp_path):
    bundle = Bundle.load(exported_bundle)
    cache = tmp_path / "cache"
    first = choose_engine(bundle, HERE, cache)
    assert first.build and "missing" in first.reason and first.record_path is not None
    # As the backend does after building: the engine, then its record.
    cache.mkdir()
    first.path.write_bytes(b"engine built here")
    write_cache_record(first.record_path, {"sha256": sha256_file(first.path), **HERE.record(),
                                           "onnx_sha256": bundle.model_sha256})
    again = choose_engine(bundle, HERE, cache)
    assert (again.path, again.build) == (first.path, False)
    # Another model, TensorRT or GPU gets another cache entry; an edited file is rebuilt.
    other = EngineTarget("10.9.0", "NVIDIA Orin", "8.7", "fp16")
    assert choose_engine(bundle, other, cache).path != first.path
    assert choose_engine(bundle, HERE, cache, onnx_sha256="f" * 64).path != first.path
    first.path.write_bytes(b"engine edited")
    assert choose_engine(bundle, HERE, cache).build
    first.record_path.write_text("{not json")
    assert "no record" in choose_engine(bundle, HERE, cache).reason


def test_an_explicit_engine_file_needs_a_matching_record(exported_bundle, tmp_path):
    bundle = Bundle.load(exported_bundle)
    path = tmp_path / "robot.engine"
    path.write_bytes(b"someone's engine")
    choice = choose_engine(bundle, HERE, tmp_path / "cache", engine_path=path)
    assert choice.build and choice.path == path and "no record" in choice.reason
    write_cache_record(choice.record_path, {"sha256": sha256_file(path), **HERE.record(),
                                            "onnx_sha256": bundle.model_sha256})
    assert not choose_engine(bundle, HERE, tmp_path / "cache", engine_path=path).build
    assert choose_engine(bundle, HERE, tmp_path / "cache", engine_path=path, force_update=True).build
    # An engine of another model is never taken for this one.
    assert "another ONNX model" in choose_engine(bundle, HERE, tmp_path / "cache", engine_path=path,
                                                 onnx_sha256="e" * 64).reason


def test_the_bundles_engine_never_serves_another_model(exported_bundle, tmp_path):
    bundle = _bundle_with_engine(exported_bundle, tmp_path)
    choice = choose_engine(bundle, HERE, tmp_path / "cache", onnx_sha256="d" * 64)
    assert choice.build and choice.path != bundle.engine_path


def test_record_mismatch_names_the_field(tmp_path):
    path = tmp_path / "e.engine"
    path.write_bytes(b"x")
    record = {"sha256": sha256_file(path), **HERE.record()}
    assert record_mismatch(record, path, "a" * 64, HERE) == ""
    assert "compute_capability '8.7'" in record_mismatch(record, path, "a" * 64,
                                                          EngineTarget("10.9.0", "NVIDIA Orin", "8.9", "fp32"))
    assert record_mismatch(None, path, "a" * 64, HERE) == "no record of what it was built for"


def test_cache_entries_name_the_input_shape(tmp_path):
    engine, record = cached_engine_paths(tmp_path, "a" * 64, HERE, (1, 1, 96, 128))
    assert engine.name.endswith("-1x1x96x128.engine") and record.name.endswith("-1x1x96x128.json")


def test_cuda_buffers_round_trip_without_torch():
    """The runner's device buffers (cuda-python; no torch) copy a batch to the GPU and back."""
    from usn_offline.runtime import tensorrt_engine as te

    try:
        cudart = te._cudart()
        count = te._call(cudart, "cudaGetDeviceCount")
    except Exception as exc:  # ImportError, or a CUDA error without a driver or GPU
        pytest.skip(f"cuda-python with a CUDA GPU is not available here ({exc})")
    assert count >= 1
    stream = te._call(cudart, "cudaStreamCreate")
    data = np.random.default_rng(0).random((2, 1, 64, 64), dtype=np.float32)
    back = np.zeros_like(data)
    buffer = te._DeviceBuffer(cudart, data.nbytes)
    buffer.upload(data, stream)
    buffer.download(back, stream)
    te._call(cudart, "cudaStreamSynchronize", stream)
    buffer.free()
    assert np.array_equal(back, data)
