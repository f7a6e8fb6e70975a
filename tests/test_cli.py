"""The usn-offline CLI: help, one-line errors with exit code != 0, and a tiny end-to-end run
through the installed console script (as a user runs it, ROS wheel start-up hook included)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from usn_offline.cli import main

REPO = Path(__file__).resolve().parents[1]


def _console_script() -> str:
    found = shutil.which("usn-offline", path=str(Path(sys.executable).parent))
    assert found, "usn-offline console script is not installed in this environment"
    return found


@pytest.mark.parametrize("command", ["data", "train", "evaluate"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: usn-offline " + command in capsys.readouterr().out


def _error_line(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1, err
    return err


def test_missing_dataset_folder(capsys, tmp_path):
    err = _error_line(capsys, ["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "m.pt")])
    assert err == f"usn-offline: error: dataset folder not found: {tmp_path / 'none'}"


def test_missing_checkpoint(capsys, tiny_dataset, tmp_path):
    err = _error_line(capsys, ["evaluate", "--checkpoint", str(tmp_path / "m.pt"), "--data", str(tiny_dataset)])
    assert err == f"usn-offline: error: checkpoint not found: {tmp_path / 'm.pt'}"


def test_unknown_split(capsys, tiny_dataset, tmp_path):
    from usn_offline.models import build_model, model_config_for
    from usn_offline.runtime.preprocess import PreprocessConfig
    from usn_offline.train.checkpoint import CheckpointInfo, save_checkpoint

    config = model_config_for("cnn7", widths=(4, 4, 4, 4, 4), hidden=8)
    save_checkpoint(tmp_path / "m.pt", build_model(config),
                    CheckpointInfo(config, PreprocessConfig(64, 64), ("a", "b", "c", "d")))
    err = _error_line(capsys, ["evaluate", "--checkpoint", str(tmp_path / "m.pt"), "--data",
                               str(tiny_dataset), "--split", "holdout"])
    assert "annotation file not found" in err and "holdout.json" in err


@pytest.mark.parametrize("argv,fragment", [
    (["data", "--out", "x", "--num-train", "0"], "expected a positive integer, got 0"),
    (["train", "--data", "d", "--out", "m.pt", "--lr", "abc"], "expected a number, got 'abc'"),
    (["train", "--data", "d", "--out", "m.pt", "--model", "vgg"], "invalid choice: 'vgg'"),
    (["evaluate", "--data", "d"], "the following arguments are required: --checkpoint"),
    (["train", "--data", "d", "--out", "m.pt", "--lr", "inf"], "expected a finite number, got inf"),
    (["train", "--data", "d", "--out", "m.pt", "--bound-weight", "-1"], "expected a number >= 0, got -1.0"),
    (["evaluate", "--checkpoint", "m.pt", "--data", "d", "--pck", "inf"], "expected a finite number, got inf"),
    (["prune", "--checkpoint", "m.pt", "--data", "d", "--out", "p.pt", "--wd-weight", "nan"],
     "expected a finite number, got nan"),
    (["prune", "--checkpoint", "m.pt", "--data", "d", "--out", "p.pt", "--wd-weight", "-1"],
     "expected a number >= 0, got -1.0"),
    (["certify", "--checkpoint", "m.pt", "--data", "d", "--out", "c.json", "--delta", "nan"],
     "expected a finite number, got nan"),
])
def test_bad_arguments_exit_2(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert fragment in capsys.readouterr().err


def test_end_to_end_through_the_console_script(tmp_path):
    """data -> train -> evaluate as separate processes, without the ROS bootstrap guard set
    (the wheels' .pth hook re-executes the interpreter; the CLI must survive it)."""
    env = {k: v for k, v in os.environ.items() if k != "_ROS_WHEELS_BOOTSTRAP_COMPLETE"}
    exe = _console_script()
    data, model, report = tmp_path / "data", tmp_path / "m.pt", tmp_path / "eval.json"

    def run(*args):
        proc = subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    run("data", "--out", str(data), "--num-train", "64", "--num-val", "16", "--num-test", "16", "--quiet")
    out = run("train", "--data", str(data), "--out", str(model), "--epochs", "1", "--widths", "4", "4", "4",
              "4", "4", "--hidden", "8", "--quiet")
    assert "checkpoint written to" in out
    out = run("evaluate", "--checkpoint", str(model), "--data", str(data), "--out", str(report))
    assert "PCK@5px" in out
    result = json.loads(report.read_text())
    for key in ("mean_px_error", "pck@2px", "pck@5px", "num_images"):
        assert key in result
    assert result["num_images"] == 16
    assert 0.0 <= result["pck@5px"] <= 1.0


def test_bad_file_via_console_script_is_one_line(tmp_path):
    proc = subprocess.run([_console_script(), "evaluate", "--checkpoint", str(tmp_path / "x.pt"),
                           "--data", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"usn-offline: error: checkpoint not found: {tmp_path / 'x.pt'}"]
