"""Certification on Ray workers: the same report as a serial run (apart from timings), a
journal that an interrupted run resumes from without redoing finished images, and errors
that name the image."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from usn_offline.certify import CertifyConfig, ParallelConfig, RadiusConfig, certify_dataset
from usn_offline.certify import engine as engine_module
from usn_offline.certify.bab import Status
from usn_offline.certify.errors import CertificationError
from usn_offline.certify.journal import result_to_json
from usn_offline.data import load_split
from usn_offline.perturb import PhotometricBox
from usn_offline.train import load_checkpoint

pytest.importorskip("ray", reason="Ray is not installed (requirements.txt pins it)")

CONFIG = CertifyConfig(box=PhotometricBox(0.98, 1.02, -0.02, 0.02), delta=3.0, eps_list=(0.005, 0.01),
                       radius=RadiusConfig(eps_max=0.05, steps=2), region_grid=(2, 2))


@pytest.fixture(scope="module")
def trained(tiny_checkpoint):
    return tiny_checkpoint


def _read(path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # the process ended meanwhile
        return b""


def _results(report) -> list[dict]:
    """Everything but the timings."""
    return [{k: v for k, v in result_to_json(r).items() if k != "seconds"} for r in report.images]


def _assert_same_up_to_rounding(got: list[dict], want: list[dict]) -> None:
    """Equal statuses, counterexamples, budgets and radii; bounds equal up to the float64
    summation order of another thread count (~1e-15 px), references (float32 predictions)
    up to float32 rounding (~1e-6 px)."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for key in g:
            if key == "reference_px":
                np.testing.assert_allclose(g[key], w[key], rtol=0, atol=1e-5)
            elif key in ("lower_px", "upper_px"):
                np.testing.assert_allclose(g[key], w[key], rtol=0, atol=1e-9)
            else:
                assert g[key] == w[key], (g["index"], key)


def test_ray_workers_give_the_serial_report(trained, tiny_dataset, tmp_path):
    """Bit for bit against a serial run with one thread, as each worker computes (another
    thread count sums in another order: the bounds then differ by ~1e-15 px)."""
    import torch

    model, _ = load_checkpoint(trained)
    test = load_split(tiny_dataset, "test").subset(slice(0, 6))
    threads = torch.get_num_threads()
    serial_default = certify_dataset(model, test, CONFIG, progress=False)
    journal = tmp_path / "run.journal.jsonl"
    # The references (the model's predictions) are computed in this process, batched: with
    # one thread here too, or they may differ from the serial run's in the last float32 bit
    # (seen on a CPU where oneDNN splits the batch differently over two threads).
    torch.set_num_threads(1)
    try:
        serial = certify_dataset(model, test, CONFIG, progress=False)
        parallel = certify_dataset(model, test, CONFIG, progress=False,
                                   parallel=ParallelConfig(workers=2, journal=journal))
    finally:
        torch.set_num_threads(threads)
    assert _results(parallel) == _results(serial)
    _assert_same_up_to_rounding(_results(parallel), _results(serial_default))
    assert parallel.config == serial.config and parallel.region_edges == serial.region_edges
    lines = journal.read_text().splitlines()
    assert len(lines) == 1 + len(test) and json.loads(lines[0])["kind"] == "usn-certify-journal"
    assert sorted(json.loads(line)["result"]["index"] for line in lines[1:]) == list(range(len(test)))


def test_resume_redoes_only_the_unfinished_images(trained, tiny_dataset, tmp_path, monkeypatch):
    model, _ = load_checkpoint(trained)
    test = load_split(tiny_dataset, "test").subset(slice(0, 5))
    journal = tmp_path / "run.journal.jsonl"
    full = certify_dataset(model, test, CONFIG, progress=False, parallel=ParallelConfig(journal=journal))
    # As a kill leaves it: the header, two finished images and half a line.
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[:3]) + "\n" + lines[3][:40])
    certified = []
    original = engine_module.ImageCertifier.certify

    def counting(self, index, *args):
        certified.append(index)
        return original(self, index, *args)

    monkeypatch.setattr(engine_module.ImageCertifier, "certify", counting)
    resumed = certify_dataset(model, test, CONFIG, progress=False,
                              parallel=ParallelConfig(journal=journal, resume=True))
    done_before = {json.loads(line)["result"]["index"] for line in lines[1:3]}
    assert sorted(certified) == sorted(set(range(len(test))) - done_before)
    assert _results(resumed) == _results(full)
    assert len(journal.read_text().splitlines()) == 1 + len(test)  # the cut-off line was dropped


def test_a_journal_of_another_run_is_refused(trained, tiny_dataset, tmp_path):
    model, _ = load_checkpoint(trained)
    test = load_split(tiny_dataset, "test").subset(slice(0, 2))
    journal = tmp_path / "run.journal.jsonl"
    certify_dataset(model, test, CONFIG, progress=False, parallel=ParallelConfig(journal=journal))
    other = CertifyConfig(box=CONFIG.box, delta=2.0)
    with pytest.raises(CertificationError, match="journal of another run"):
        certify_dataset(model, test, other, progress=False, parallel=ParallelConfig(journal=journal, resume=True))
    # Without resume it starts afresh.
    certify_dataset(model, test, other, progress=False, parallel=ParallelConfig(journal=journal))
    assert len(journal.read_text().splitlines()) == 3


def _edit_entry(journal, index: int, **changes) -> None:
    lines = journal.read_text().splitlines()
    for n, line in enumerate(lines[1:], start=1):
        entry = json.loads(line)
        if entry["result"]["index"] == index:
            entry["result"].update(changes)
            lines[n] = json.dumps(entry)
    journal.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("claim", ["certified", "falsified", "image"])
def test_a_journal_entry_its_own_figures_contradict_is_refused(trained, tiny_dataset, tmp_path, claim):
    """A hand-edited or damaged journal cannot turn an image into a certified (or falsified)
    one on --resume: the claim is checked against the entry's bounds or counterexample."""
    model, _ = load_checkpoint(trained)
    test = load_split(tiny_dataset, "test").subset(slice(0, 2))
    config = CertifyConfig(box=CONFIG.box, delta=3.0)
    journal = tmp_path / "run.journal.jsonl"
    full = certify_dataset(model, test, config, progress=False, parallel=ParallelConfig(journal=journal))
    result = full.images[0]
    if claim == "certified":
        upper = [v + config.delta + 1 for v in result.reference_px]
        _edit_entry(journal, 0, status="certified", upper_px=upper)
        match = "says certified, but its bounds are not within delta"
    elif claim == "falsified":  # the identity (a, b) = (1, 0) moves nothing
        _edit_entry(journal, 0, status="falsified", counterexample=[1.0, 0.0])
        match = "says falsified, but its counterexample moves the keypoints .* px, within delta 3 px"
    else:
        _edit_entry(journal, 0, file_name="elsewhere.png")
        match = "not an image of this run"
    with pytest.raises(CertificationError, match=match):
        certify_dataset(model, test, config, progress=False, parallel=ParallelConfig(journal=journal, resume=True))
    # An entry that agrees with itself resumes: the unedited journal of the same run.
    journal.unlink()
    certify_dataset(model, test, config, progress=False, parallel=ParallelConfig(journal=journal))
    resumed = certify_dataset(model, test, config, progress=False,
                              parallel=ParallelConfig(journal=journal, resume=True))
    assert _results(resumed) == _results(full)


def test_falsified_entries_of_the_journal_resume(trained, tiny_dataset, tmp_path):
    """The re-run of a real counterexample breaks the property again (same graph, dtype)."""
    model, _ = load_checkpoint(trained)
    test = load_split(tiny_dataset, "test").subset(slice(0, 3))
    config = CertifyConfig(box=PhotometricBox(0.3, 1.7, -0.5, 0.5), delta=0.5)
    journal = tmp_path / "run.journal.jsonl"
    full = certify_dataset(model, test, config, progress=False, parallel=ParallelConfig(journal=journal))
    assert full.count(Status.FALSIFIED) == len(test)
    resumed = certify_dataset(model, test, config, progress=False,
                              parallel=ParallelConfig(journal=journal, resume=True))
    assert _results(resumed) == _results(full)


def test_a_journal_of_another_version_of_the_verifier_is_refused(trained, tiny_dataset, tmp_path, monkeypatch):
    from usn_offline.certify import journal as journal_module

    model, _ = load_checkpoint(trained)
    test = load_split(tiny_dataset, "test").subset(slice(0, 1))
    journal = tmp_path / "run.journal.jsonl"
    certify_dataset(model, test, CONFIG, progress=False, parallel=ParallelConfig(journal=journal))
    monkeypatch.setattr(journal_module, "__version__", "999")
    with pytest.raises(CertificationError, match="journal of another run"):
        certify_dataset(model, test, CONFIG, progress=False, parallel=ParallelConfig(journal=journal, resume=True))


def test_a_failing_image_is_named_and_the_others_are_kept(trained, tiny_dataset, tmp_path):
    model, _ = load_checkpoint(trained)
    test = load_split(tiny_dataset, "test").subset(slice(0, 4))
    test.images[2] = np.full_like(test.images[2], np.nan)  # a corrupt image
    for workers in (1, 2):
        journal = tmp_path / f"run{workers}.journal.jsonl"
        with pytest.raises(CertificationError, match=rf"image 2 \({test.file_names[2]}\): .*finite values"):
            certify_dataset(model, test, CertifyConfig(box=CONFIG.box), progress=False,
                            parallel=ParallelConfig(workers=workers, journal=journal))
        kept = {json.loads(line)["result"]["index"] for line in journal.read_text().splitlines()[1:]}
        assert 2 not in kept and {0, 1} <= kept <= {0, 1, 3}


def test_a_lost_worker_is_replaced_and_its_image_redone(trained, tiny_dataset, tmp_path):
    """One Ray worker process killed (as a machine lost mid-run) after the first results:
    Ray restarts it, the image it held is certified again, and the report is complete."""
    import threading
    from pathlib import Path

    import torch

    model, _ = load_checkpoint(trained)
    test = load_split(tiny_dataset, "test").subset(slice(0, 16))
    journal = tmp_path / "run.journal.jsonl"
    killed = []

    def kill_one_worker() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            if journal.exists() and len(journal.read_text().splitlines()) >= 2:
                workers = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/cmdline")
                           if b"ray::_Worker" in _read(p)]
                if workers:
                    os.kill(workers[0], signal.SIGKILL)
                    killed.append(workers[0])
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    parallel = certify_dataset(model, test, CONFIG, progress=False,
                               parallel=ParallelConfig(workers=2, journal=journal))
    killer.join(timeout=5)
    assert killed, "no worker was killed: the run ended first"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = certify_dataset(model, test, CONFIG, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert _results(parallel) == _results(serial)


def test_cli_resumes_a_killed_parallel_run(trained, tiny_dataset, tmp_path):
    """`certify --workers 2` killed (SIGKILL, as a lost machine) after its first results;
    `--resume` finishes it, and the certificate equals a serial run's."""
    args = ["certify", "--checkpoint", str(trained), "--data", str(tiny_dataset), "--num-images", "24",
            "--contrast", "0.98", "1.02", "--brightness", "-0.02", "0.02", "--delta", "3",
            "--eps", "0.005", "0.01", "--radius-search", "--eps-max", "0.05", "--quiet"]
    out = tmp_path / "cert.json"
    journal = out.with_suffix(".journal.jsonl")
    proc = subprocess.Popen([sys.executable, "-m", "usn_offline.cli", *args, "--workers", "2", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and len(journal.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    finished_at_kill = len(journal.read_text().splitlines()) - 1 if journal.exists() else 0
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray workers
    proc.communicate()
    assert 1 <= finished_at_kill < 24, finished_at_kill
    assert not out.exists()
    resumed = subprocess.run([sys.executable, "-m", "usn_offline.cli", *args, "--workers", "2", "--resume",
                              "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    serial = tmp_path / "serial.json"
    done = subprocess.run([sys.executable, "-m", "usn_offline.cli", *args, "--out", str(serial)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    def images(path):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in json.loads(path.read_text())["images"]]

    _assert_same_up_to_rounding(images(out), images(serial))
