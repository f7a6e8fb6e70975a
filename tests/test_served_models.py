"""What the runtime refuses to serve, and what becomes of a network output that is no
keypoints: real ONNX models edited with the onnx package, served by ONNX Runtime.

- A model that cannot serve one float32 frame at a time (a static batch of 2, a float64
  input) is refused when it loads, not blamed on every camera frame afterwards.
- A model whose weights sit in external data files (which no manifest hash covers) does
  not load; the bytes ONNX Runtime serves are the bytes that were hashed.
- An output of the wrong size (a model that lies about its output shape), NaN, or far
  off any image is BAD_INPUT with the reason, never keypoints, never certified.
"""

import shutil

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="editing models needs the onnx package")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from usn_offline.errors import BundleError  # noqa: E402
from usn_offline.runtime.backends import OnnxRuntimeBackend, create_backend  # noqa: E402
from usn_offline.runtime.bundle import Bundle  # noqa: E402
from usn_offline.runtime.monitor import PhotometricMonitor, Reason  # noqa: E402
from usn_offline.runtime.pipeline import KeypointPipeline  # noqa: E402


def _edited(bundle: Bundle, tmp_path, name: str, edit) -> str:
    """The bundle's model with ``edit(model)`` applied, saved as ``name``."""
    model = onnx.load(str(bundle.onnx_path))
    edit(model)
    path = tmp_path / name
    onnx.save(model, str(path))
    return str(path)


def _append(op: str, value: np.ndarray | None = None, declared: int | None = None, **attrs):
    """An edit that routes the output through one more node ``op(output, value)``;
    ``declared``: the output width the model then claims (whatever it computes)."""

    def edit(model) -> None:
        graph = model.graph
        out = graph.output[0]
        inputs = [out.name]
        if value is not None:
            graph.initializer.append(numpy_helper.from_array(value, "edit_value"))
            inputs.append("edit_value")
        graph.node.append(helper.make_node(op, inputs, ["edited"], **attrs))
        width = declared or out.type.tensor_type.shape.dim[1].dim_value
        graph.output.remove(out)
        graph.output.append(helper.make_tensor_value_info("edited", TensorProto.FLOAT, [1, width]))

    return edit


def _frame() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.kron(rng.uniform(40, 200, (6, 8)), np.ones((80, 80))).astype(np.uint8)


def _pipeline(bundle: Bundle, model_path: str) -> KeypointPipeline:
    return KeypointPipeline(bundle, OnnxRuntimeBackend(model_path), PhotometricMonitor(bundle.region, bundle.nominal))


def _first_values(count: int, declared: int):
    """An edit that keeps the output's first ``count`` values and declares ``declared``."""
    base = _append("Slice", None, declared=declared)

    def edit(model) -> None:
        model.graph.initializer.extend([numpy_helper.from_array(np.array([v], np.int64), name)
                                        for name, v in (("starts", 0), ("ends", count), ("axes", 1))])
        base(model)
        model.graph.node[-1].input.extend(["starts", "ends", "axes"])

    return edit


@pytest.mark.parametrize("edit, detail", [
    (_append("Mul", np.array(np.nan, np.float32)), "not finite"),
    (_append("Mul", np.array(1e6, np.float32)), "far off the image"),
    # computes 6 values, claims the manifest's 8: the declared shape passes the load check
    (_first_values(6, declared=8), "gave 6 values, not 8"),
])
def test_an_output_that_is_no_keypoints_is_bad_input(exported_bundle, tmp_path, edit, detail):
    bundle = Bundle.load(exported_bundle)
    pipe = _pipeline(bundle, _edited(bundle, tmp_path, "m.onnx", edit))
    result = pipe.process(_frame())
    assert result.keypoints_px is None and not result.certified
    assert result.status.reasons == [Reason.BAD_INPUT] and detail in result.status.detail
    # the same pipeline serves the bundle's own model again
    pipe.backend = OnnxRuntimeBackend(bundle.onnx_path)
    assert pipe.process(_frame()).keypoints_px.shape == (4, 2)


def _static_batch(model) -> None:
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 2


def _double_input(model) -> None:
    graph = model.graph
    first = graph.input[0].name
    for node in graph.node:
        node.input[:] = ["as_float" if i == first else i for i in node.input]
    graph.node.insert(0, helper.make_node("Cast", [first], ["as_float"], to=TensorProto.FLOAT))
    graph.input[0].type.tensor_type.elem_type = TensorProto.DOUBLE


@pytest.mark.parametrize("edit, message", [
    (_static_batch, "input batch size 2, expected 1 or dynamic"),
    (_double_input, "input tensor(double) and output tensor(float), expected tensor(float) for both"),
])
def test_a_model_that_cannot_serve_a_frame_is_refused_at_load(exported_bundle, tmp_path, edit, message):
    bundle = Bundle.load(exported_bundle)
    path = _edited(bundle, tmp_path, "m.onnx", edit)
    with pytest.raises(BundleError, match=message.replace("(", r"\(").replace(")", r"\)")):
        create_backend("onnxruntime", bundle, model_path=path)


def test_external_weights_do_not_load_and_the_served_bytes_are_the_hashed_ones(exported_bundle, tmp_path):
    bundle = Bundle.load(exported_bundle)
    model = onnx.load(str(bundle.onnx_path))
    external = tmp_path / "external" / "model.onnx"
    external.parent.mkdir()
    onnx.save_model(model, str(external), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    assert (external.parent / "weights.bin").is_file()
    with pytest.raises(BundleError, match="ONNX Runtime cannot load the model"):
        OnnxRuntimeBackend(external)
    # The file is read once: what is hashed is what is served.
    served = tmp_path / "served"
    shutil.copytree(exported_bundle, served)
    backend = create_backend("onnxruntime", Bundle.load(served))
    assert backend.model_sha256 == bundle.model_sha256
    with pytest.raises(BundleError, match="the file changed after the bundle was checked"):
        OnnxRuntimeBackend(served / "model.onnx", expected_sha256="0" * 64)


def _other_checkpoint(exported_bundle, tmp_path):
    """The bundle's checkpoint with one weight changed: another network."""
    import torch

    from usn_offline.train import load_checkpoint, save_checkpoint

    model, info = load_checkpoint(exported_bundle.parent / "m.pt")
    with torch.no_grad():
        next(model.parameters()).flatten()[0] += 0.5
    return save_checkpoint(tmp_path / "other.pt", model, info)


def test_backend_torch_serves_only_the_certified_checkpoint(exported_bundle, tmp_path):
    """backend torch used to serve any checkpoint as if certified, with the ONNX Runtime gap:
    now the checkpoint must be the one the certificate names, and its own gap is measured."""
    pytest.importorskip("torch", reason="backend torch needs torch")
    bundle = Bundle.load(exported_bundle)
    other = _other_checkpoint(exported_bundle, tmp_path)
    with pytest.raises(BundleError, match="is not the checkpoint the certificate was issued for"):
        create_backend("torch", bundle, checkpoint_path=other)
    served = create_backend("torch", bundle, checkpoint_path=exported_bundle.parent / "m.pt")
    assert 0 <= served.deployment_gap_px < 1e-3  # the same network in float32
    flagged = create_backend("torch", bundle, checkpoint_path=other, any_checkpoint=True)
    assert flagged.deployment_gap_px > served.deployment_gap_px  # measured, not the bundle's


def test_engines_are_compared_on_scene_like_inputs_too():
    """An engine's gap was measured on uniform noise alone; real frames are smooth regions,
    edges and clipped pixels, where a reduced-precision engine may deviate otherwise."""
    from usn_offline.runtime.backends import gap_probe_images

    images = gap_probe_images(48, 64, 64)
    assert images.shape == (64, 1, 48, 64) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 1
    noise, scenes = images[:32], images[32:]
    clipped = lambda x: float(((x == 0) | (x == 1)).mean())  # noqa: E731
    assert clipped(noise) < 0.01 and clipped(scenes) > 0.05
    # Scene-like: neighbouring pixels mostly close (flat regions, a gradient), unlike noise.
    step = lambda x: float(np.abs(np.diff(x, axis=-1)).mean())  # noqa: E731
    assert step(scenes) < 0.15 < step(noise)
    np.testing.assert_array_equal(images, gap_probe_images(48, 64, 64))  # the same inputs every start
