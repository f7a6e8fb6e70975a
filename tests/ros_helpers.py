"""Helpers for the tests that talk to other processes over DDS."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path


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


def log_until(args: list[str], path: Path, wait_for: str, timeout: float = 120) -> str:
    """Start a process (a node), wait until its log (stderr, kept at ``path``) shows
    ``wait_for``, ``timeout`` seconds pass or it exits, stop it: its log."""
    with open(path, "wb") as err:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None and wait_for not in path.read_text():
            time.sleep(0.2)
        proc.terminate()
        proc.wait(timeout=30)
    return path.read_text()
