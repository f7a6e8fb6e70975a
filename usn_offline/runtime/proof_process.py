"""Per-frame proofs in a process of their own, beside the serving one (torch-free here).

A proof is tens of milliseconds to seconds of torch work driven by Python between small
kernels. On a thread of the node's process it holds the interpreter lock between those
kernels and delays the frame being served: with the shipped parameters it added about
0.5 ms to each 640x480 frame and doubled the node's overhead on a heavier network
(docs/ROS.md, "Cost per frame"). In a child process it shares nothing with serving but
the CPU, where the lowest priority leaves it the spare cycles; the node's own process
then never imports torch.

The parent side (:class:`ProofProcess`) is a :class:`~usn_offline.runtime.pipeline.FrameVerifier`:
``prove`` sends the frame and the served keypoints over a socket pair and waits for the
answer (without the interpreter lock). The child runs this module
(``python -m usn_offline.runtime.proof_process FD``) with the very prover the replay runs
in-process (``usn_offline.certify.frame.make_verifier``), so both decide alike.
"""

from __future__ import annotations

import importlib.util
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np

from usn_offline.errors import UsnError
from usn_offline.resources import keep_freed_memory
from usn_offline.runtime.bundle import Bundle


class ProofProcessError(UsnError):
    """The proof process cannot start, or has stopped; the text says why."""


@dataclass(frozen=True)
class ProcessProof:
    """A proof's outcome as the pipeline reads it (``FrameVerifier`` protocol)."""

    certified: bool
    deviation_px: float
    detail: str


def torch_available() -> bool:
    """Whether this interpreter can import torch (the proofs' engine) at all."""
    return importlib.util.find_spec("torch") is not None


class ProofProcess:
    """Proves frames in a child process at the lowest CPU priority, one frame at a time.

    Starting blocks until the child has lowered the bundle's model (a few seconds) and
    raises :class:`ProofProcessError` when it cannot (the child's reason in the text).
    A child that dies later makes every further ``prove`` raise, naming its exit code;
    the pipeline turns that into NOT_PROVED, so frames keep being served.
    """

    def __init__(self, bundle: Bundle, max_boxes: int, lighting: tuple[float, ...] = (0.0,) * 4) -> None:
        ours, theirs = socket.socketpair()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "usn_offline.runtime.proof_process", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())
        self._lock = threading.Lock()
        try:
            self._conn.send((bundle, int(max_boxes), tuple(float(v) for v in lighting)))
            kind, text = self._conn.recv()
        except (EOFError, OSError):
            self.close()
            raise ProofProcessError(f"the proof process exited at start (exit code {self._process.wait()}); "
                                    "its error is in the log above") from None
        if kind != "ready":
            self.close()
            raise ProofProcessError(text)
        self.description = text  # what it proves, e.g. the lighting range and budget

    @property
    def pid(self) -> int:
        return self._process.pid

    def prove(self, frame: np.ndarray, keypoints_normalised: np.ndarray) -> ProcessProof:
        pixels = np.ascontiguousarray(frame)
        with self._lock:
            try:
                self._conn.send((pixels.shape, pixels.dtype.str, np.asarray(keypoints_normalised, np.float64)))
                self._conn.send_bytes(pixels.reshape(-1).view(np.uint8))
                reply = self._conn.recv()
            except (EOFError, OSError, ValueError):  # ValueError: the connection was closed
                raise ProofProcessError(f"the proof process has stopped (exit code {self._process.poll()})") from None
            except BaseException:
                # Cut off between request and reply (an interrupt, a frame that would not
                # send): the next reply would belong to this frame, so no later frame may
                # read it. Closing ends the child; every later proof fails, none is stale.
                self._conn.close()
                raise
        if reply[0] == "error":
            raise ProofProcessError(reply[1])
        _, certified, deviation, detail = reply
        return ProcessProof(bool(certified), float(deviation), str(detail))

    def close(self) -> None:
        """Stop the child (it ends at the end of its input) and wait for it."""
        with self._lock:
            if not self._conn.closed:
                self._conn.close()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # stuck in a proof: it owes nobody an answer
            self._process.kill()
            self._process.wait()


def _serve(conn: Connection) -> None:
    """The child: the prover's settings, then frames until the parent closes its end."""
    bundle, max_boxes, lighting = conn.recv()
    try:
        from usn_offline.certify.frame import background_process, make_verifier

        background_process()
        verifier = make_verifier(bundle, True, max_boxes, lighting)
    except Exception as exc:  # torch missing or broken, a model the engine cannot lower
        conn.send(("error", f"{type(exc).__name__}: {exc}" if isinstance(exc, ImportError) else str(exc)))
        return
    conn.send(("ready", f"lighting {verifier.config.lighting}, budget {max_boxes} boxes"))
    while True:
        try:
            shape, dtype, keypoints = conn.recv()
            frame = np.frombuffer(conn.recv_bytes(), np.dtype(dtype)).reshape(shape)
        except EOFError:
            return
        try:
            proof = verifier.prove(frame, keypoints)
            reply = ("proof", proof.certified, proof.deviation_px, proof.detail)
        except Exception as exc:  # one bad frame never stops the prover
            reply = ("error", f"{type(exc).__name__}: {exc}")
        try:
            conn.send(reply)
        except OSError:  # the node has gone (killed mid-proof): nobody is waiting
            return


if __name__ == "__main__":
    # The node stops it by closing the socket; a Ctrl-C sent to the whole process group
    # (a terminal, ros2 launch) must not kill it mid-proof with a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keep_freed_memory()  # one proof after another: reuse the memory, no page faults
    _serve(Connection(int(sys.argv[1])))
