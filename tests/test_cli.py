"""The usn-offline CLI: help, one-line errors with exit code != 0, and a tiny end-to-end run
through the installed console script (as a user runs it, ROS wheel start-up hook included)."""

import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from usn_offline.cli import build_parser, main

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
    (["train", "--data", "d", "--out", "m.pt", "--bound-frame-sets", "1.5"], "expected a number in [0, 1], got 1.5"),
    (["evaluate", "--checkpoint", "m.pt", "--data", "d", "--pck", "inf"], "expected a finite number, got inf"),
    (["prune", "--checkpoint", "m.pt", "--data", "d", "--out", "p.pt", "--wd-weight", "nan"],
     "expected a finite number, got nan"),
    (["prune", "--checkpoint", "m.pt", "--data", "d", "--out", "p.pt", "--wd-weight", "-1"],
     "expected a number >= 0, got -1.0"),
    (["certify", "--checkpoint", "m.pt", "--data", "d", "--out", "c.json", "--delta", "nan"],
     "expected a finite number, got nan"),
    # Beyond these a run fails deep inside or allocates without end.
    (["data", "--out", "x", "--seed", "-1"], "expected a seed in [0, 4294967295], got -1"),
    (["train", "--data", "d", "--out", "m.pt", "--seed", "4294967296"], "expected a seed in [0, 4294967295]"),
    (["data", "--out", "x", "--image-size", "1000000"], "expected an integer in [16, 4096], got 1000000"),
    (["train", "--data", "d", "--out", "m.pt", "--input-size", "100000"], "expected an integer in [8, 1024]"),
    (["data", "--out", "x", "--max-rotation", "1e308"], "expected a number in [0, 180], got 1e+308"),
    (["train", "--data", "d", "--out", "m.pt", "--augment-rotation", "-5"], "expected a number in [0, 180]"),
    (["make-bag", "--data", "d", "--out", "b", "--width", "100000"], "expected an integer in [16, 7680]"),
    (["make-bag", "--data", "d", "--out", "b", "--fps", "1e-300"], "expected a number in [0.1, 1000], got 1e-300"),
    (["certify", "--checkpoint", "m.pt", "--data", "d", "--out", "c.json", "--bab-depth", "-1"],
     "expected an integer in [0, 2147483647], got -1"),
    (["certify", "--checkpoint", "m.pt", "--data", "d", "--out", "c.json", "--brightness", "-inf", "0"],
     "expected a finite number, got -inf"),
])
def test_bad_arguments_exit_2(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert fragment in capsys.readouterr().err


def test_negative_numbers_in_e_notation_are_values_not_options():
    args = build_parser().parse_args(["certify", "--checkpoint", "m.pt", "--data", "d", "--out", "c.json",
                                      "--brightness", "-3e-2", "3E-2", "--contrast", "0.9", "1.1"])
    assert args.brightness == [-0.03, 0.03]


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


def _cli_defaults() -> list[tuple[str, list[str], str, object]]:
    """(label, argv, dest, the library's default) for every CLI default that repeats a
    config's. The configs are the one place the defaults are decided; the parser repeats
    them because it must not import torch (``usn-offline verify`` runs on a robot)."""
    from usn_offline.certify import BabConfig, CertifyConfig, RadiusConfig
    from usn_offline.certify.bounds import BoundOptions
    from usn_offline.data import GeneratorConfig, RenderConfig, load_split
    from usn_offline.data.coco import default_input_side
    from usn_offline.experiments.compare import CompareConfig
    from usn_offline.export import ExportConfig
    from usn_offline.models.config import ModelConfig
    from usn_offline.perturb import PhotometricBox
    from usn_offline.prune import PruneConfig
    from usn_offline.prune.gates import GateConfig
    from usn_offline.replay.bag_writer import BagConfig
    from usn_offline.replay.live import LiveConfig
    from usn_offline.train import TrainConfig
    from usn_offline.train.bound_loss import BoundLossConfig

    data = ["data", "--out", "d"]
    train = ["train", "--data", "d", "--out", "m.pt"]
    evaluate = ["evaluate", "--checkpoint", "m.pt", "--data", "d"]
    certify = ["certify", "--checkpoint", "m.pt", "--data", "d", "--out", "c.json"]
    prune = ["prune", "--checkpoint", "m.pt", "--data", "d", "--out", "p.pt"]
    compare = ["compare", "--checkpoint", "m.pt", "--data", "d", "--out", "o"]
    export = ["export", "--checkpoint", "m.pt", "--certificate", "c.json", "--out", "b"]
    bag = ["make-bag", "--data", "d", "--out", "bag"]
    replay = ["replay", "--bag", "bag", "--bundle", "b", "--out", "r"]
    gen, render, tr, model = GeneratorConfig(), RenderConfig(), TrainConfig(), ModelConfig()
    bab, radius, bounds = BabConfig(), RadiusConfig(), BoundOptions()
    cert = CertifyConfig(box=PhotometricBox.symmetric(0.1, 0.1))
    pr, gates, cmp_, exp, bag_cfg, live = (PruneConfig(), GateConfig(), CompareConfig(), ExportConfig(),
                                           BagConfig(), LiveConfig())
    bound = BoundLossConfig()
    visibility = inspect.signature(load_split).parameters["min_visibility"].default
    assert default_input_side.__defaults__[-1] == model.input_height  # the fallback input side
    bound_loss = [(label, argv, dest, getattr(bound, field)) for label, argv in (("train", train), ("prune", prune))
                  for dest, field in (("bound_weight", "weight"), ("bound_eps", "eps"), ("bound_box", "box"),
                                      ("bound_tiles", "tiles"), ("bound_frame_sets", "frame_sets"),
                                      ("bound_frame_tiles", "frame_tiles"))]
    return bound_loss + [("train", train, "bound_ramp_epochs", bound.ramp_epochs),
        ("data", data, "num_train", gen.num_train), ("data", data, "num_val", gen.num_val),
        ("data", data, "num_test", gen.num_test), ("data", data, "seed", gen.seed),
        ("data", data, "image_size", render.image_size), ("data", data, "target", render.target),
        ("train", train, "epochs", tr.epochs), ("train", train, "batch_size", tr.batch_size),
        # None: what the dataset declares (tests/test_augmentation.py), else TrainConfig's identity
        ("train", train, "augment_rotation", None), ("train", train, "augment_scale", None),
        ("train", train, "augment_flip", None),
        ("train", train, "lr", tr.lr), ("train", train, "seed", tr.seed), ("train", train, "device", tr.device),
        ("train", train, "model", model.family),
        ("train", train, "input_size", None),  # None: chosen from the data (test_coco.py)
        ("train", train, "min_visibility", visibility), ("evaluate", evaluate, "min_visibility", visibility),
        ("train", train, "input_norm", model.input_norm),
        ("certify", certify, "delta", cert.delta), ("certify", certify, "norm", cert.norm.value),
        ("certify", certify, "reference", cert.reference.value), ("certify", certify, "coverage", cert.coverage),
        ("certify", certify, "dtype", cert.dtype), ("certify", certify, "method", bab.method.value),
        ("certify", certify, "bab_budget", bab.max_boxes), ("certify", certify, "bab_depth", bab.max_depth),
        ("certify", certify, "intermediate", bounds.intermediate),
        ("certify", certify, "crown_max_unstable", bounds.crown_max_unstable),
        ("certify", certify, "backend", bounds.backend), ("certify", certify, "eps_max", radius.eps_max),
        ("certify", certify, "radius_steps", radius.steps), ("certify", certify, "eps_start", radius.eps_start),
        ("certify", certify, "contrast_scale", radius.contrast_scale),
        ("certify", certify, "brightness_scale", radius.brightness_scale),
        ("certify", certify, "radius_strategy", radius.strategy),
        ("prune", prune, "method", pr.method), ("prune", prune, "ratio", pr.ratio),
        ("prune", prune, "rounds", pr.rounds), ("prune", prune, "finetune_epochs", pr.finetune_epochs),
        ("prune", prune, "lr", pr.lr), ("prune", prune, "score_images", pr.score_images),
        ("prune", prune, "min_keep", pr.min_keep), ("prune", prune, "seed", pr.seed),
        ("prune", prune, "contrast", [pr.box.a_lo, pr.box.a_hi]),
        ("prune", prune, "brightness", [pr.box.b_lo, pr.box.b_hi]),
        ("prune", prune, "wd_weight", gates.weight), ("prune", prune, "wd_epochs", gates.epochs),
        ("compare", compare, "methods", list(cmp_.methods)), ("compare", compare, "ratios", list(cmp_.ratios)),
        ("compare", compare, "eps", list(cmp_.eps_list)), ("compare", compare, "delta", cmp_.delta),
        ("compare", compare, "num_images", cmp_.num_images), ("compare", compare, "bab_budget", bab.max_boxes),
        ("export", export, "gap_tolerance", exp.gap_tolerance_px),
        ("export", export, "workspace_mb", exp.workspace_mb),
        ("make-bag", bag, "scenario", list(bag_cfg.scenarios)),
        ("make-bag", bag, "frames", bag_cfg.frames_per_scenario), ("make-bag", bag, "width", bag_cfg.width),
        ("make-bag", bag, "height", bag_cfg.height), ("make-bag", bag, "encoding", bag_cfg.encoding),
        ("make-bag", bag, "storage", bag_cfg.storage), ("make-bag", bag, "fps", bag_cfg.fps),
        ("make-bag", bag, "seed", bag_cfg.seed), ("make-bag", bag, "image_topic", bag_cfg.image_topic),
        ("replay", replay, "frame_timeout", live.timeout_s), ("replay", replay, "live_rate", live.rate),
    ]


def test_cli_defaults_equal_the_library_configs():
    """One place for each default: a CLI default that drifts from its config fails here."""
    from usn_offline.cli import build_parser

    parser = build_parser()
    drift = []
    for label, argv, dest, expected in _cli_defaults():
        value = getattr(parser.parse_args(argv), dest)
        if value != expected:
            drift.append(f"{label} --{dest.replace('_', '-')}: CLI {value!r} != config {expected!r}")
    assert not drift, "\n".join(drift)


def test_an_out_path_that_is_a_folder_or_under_a_file_is_one_line(capsys, tmp_path):
    """OSErrors of the user's paths (a folder where a file goes, a path under a file) end
    in one line naming the path, not a traceback."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    code = main(["keygen", "--out", str(a_file / "release")])
    err = capsys.readouterr().err
    assert code == 2 and str(a_file) in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("command", ["train", "prune", "certify", "evaluate"])
def test_an_unwritable_out_is_refused_before_any_work(capsys, tmp_path, command):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [(tmp_path, "is a folder"), (a_file / "m.pt", "which is a file")]
    if command in ("train", "prune"):
        cases.append((tmp_path / "model.json", "a checkpoint's config is written beside it"))
    for out, message in cases:
        # the inputs do not exist: the output is checked first
        code = main([command, "--checkpoint", str(tmp_path / "none.pt"), "--data", str(tmp_path / "none"),
                     "--out", str(out)] if command != "train" else
                    [command, "--data", str(tmp_path / "none"), "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (out, err)
    assert a_file.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
