"""Modules the robot-side node and the replay import must work without torch installed."""

import subprocess
import sys

TORCH_FREE_MODULES = ["usn_offline.runtime", "usn_offline.runtime.preprocess", "usn_offline.runtime.bundle",
                      "usn_offline.runtime.backends", "usn_offline.runtime.hashing", "usn_offline.perturb",
                      "usn_offline.errors", "usn_offline.jsonio", "usn_offline.runtime.monitor",
                      "usn_offline.runtime.pipeline", "usn_offline.runtime.stream", "usn_offline.runtime.dds",
                      "usn_offline.runtime.proof_process",
                      "usn_offline.replay.bag_reader", "usn_offline.replay.bag_writer", "usn_offline.replay.offline",
                      "usn_offline.replay.live", "usn_offline.replay.report", "usn_offline.replay.plots",
                      "usn_offline.data", "usn_offline.runtime.scene_check", "usn_offline.runtime.signing",
                      # the TensorRT engine builder and runner (tensorrt + cuda-python, no torch)
                      "usn_offline.export", "usn_offline.runtime.tensorrt_engine"]


def _python(code: str) -> str:
    """Run ``code`` in a fresh interpreter; its stdout (stripped), asserting it succeeded."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_runtime_modules_import_without_torch():
    # A None entry in sys.modules makes "import torch" fail, as on a robot without torch.
    code = ("import sys; sys.modules['torch'] = None\n"
            + "".join(f"import {m}\n" for m in TORCH_FREE_MODULES)
            + "assert sys.modules['torch'] is None\n"
            + "print('ok')")
    assert _python(code) == "ok"


def test_the_cli_parses_without_torch():
    """``usn-offline verify`` and ``--help`` run on a robot: the parser repeats the configs'
    defaults instead of importing them (tests/test_cli.py checks they agree)."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from usn_offline.cli import build_parser\n"
            "build_parser().parse_args(['verify', '--bundle', 'b'])\n"
            "print('ok')")
    assert _python(code) == "ok"


def test_the_node_and_replay_runtime_serve_a_bundle_without_torch(exported_bundle):
    """backend auto without TensorRT: ONNX Runtime, and torch is never imported."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np\n"
            "from usn_offline.runtime.bundle import Bundle\n"
            "from usn_offline.runtime.stream import StreamSettings\n"
            f"stream = StreamSettings(backend='auto').open(Bundle.load({str(exported_bundle)!r}))\n"
            "result = stream.process_frame(np.full((480, 640, 3), 128, np.uint8))\n"
            "assert result.keypoints_px.shape == (4, 2), result.status\n"
            "print(stream.pipeline.backend.name)")
    assert _python(code) == "onnxruntime"


def test_frame_proofs_need_only_torch_and_onnx_beyond_the_runtime():
    """The robot image adds torch, onnx and tqdm for per-frame proofs (Dockerfile
    FRAME_PROOFS): the prover must not pull the offline stack (scikit-image, scipy,
    matplotlib) in."""
    code = ("import sys\n"
            "for name in ('skimage', 'scipy', 'matplotlib', 'yaml', 'rosbags'):\n"
            "    sys.modules[name] = None\n"
            "import usn_offline.certify.frame\n"
            "print('ok')")
    assert _python(code) == "ok"
