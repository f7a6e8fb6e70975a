"""The node's per-frame proofs in a child process (usn_offline/runtime/proof_process.py):
the same decisions as the in-process prover, and a clear failure when the child cannot
start or stops, without taking serving down."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from usn_offline.certify.frame import make_verifier
from usn_offline.data.backgrounds import load_backgrounds
from usn_offline.data.render import RenderConfig, render_scene
from usn_offline.runtime.backends import create_backend
from usn_offline.runtime.bundle import Bundle
from usn_offline.runtime.monitor import PhotometricMonitor, Reason
from usn_offline.runtime.pipeline import KeypointPipeline
from usn_offline.runtime.preprocess import preprocess
from usn_offline.runtime.proof_process import ProofProcess, ProofProcessError

LIGHTING = (0.97, 1.03, -0.03, 0.03)


@functools.cache
def _frames() -> tuple[np.ndarray, ...]:
    """Camera-size rgb8 scenes relit inside and beyond the range, some with clipped pixels
    (rendered once for the module)."""
    frames = []
    lights = [(1.0, 0.0), (0.98, 0.02), (1.03, -0.03), (1.3, 0.2), (0.6, -0.3)]
    for seed, (a, b) in zip(range(200, 205), lights, strict=True):
        image, _ = render_scene(np.random.default_rng(seed), load_backgrounds(), RenderConfig())
        lit = np.clip(a * image / 255.0 + b, 0.0, 1.0)
        frame = cv2.resize((255 * lit).round().astype(np.uint8), (640, 480), interpolation=cv2.INTER_LINEAR)
        frames.append(cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB))
        frames[-1].setflags(write=False)  # shared by the tests
    return tuple(frames)


@pytest.fixture(scope="module")
def served(exported_bundle):
    bundle = Bundle.load(exported_bundle)
    prover = ProofProcess(bundle, 8, LIGHTING)
    yield bundle, prover, create_backend("onnxruntime", bundle)
    prover.close()


def test_the_proof_process_decides_as_the_in_process_prover(served):
    bundle, prover, backend = served
    assert "budget 8 boxes" in prover.description
    local = make_verifier(bundle, True, 8, LIGHTING)
    outcomes = set()
    for frame in _frames():
        out = backend.infer(preprocess(frame, bundle.preprocess)[None, None].astype(np.float32)).reshape(-1)
        remote, here = prover.prove(frame, out), local.prove(frame, out)
        assert remote.certified == here.certified
        assert remote.deviation_px == pytest.approx(here.deviation_px, rel=1e-9, abs=1e-9)
        assert remote.detail == here.detail
        outcomes.add(remote.certified)
    assert outcomes == {True, False}  # both kinds of answer come back


def test_a_frame_the_prover_cannot_handle_is_not_proved_and_the_prover_goes_on(served):
    bundle, prover, _ = served
    with pytest.raises(ProofProcessError, match="ValueError"):
        prover.prove(np.zeros((48, 64), np.uint8), np.zeros(3))  # not 2K keypoint coordinates
    frame = _frames()[0]
    out = np.zeros(2 * len(bundle.keypoint_names))
    assert isinstance(prover.prove(frame, out).certified, bool)


def test_a_stopped_proof_process_flags_frames_and_serving_goes_on(exported_bundle):
    bundle = Bundle.load(exported_bundle)
    prover = ProofProcess(bundle, 4, LIGHTING)
    pipeline = KeypointPipeline(bundle, create_backend("onnxruntime", bundle),
                                PhotometricMonitor(bundle.region, bundle.nominal), verifier=prover)
    frame = _frames()[0]
    assert "verifier error" not in pipeline.process(frame).status.detail  # a live prover answers
    os.kill(prover.pid, signal.SIGKILL)
    prover._process.wait()
    result = pipeline.process(frame)
    assert result.keypoints_px is not None and not result.certified
    assert Reason.NOT_PROVED in result.status.reasons
    assert f"the proof process has stopped (exit code {-signal.SIGKILL})" in result.status.detail
    prover.close()


def test_a_request_cut_off_before_its_reply_ends_the_prover_rather_than_answer_another_frame(exported_bundle):
    """A proof interrupted while waiting for its reply (the reply still on its way): the next
    frame would read that reply as its own. The connection is closed instead: later proofs
    fail (NOT_PROVED), none is answered with another frame's proof."""
    prover = ProofProcess(Bundle.load(exported_bundle), 4, LIGHTING)
    frames = _frames()
    receive = prover._conn.recv

    def interrupted():
        prover._conn.recv = receive
        raise KeyboardInterrupt

    prover._conn.recv = interrupted
    with pytest.raises(KeyboardInterrupt):
        prover.prove(frames[0], np.zeros(8))
    with pytest.raises(ProofProcessError, match="has stopped"):
        prover.prove(frames[1], np.zeros(8))
    prover.close()


def test_the_proof_process_ends_when_closed(exported_bundle):
    prover = ProofProcess(Bundle.load(exported_bundle), 4, LIGHTING)
    if hasattr(os, "SCHED_IDLE"):  # Linux: it takes only CPU time nothing else wants
        assert os.sched_getscheduler(prover.pid) == os.SCHED_IDLE
        assert os.getpriority(os.PRIO_PROCESS, prover.pid) == 19
    prover.close()
    assert prover._process.returncode == 0
    with pytest.raises(ProofProcessError, match="has stopped"):
        prover.prove(_frames()[0], np.zeros(8))


def test_a_model_the_prover_cannot_read_stops_the_start_with_the_reason(exported_bundle, tmp_path):
    copy = shutil.copytree(exported_bundle, tmp_path / "bundle")
    bundle = Bundle.load(copy)  # loaded intact, then the model is damaged under it
    (copy / "model.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(ProofProcessError, match="model.onnx"):
        ProofProcess(bundle, 4, LIGHTING)


def _running(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, exited but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_the_proof_process_ends_when_the_node_is_killed(exported_bundle):
    """A node killed outright (no clean-up) leaves no prover behind: the child ends at the
    end of its input."""
    script = ("import sys, time\n"
              "from usn_offline.runtime.bundle import Bundle\n"
              "from usn_offline.runtime.proof_process import ProofProcess\n"
              f"prover = ProofProcess(Bundle.load({str(exported_bundle)!r}), 4)\n"
              "print(prover.pid, flush=True)\n"
              "time.sleep(600)\n")
    node = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(node.stdout.readline())
    assert _running(child)
    node.kill()
    node.wait()
    deadline = time.monotonic() + 60  # a liveness wait, not a timing assertion
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(child)
