"""Helpers for the tests that talk to other processes over DDS."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable


def spin_until(node, done: Callable[[], bool], timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Spin ``node`` until ``done()``, ``timeout`` seconds pass, or ``proc`` exits."""
    import rclpy

    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline and (proc is None or proc.poll() is None):
        rclpy.spin_once(node, timeout_sec=0.1)


def stop(proc: subprocess.Popen, kill: bool = False) -> str:
    """End a helper process and return the tail of its stderr."""
    proc.kill() if kill else proc.terminate()
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err.decode()[-3000:]
