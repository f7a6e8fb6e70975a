"""``usn-offline``: thin command-line wrappers over the library functions.

Every user error ends as one line ``usn-offline: error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from usn_offline import __version__
from usn_offline.errors import CheckpointError, ConfigError, UsnError
from usn_offline.replay.scenarios import CAMERA, DEFAULT_SCENARIOS, EXTRAS, LIGHTING
from usn_offline.resources import keep_freed_memory

if TYPE_CHECKING:  # the CLI imports each command's libraries when it runs
    from usn_offline.data.augmentation import GeometricAugmentation
    from usn_offline.train import TrainConfig

SCENARIO_RECIPES = (*LIGHTING, *CAMERA, *EXTRAS)

log = logging.getLogger("usn_offline")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _nonnegative_float(text: str) -> float:
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _int_in(lo: int, hi: int, what: str = "an integer"):
    """An argparse type: an integer in [lo, hi] (what beyond it would fail deep inside, or
    allocate without end: a 10^5-pixel side, a negative seed)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected {what} in [{lo}, {hi}], got {value}")
        return value
    return parse


def _float_in(lo: float, hi: float):
    """An argparse type: a number in [lo, hi]."""
    def parse(text: str) -> float:
        value = _finite_float(text)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected a number in [{lo:g}, {hi:g}], got {value:g}")
        return value
    return parse


_seed = _int_in(0, 2**32 - 1, "a seed")  # what numpy's and torch's generators take
_nonnegative_int = _int_in(0, 2**31 - 1)
_rotation = _float_in(0.0, 180.0)  # +- degrees


def _fraction(text: str) -> float:
    value = _finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def _cmd_data(args: argparse.Namespace) -> None:
    from usn_offline.data import GeneratorConfig, RenderConfig, generate_dataset
    from usn_offline.data.target import TARGETS

    rotation = args.max_rotation if args.max_rotation is not None else TARGETS[args.target].max_rotation_deg
    config = GeneratorConfig(num_train=args.num_train, num_val=args.num_val, num_test=args.num_test,
                             seed=args.seed, render=RenderConfig(image_size=args.image_size, target=args.target,
                                                                 max_rotation_deg=rotation))
    paths = generate_dataset(args.out, config, progress=not args.quiet)
    counts = config.split_sizes()
    for split, path in paths.items():
        print(f"{split:>5}: {counts[split]:6d} images  {path}")
    print(f"dataset written to {args.out}")


def _check_output_file(path: Path | str | None, checkpoint: bool = False) -> None:
    """Refuse, before any work, an output file path that cannot be written: an existing
    folder, a path under a file, or (``checkpoint``) a name ending in .json, which the
    network's config beside it (<name>.json) would overwrite."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir() or path.name in ("", ".", ".."):
        raise ConfigError(f"--out {path} is a folder: give a file name")
    above = next((parent for parent in path.parents if parent.exists()), None)
    if above is not None and not above.is_dir():
        raise ConfigError(f"--out {path} lies under {above}, which is a file")
    if checkpoint and path.suffix == ".json":
        raise ConfigError(f"--out {path}: a checkpoint's config is written beside it as {path.stem}.json; "
                          "name the checkpoint e.g. model.pt")


def _cmd_train(args: argparse.Namespace) -> None:
    _check_output_file(args.out, checkpoint=True)
    from usn_offline.data import load_split
    from usn_offline.data.coco import default_input_side
    from usn_offline.models import build_model, count_parameters, model_config_for
    from usn_offline.perturb import PhotometricBox
    from usn_offline.runtime.preprocess import PreprocessConfig
    from usn_offline.train import TrainConfig, train_model
    from usn_offline.train.bound_loss import BoundLossConfig
    from usn_offline.train.checkpoint import load_checkpoint_info

    # A fine-tune (--init) keeps its starting checkpoint's architecture and input size
    # (train_model loads and checks its weights).
    init = load_checkpoint_info(args.init) if args.init is not None else None
    side = args.input_size or (init.model.input_height if init is not None else None)
    if side is None:
        side, why = default_input_side(args.data)
        print(f"input size {side}x{side} ({why}; --input-size to choose another)")
    pre = PreprocessConfig(side, side)
    train_set = load_split(args.data, "train", pre, min_visibility=args.min_visibility)
    val_set = load_split(args.data, "val", pre, expected_keypoints=train_set.num_keypoints,
                         min_visibility=args.min_visibility)
    overrides = {"num_keypoints": train_set.num_keypoints, "input_height": side, "input_width": side}
    if args.widths:
        overrides["widths"] = tuple(args.widths)
    if args.hidden:
        overrides["hidden"] = args.hidden
    overrides["input_norm"] = args.input_norm
    model_config = init.model if init is not None else model_config_for(args.model, **overrides)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         device=args.device,
                         bound=BoundLossConfig(weight=args.bound_weight, eps=args.bound_eps,
                                               ramp_epochs=args.bound_ramp_epochs,
                                               box=PhotometricBox(*args.bound_box) if args.bound_box else None,
                                               tiles=args.bound_tiles, frame_sets=args.bound_frame_sets,
                                               frame_tiles=args.bound_frame_tiles)
                         ).with_geometric(_geometric_augmentation(args, train_set.augmentation))
    print(f"model {model_config.family}: {count_parameters(build_model(model_config)):,} parameters; "
          f"{len(train_set)} train / {len(val_set)} val images")
    result = train_model(train_set, val_set, model_config, config, args.out, resume=args.resume,
                         progress=not args.quiet, init=args.init)
    if result.epochs_run == 0:
        print(f"{args.out} is up to date: all {args.epochs} epoch(s) were already trained (--resume)")
    else:
        print(f"trained {result.epochs_run} epoch(s) in {result.seconds:.1f} s: final loss "
              f"{result.final_train_loss:.5f}, val mean pixel error {result.val_mean_px_error:.3f} px")
        print(f"checkpoint written to {result.checkpoint}")


def _geometric_augmentation(args: argparse.Namespace, declared: GeometricAugmentation) -> GeometricAugmentation:
    """Geometric augmentation of a training run: the dataset's ``declared`` one (its
    category's ``augmentation``), each part replaced by the option given on the command line."""
    from usn_offline.data.augmentation import GeometricAugmentation

    chosen = GeometricAugmentation(
        declared.rotation_deg if args.augment_rotation is None else args.augment_rotation,
        declared.scale if args.augment_scale is None else tuple(args.augment_scale),
        None if args.augment_flip is False else declared.flip_pairs)
    if args.augment_flip and chosen.flip_pairs is None:
        raise ConfigError("--augment-flip needs the dataset to declare which keypoints a mirror image exchanges "
                          "(category 'augmentation': {'flip_pairs': [...]}, docs/TRAINING.md)")
    given = [a for a, v in (("--augment-rotation", args.augment_rotation), ("--augment-scale", args.augment_scale),
                            ("--augment-flip", args.augment_flip)) if v is not None]
    source = "the dataset's declaration" + (f", {', '.join(given)} from the command line" if given else "")
    print(f"geometric augmentation: {chosen.describe()} ({source})")
    return chosen


def _cmd_evaluate(args: argparse.Namespace) -> None:
    _check_output_file(args.out)
    from usn_offline.data import load_split
    from usn_offline.train import evaluate_model, evaluation_table, load_checkpoint
    from usn_offline.train.device import resolve_device

    device = resolve_device(args.device)
    model, info = load_checkpoint(args.checkpoint, device)
    dataset = load_split(args.data, args.split, info.preprocess, expected_keypoints=info.model.num_keypoints,
                         min_visibility=args.min_visibility)
    result = evaluate_model(model, dataset, device, tuple(args.pck))
    print(evaluation_table(result, dataset.image_hw))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**result.to_dict(), "checkpoint": str(args.checkpoint)}, indent=2))
        print(f"evaluation written to {out}")


def _visibility_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-visibility", type=int, choices=[1, 2], default=2,
                   help="COCO visibility flag a keypoint needs for its image to be used: 2 = labelled and "
                   "visible (default), 1 = also labelled but occluded")


def _bound_loss_arguments(p: argparse.ArgumentParser, where: str) -> None:
    """The bound-based loss options of ``train`` and of pruning's fine-tuning rounds.
    Defaults equal BoundLossConfig's (tests/test_cli.py checks every default against its
    config; the parser must not import torch)."""
    p.add_argument("--bound-weight", type=_nonnegative_float, default=0.0,
                   help=f"weight of the bound-based loss in {where} (certifiable training; 0: off)")
    p.add_argument("--bound-eps", type=_positive_float, default=0.05,
                   help="half-width of the (contrast, brightness) box the bound loss flattens")
    p.add_argument("--bound-box", type=float, nargs=4, metavar=("A_LO", "A_HI", "B_LO", "B_HI"),
                   help="the (contrast, brightness) box the bound loss flattens, instead of +-bound-eps")
    p.add_argument("--bound-tiles", type=_positive_int, default=1,
                   help="n > 1: each image's bound is over a random tile of the box's n x n grid (what branch "
                   "and bound certifies)")
    p.add_argument("--bound-frame-sets", type=_fraction, default=0.0,
                   help="share of those images whose bound is over the pixel set of the image relit by a random "
                   "change of the box (what the node's per-frame proof bounds; clipped pixels free one by one)")
    p.add_argument("--bound-frame-tiles", type=_positive_int, default=4,
                   help="n: each frame pixel set is over a random tile of the n x n grid of the lighting range "
                   "it can come from")


def _prune_config(args: argparse.Namespace, method: str, ratio: float):
    from usn_offline.perturb import PhotometricBox
    from usn_offline.prune import PruneConfig
    from usn_offline.prune.gates import GateConfig
    from usn_offline.train.bound_loss import BoundLossConfig

    box = PhotometricBox(args.contrast[0], args.contrast[1], args.brightness[0], args.brightness[1])
    return PruneConfig(method=method, ratio=ratio, rounds=args.rounds, finetune_epochs=args.finetune_epochs,
                       lr=args.lr, box=box, score_images=args.score_images, allocation=args.allocation,
                       min_keep=args.min_keep, gates=GateConfig(weight=args.wd_weight, epochs=args.wd_epochs),
                       seed=args.seed,
                       bound=BoundLossConfig(weight=args.bound_weight, eps=args.bound_eps, ramp_epochs=0,
                                             box=PhotometricBox(*args.bound_box) if args.bound_box else None,
                                             tiles=args.bound_tiles, frame_sets=args.bound_frame_sets,
                                             frame_tiles=args.bound_frame_tiles))


def _load_for_pruning(args: argparse.Namespace):
    from usn_offline.data import load_split
    from usn_offline.train import load_checkpoint
    from usn_offline.train.device import resolve_device, use_all_cpu_cores

    use_all_cpu_cores()
    device = resolve_device(args.device)
    model, info = load_checkpoint(args.checkpoint, device)
    k = info.model.num_keypoints
    train_set = load_split(args.data, "train", info.preprocess, expected_keypoints=k)
    val_set = load_split(args.data, "val", info.preprocess, expected_keypoints=k)
    return model, info, train_set, val_set, device


def _cmd_prune(args: argparse.Namespace) -> None:
    _check_output_file(args.out, checkpoint=True)
    from dataclasses import replace

    from usn_offline.prune import prune_model, rounds_table
    from usn_offline.prune.pipeline import is_current
    from usn_offline.runtime.hashing import sha256_file
    from usn_offline.train import save_checkpoint

    config = _prune_config(args, args.method, args.ratio)
    if not args.checkpoint.is_file():
        raise CheckpointError(f"checkpoint not found: {args.checkpoint}")
    source = sha256_file(args.checkpoint)
    if args.resume and is_current(args.out, source, str(args.data), config):
        print(f"{args.out} is up to date (pruned from this checkpoint and data with these settings)")
        return
    model, info, train_set, val_set, device = _load_for_pruning(args)
    result = prune_model(model, train_set, val_set, config, device=device, progress=not args.quiet,
                         train_config=_finetune_augmentation(train_set.augmentation))
    print(rounds_table(result))
    info = replace(info, model=result.model.config,
                   training={**info.training, "pruning": result.to_dict(source, str(args.data))})
    save_checkpoint(args.out, result.model, info)
    print(f"pruned checkpoint written to {args.out}")


def _finetune_augmentation(declared: GeometricAugmentation) -> TrainConfig:
    """Pruning's fine-tuning: the training defaults with the geometric augmentation the
    dataset declares (none for the landing pad, so its pruning is what it was)."""
    from usn_offline.train import TrainConfig

    print(f"fine-tuning with geometric augmentation: {declared.describe()} (the dataset's declaration)")
    return TrainConfig().with_geometric(declared)


def _cmd_compare(args: argparse.Namespace) -> None:
    from usn_offline.certify import BabConfig
    from usn_offline.data import load_split
    from usn_offline.experiments.compare import CompareConfig, results_markdown, run_comparison

    model, info, train_set, val_set, device = _load_for_pruning(args)
    test_set = load_split(args.data, "test", info.preprocess, expected_keypoints=info.model.num_keypoints)
    config = CompareConfig(methods=tuple(args.methods), ratios=tuple(args.ratios),
                           prune=_prune_config(args, "usn-wd", args.ratios[0]), eps_list=tuple(args.eps),
                           delta=args.delta, num_images=args.num_images, bab=BabConfig(max_boxes=args.bab_budget),
                           parallel=_parallel_config(args))
    rows = run_comparison(model, info, train_set, val_set, test_set, config, args.out, device=device,
                          progress=not args.quiet)
    print(results_markdown(rows, config))
    print(f"comparison written to {args.out}/ (results.md, results.json, comparison.png)")


def _parallel_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=_positive_int, default=1,
                   help="certify images on this many Ray workers, one core each (1: here, one after the other; "
                   "with --ray-address: the cluster's CPUs)")
    p.add_argument("--ray-address", help="join this Ray cluster (e.g. ray://head:10001 or auto) instead of "
                   "starting a local Ray instance")


def _parallel_config(args: argparse.Namespace, journal: Path | None = None, resume: bool = False):
    from usn_offline.certify import ParallelConfig

    return ParallelConfig(workers=args.workers, ray_address=args.ray_address, journal=journal, resume=resume)


def _grid(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        na, nb = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a grid like 21x21, got '{text}'") from None
    if na < 1 or nb < 1:
        raise argparse.ArgumentTypeError(f"grid sides must be >= 1, got '{text}'")
    return na, nb


def _cmd_certify(args: argparse.Namespace) -> None:
    _check_output_file(args.out)
    from usn_offline.certify import BabConfig, CertifyConfig, RadiusConfig, certify_dataset
    from usn_offline.certify.bounds import BoundOptions
    from usn_offline.certify.report import report_to_dict, summary_table, write_report
    from usn_offline.data import load_split
    from usn_offline.perturb import PhotometricBox
    from usn_offline.train import load_checkpoint
    from usn_offline.train.device import resolve_device

    box = PhotometricBox(args.contrast[0], args.contrast[1], args.brightness[0], args.brightness[1])
    bounds = BoundOptions(intermediate=args.intermediate, crown_max_unstable=args.crown_max_unstable,
                          backend=args.backend)
    bab = BabConfig(method=args.method, max_boxes=args.bab_budget, max_depth=args.bab_depth, bounds=bounds)
    radius = None
    if args.radius_search:
        radius = RadiusConfig(eps_max=args.eps_max, steps=args.radius_steps, eps_start=args.eps_start,
                              contrast_scale=args.contrast_scale, brightness_scale=args.brightness_scale,
                              strategy=args.radius_strategy, max_boxes=args.radius_budget or 0)
    config = CertifyConfig(box=box, delta=args.delta, norm=args.norm, reference=args.reference,
                           clip=not args.no_clip, bab=bab, radius=radius, eps_list=tuple(args.eps or ()),
                           region_grid=args.region_grid, coverage=args.coverage, dtype=args.dtype)
    device = resolve_device(args.device)
    model, info = load_checkpoint(args.checkpoint, device)
    dataset = load_split(args.data, args.split, info.preprocess, expected_keypoints=info.model.num_keypoints)
    if args.num_images:
        dataset = dataset.subset(slice(0, args.num_images))
    journal = args.journal or args.out.with_suffix(".journal.jsonl")
    report = certify_dataset(model, dataset, config, device=device, progress=not args.quiet,
                             parallel=_parallel_config(args, journal, args.resume))
    print(summary_table(report))
    path = write_report(args.out, report_to_dict(report, args.checkpoint, args.data, args.split))
    print(f"certificate written to {path}")


def _cmd_export(args: argparse.Namespace) -> None:
    from usn_offline.certify.report import load_report
    from usn_offline.data import load_split
    from usn_offline.export import ExportConfig, bundle_summary, write_bundle
    from usn_offline.tables import format_table
    from usn_offline.train import load_checkpoint

    report = load_report(args.certificate)
    model, info = load_checkpoint(args.checkpoint)
    data_root = args.data or Path(report.data_root)
    k = info.model.num_keypoints
    gap_data = load_split(data_root, report.data_split, info.preprocess, expected_keypoints=k)
    nominal = load_split(data_root, args.nominal_split, info.preprocess, expected_keypoints=k)
    config = ExportConfig(gap_tolerance_px=args.gap_tolerance, build_engine=not args.no_engine,
                          fp16=args.fp16, workspace_mb=args.workspace_mb, sign_key=args.sign_key)
    bundle = write_bundle(args.out, model, info, args.checkpoint, report, gap_data,
                          nominal.subset(slice(0, 2000)), config)
    print(format_table(bundle_summary(bundle), title=f"bundle {bundle.root}"))


def _cmd_keygen(args: argparse.Namespace) -> None:
    from usn_offline.runtime.signing import generate_key, key_id, load_public_key

    private, public = generate_key(args.out)
    print(f"private key: {private} (keep it secret; mode 0600)\npublic key:  {public} "
          f"(id {key_id(load_public_key(public))[:16]}...; give it to the robots' trusted_keys)")


def _cmd_sign(args: argparse.Namespace) -> None:
    from usn_offline.runtime.bundle import Bundle
    from usn_offline.runtime.signing import sign_manifest

    bundle = Bundle.load(args.bundle)  # only an intact bundle gets signed
    print(f"signed {bundle.root}/manifest.json with key {sign_manifest(bundle.root, args.key)[:16]}...")


def _cmd_verify(args: argparse.Namespace) -> None:
    from usn_offline.runtime.bundle import Bundle
    from usn_offline.runtime.signing import SIGNATURE, read_signature, verify_manifest

    bundle = Bundle.load(args.bundle)
    print(f"{bundle.root}: files, hashes and certificate OK (model {bundle.model_sha256[:12]}...)")
    if args.trusted_key:
        print(f"signature OK: signed by trusted key {verify_manifest(bundle.root, args.trusted_key)[:16]}...")
    else:
        if (bundle.root / SIGNATURE).is_file():  # a malformed signature file is an error even unchecked
            signer = f"signed with key {read_signature(bundle.root)[0][:16]}..."
        else:
            signer = "unsigned"
        print(f"signature not checked ({signer}; pass --trusted-key to check it)")


def _cmd_build_engine(args: argparse.Namespace) -> None:
    from usn_offline.export.engine_update import add_engine_to_bundle
    from usn_offline.runtime.bundle import Bundle

    bundle = add_engine_to_bundle(Bundle.load(args.bundle), fp16=args.fp16, workspace_mb=args.workspace_mb)
    print(f"engine written to {bundle.engine_path}")


def _default_params_file() -> Path:
    """The node's shipped parameters file."""
    from usn_offline.runtime.shipped import PARAMS_FILE, shipped_launch_file

    path = shipped_launch_file(PARAMS_FILE)
    if path is None:
        raise ConfigError(f"cannot find the shipped {PARAMS_FILE}: pass --params")
    return path


def _cmd_make_bag(args: argparse.Namespace) -> None:
    from usn_offline.data import load_split
    from usn_offline.data.backgrounds import load_backgrounds
    from usn_offline.data.coco import stored_image_size
    from usn_offline.replay.bag_writer import BagConfig, make_bag
    from usn_offline.runtime.preprocess import PreprocessConfig

    config = BagConfig(scenarios=tuple(args.scenario), frames_per_scenario=args.frames, width=args.width,
                       height=args.height, encoding=args.encoding, compressed=args.compressed, storage=args.storage,
                       fps=args.fps, seed=args.seed, image_topic=args.image_topic)
    size = stored_image_size(args.data, args.split)  # the targets keep their own resolution
    targets = load_split(args.data, args.split, PreprocessConfig(*size) if size else PreprocessConfig())
    summary = make_bag(args.out, targets.images, targets.keypoints, load_backgrounds(), config,
                       progress=not args.quiet)
    print(f"{summary.frames} frames ({summary.malformed} malformed on purpose) of "
          f"{', '.join(f'{k} ({v})' for k, v in summary.frames_per_scenario.items())}")
    print(f"topics: {', '.join(f'{t} [{k}]' for t, k in summary.topics.items())}")
    print(f"bag written to {summary.path} ({summary.bytes / 2**20:.1f} MiB, {config.storage})")


def _cmd_replay(args: argparse.Namespace) -> None:
    params = args.params or _default_params_file()
    created = not args.out.exists()
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        _replay_into(args, params)
    except BaseException:
        # A run that failed before writing anything (a bad bag, bundle or parameter file)
        # leaves no empty report folder; one that wrote frames keeps them to look at.
        if created and not any(f.is_file() and f.stat().st_size for f in args.out.rglob("*")):
            shutil.rmtree(args.out, ignore_errors=True)
        raise


def _replay_into(args: argparse.Namespace, params: Path) -> None:
    from usn_offline.replay.offline import replay_offline
    from usn_offline.replay.report import build_report, summary_rows, text_table, write_report

    run = replay_offline(args.bag, args.bundle, params, args.image_topic, frames_out=args.out / "frames.jsonl",
                         progress=not args.quiet)
    mode = "offline"
    if args.live:
        from usn_offline.replay.live import LiveConfig, compare_runs, replay_live

        live = replay_live(args.bag, args.bundle, params, LiveConfig(image_topic=args.image_topic,
                                                                     timeout_s=args.frame_timeout,
                                                                     rate=args.live_rate),
                           args.out, progress=not args.quiet)
        run.extra["live"] = compare_runs(run, live)
        mode = "offline + live"
    report = build_report(run, args.bag, run.bundle, params, mode)
    files = write_report(args.out, report, run, plots=not args.no_plots)
    print(text_table(summary_rows(report)))
    if not run.complete:
        print(f"warning: the bag ended early ({run.problem}); the report covers {len(run.records)} frames")
    if args.live:
        live = report["live"]
        print(f"live: {live['frames_sent']} frames sent, {live['statuses_received']} statuses, "
              f"{live['missing_statuses']} missing; offline and live flags identical: "
              f"{live['agreement']['flags_identical']}, keypoints within "
              f"{live['agreement']['max_keypoint_difference_px']:.1e} px")
        if live["missing_statuses"] or live["duplicate_statuses"] or not live["agreement"]["flags_identical"] \
                or live["agreement"]["keypoint_mismatches"]:
            print("warning: the live replay does not match the offline replay frame by frame (see "
                  f"{args.out / 'report.json'}, 'live', and {args.out / 'live_node.log'})")
    print(f"report written to {args.out}/ ({', '.join(f.name for f in files)})")


class _Parser(argparse.ArgumentParser):
    """argparse that reads every negative number as a value, e-notation and -inf included:
    its own pattern takes ``--brightness -0.03 0.03`` but not ``--brightness -3e-2 3e-2``,
    which it would read as an unknown option."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf(inity)?$",
                                                   re.IGNORECASE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="usn-offline",
        description="Train, prune, certify and export keypoint networks robust to brightness/contrast.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("data", help="generate a built-in dataset (COCO keypoints folder)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--target", default="landing_pad", choices=["landing_pad", "docking_hexagon"],
                   help="landing_pad: 4 corners, rotation up to 40 deg; docking_hexagon: 6 vertices and the "
                   "centre, any rotation")
    p.add_argument("--max-rotation", type=_rotation, metavar="DEG",
                   help="in-plane rotation range +-DEG (default: the target's)")
    p.add_argument("--num-train", type=_positive_int, default=8000)
    p.add_argument("--num-val", type=_positive_int, default=500)
    p.add_argument("--num-test", type=_positive_int, default=1000)
    p.add_argument("--image-size", type=_int_in(16, 4096), default=64, help="square image side in pixels")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser("train", help="train a keypoint network on a COCO keypoints folder")
    p.add_argument("--data", required=True, type=Path, help="dataset folder (train and val splits)")
    p.add_argument("--out", required=True, type=Path, help="checkpoint path (.pt; a .json is written beside)")
    p.add_argument("--model", default="cnn7", choices=["cnn7", "resnet"])
    p.add_argument("--widths", type=_positive_int, nargs="+", help="backbone channel widths")
    p.add_argument("--hidden", type=_positive_int, help="hidden units of the regression head")
    p.add_argument("--input-size", type=_int_in(8, 1024),
                   help="network input side in pixels (default: the training images' side when they are square "
                   "and at most 128 px, else 64; train prints which)")
    _visibility_argument(p)
    p.add_argument("--input-norm", default="none", choices=["none", "standardise"],
                   help="standardise: the network divides out each image's mean and spread first, exactly "
                   "invariant to contrast/brightness where no pixel clips (docs/METHOD.md)")
    p.add_argument("--epochs", type=_positive_int, default=20)
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--lr", type=_positive_float, default=2e-3)
    p.add_argument("--augment-rotation", type=_rotation, metavar="DEG",
                   help="turn each training image by up to +-DEG about its centre, keypoints with it (0: off; "
                   "default: what the dataset declares, else off)")
    p.add_argument("--augment-scale", type=_positive_float, nargs=2, metavar=("LO", "HI"),
                   help="scale each training image by a factor in [LO, HI] about its centre (1 1: off; "
                   "default: what the dataset declares, else off)")
    p.add_argument("--augment-flip", action=argparse.BooleanOptionalAction,
                   help="mirror half the training images left-right, exchanging the keypoint pairs the dataset "
                   "declares (default: on when it declares them)")
    p.add_argument("--init", type=Path, help="start from this checkpoint's weights and architecture "
                   "(fine-tuning, e.g. with --bound-weight)")
    _bound_loss_arguments(p, "training")
    p.add_argument("--bound-ramp-epochs", type=_nonnegative_int, default=5,
                   help="epochs over which the bound loss's weight and box ramp up from 0")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    p.add_argument("--resume", action="store_true", help="continue from <out>.resume.pt if present")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="mean pixel error and PCK of a checkpoint on a split")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--split", default="test")
    p.add_argument("--pck", type=_positive_float, nargs="+", default=[2.0, 5.0], help="PCK thresholds (px)")
    _visibility_argument(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, help="write the result as JSON (e.g. eval.json)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("certify", help="prove keypoints move <= delta px under brightness/contrast changes")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--split", default="test")
    p.add_argument("--num-images", type=_positive_int, help="certify only the first N images")
    p.add_argument("--delta", type=_finite_float, default=2.0, help="allowed keypoint movement in pixels")
    p.add_argument("--contrast", type=_finite_float, nargs=2, default=[0.8, 1.2], metavar=("A_LO", "A_HI"))
    p.add_argument("--brightness", type=_finite_float, nargs=2, default=[-0.2, 0.2], metavar=("B_LO", "B_HI"))
    p.add_argument("--norm", choices=["linf", "l2"], default="linf")
    p.add_argument("--reference", choices=["prediction", "ground_truth"], default="prediction",
                   help="stability (the model's own output) or correctness (ground truth)")
    p.add_argument("--no-clip", action="store_true", help="certify a*x + b without clipping to [0, 1]")
    p.add_argument("--method", choices=["ibp", "crown", "alpha-crown"], default="crown")
    p.add_argument("--intermediate", choices=["auto", "crown", "forward"], default="auto",
                   help="hidden-neuron bounds behind the relaxations: crown = backward passes to the input "
                        "(auto_LiRPA's CROWN), forward = forward linear bounds (cheap, loose on large boxes), "
                        "auto = forward, then crown for the boxes still unproven with at most "
                        "--crown-max-unstable unstable neurons")
    p.add_argument("--crown-max-unstable", type=_positive_int, default=3000,
                   help="auto: largest count of unstable neurons for which a box gets CROWN intermediate bounds")
    p.add_argument("--backend", choices=["ours", "auto_lirpa"], default="ours",
                   help="auto_lirpa: bound every box with the reference verifier auto_LiRPA (installed separately; "
                        "float32 plus a stated margin)")
    p.add_argument("--bab-budget", type=_positive_int, default=512,
                   help="max boxes bounded per branch-and-bound call (budgets count work, never seconds: "
                        "the same inputs give the same certificate on an idle or a busy machine)")
    p.add_argument("--bab-depth", type=_nonnegative_int, default=10, help="max splits along one path")
    p.add_argument("--radius-search", action="store_true", help="find each image's largest certified eps")
    p.add_argument("--eps-max", type=_positive_float, default=0.4)
    p.add_argument("--radius-strategy", choices=["frontier", "bisection"], default="frontier",
                   help="frontier: refine the unproven sub-box nearest nominal (default); bisection: probe whole boxes")
    p.add_argument("--radius-budget", type=_positive_int,
                   help="frontier: sub-boxes bounded per image for the whole radius search "
                        "(default 256 on the CPU, 512 on CUDA)")
    p.add_argument("--radius-steps", type=_nonnegative_int, default=4, help="bisection steps after doubling")
    p.add_argument("--eps-start", type=_positive_float, default=0.0025, help="first eps of the radius search")
    p.add_argument("--contrast-scale", type=_nonnegative_float, default=1.0, help="eps_c = eps * this")
    p.add_argument("--brightness-scale", type=_nonnegative_float, default=1.0, help="eps_b = eps * this")
    p.add_argument("--eps", type=_finite_float, nargs="+", help="certified fraction at these symmetric eps")
    p.add_argument("--region-grid", type=_grid, help="certified-region map over the box, e.g. 21x21")
    p.add_argument("--coverage", type=_finite_float, default=0.95, help="fraction of images the region must cover")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, type=Path, help="certificate JSON")
    _parallel_arguments(p)
    p.add_argument("--journal", type=Path, help="per-image results as they finish (JSON lines; default: "
                   "OUT with .journal.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue from the journal of an interrupted run")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_certify)

    p = sub.add_parser("export", help="write the deployment bundle (ONNX, engine, certificate, manifest)")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--certificate", required=True, type=Path, help="report written by 'certify'")
    p.add_argument("--data", type=Path, help="dataset folder (default: the one the certificate names)")
    p.add_argument("--nominal-split", default="train", help="split whose image statistics the monitor uses")
    p.add_argument("--out", required=True, type=Path, help="bundle directory")
    p.add_argument("--gap-tolerance", type=_positive_float, default=0.05,
                   help="max keypoint deviation (px) of a backend from torch")
    p.add_argument("--no-engine", action="store_true", help="do not build a TensorRT engine")
    p.add_argument("--fp16", action="store_true", help="build the TensorRT engine in FP16")
    p.add_argument("--workspace-mb", type=_positive_int, default=1024, help="TensorRT workspace limit")
    p.add_argument("--sign-key", type=Path, help="Ed25519 private key (usn-offline keygen): sign the bundle")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("keygen", help="make an Ed25519 key pair for signing bundles (KEY and KEY.pub)")
    p.add_argument("--out", required=True, type=Path, help="private key file (the public key goes to OUT.pub)")
    p.set_defaults(func=_cmd_keygen)

    p = sub.add_parser("sign", help="sign a bundle's manifest (e.g. again after build-engine)")
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--key", required=True, type=Path, help="Ed25519 private key")
    p.set_defaults(func=_cmd_sign)

    p = sub.add_parser("verify", help="check a bundle: files, hashes, certificate and its signature")
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--trusted-key", type=Path, nargs="+", help="public key(s) the signature must come from")
    p.set_defaults(func=_cmd_verify)

    def pruning_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--checkpoint", required=True, type=Path, help="trained checkpoint to prune")
        p.add_argument("--data", required=True, type=Path, help="dataset folder (train, val; test for compare)")
        p.add_argument("--rounds", type=_positive_int, default=3, help="progressive prune + fine-tune rounds")
        p.add_argument("--finetune-epochs", type=_nonnegative_int, default=2,
                       help="fine-tuning epochs after each round")
        p.add_argument("--lr", type=_positive_float, default=5e-4, help="fine-tuning learning rate")
        p.add_argument("--contrast", type=_finite_float, nargs=2, default=[0.9, 1.1], metavar=("A_LO", "A_HI"),
                       help="perturbation box the USN scores are measured over")
        p.add_argument("--brightness", type=_finite_float, nargs=2, default=[-0.1, 0.1], metavar=("B_LO", "B_HI"))
        p.add_argument("--score-images", type=_positive_int, default=256, help="training images for USN scores")
        p.add_argument("--allocation", choices=["global", "uniform"],
                       help="rank neurons across layers or prune each layer alike (default: per method)")
        p.add_argument("--min-keep", type=_positive_float, default=0.1, help="fraction of every layer kept")
        p.add_argument("--wd-weight", type=_nonnegative_float, default=1.0,
                       help="weight of the Wasserstein loss (usn-wd)")
        p.add_argument("--wd-epochs", type=_positive_int, default=1, help="concentration-phase epochs (usn-wd)")
        _bound_loss_arguments(p, "the fine-tuning rounds")
        p.add_argument("--seed", type=_seed, default=0)
        p.add_argument("--device", default="auto")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("prune", help="prune a trained network (USN with the Wasserstein loss by default)")
    pruning_arguments(p)
    p.add_argument("--method", choices=["usn-wd", "usn", "magnitude", "random", "none"], default="usn-wd")
    p.add_argument("--ratio", type=_finite_float, default=0.3, help="fraction of conv channels / hidden units removed")
    p.add_argument("--out", required=True, type=Path, help="pruned checkpoint (.pt; a .json is written beside)")
    p.add_argument("--resume", action="store_true",
                   help="keep <out> if it was pruned from this checkpoint and data with the same settings")
    p.set_defaults(func=_cmd_prune)

    p = sub.add_parser("compare", help="every pruning method x ratio, each certified: table + plot")
    pruning_arguments(p)
    p.add_argument("--methods", nargs="+", choices=["usn-wd", "usn", "magnitude", "random", "none"],
                   default=["usn-wd", "usn", "magnitude", "random", "none"])
    p.add_argument("--ratios", type=_finite_float, nargs="+", default=[0.3, 0.6])
    p.add_argument("--eps", type=_positive_float, nargs="+", default=[0.005, 0.01, 0.02],
                   help="symmetric boxes at which certified accuracy is reported")
    p.add_argument("--delta", type=_positive_float, default=3.0, help="px from the ground truth")
    p.add_argument("--num-images", type=_positive_int, default=20, help="test images certified per model")
    p.add_argument("--bab-budget", type=_positive_int, default=512,
                   help="max boxes bounded per branch-and-bound call (work, never seconds)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    _parallel_arguments(p)
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("build-engine", help="build the TensorRT engine of a bundle on this machine")
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--workspace-mb", type=_positive_int, default=1024)
    p.set_defaults(func=_cmd_build_engine)

    p = sub.add_parser("make-bag", help="write a rosbag2 of camera frames under named lighting scenarios, "
                                        "with per-frame ground truth")
    p.add_argument("--data", required=True, type=Path, help="dataset folder whose images are the targets")
    p.add_argument("--split", default="test")
    p.add_argument("--out", required=True, type=Path, help="bag folder to create (must not exist)")
    p.add_argument("--scenario", nargs="+", default=list(DEFAULT_SCENARIOS), metavar="NAME",
                   help="scenarios in order, recipes joined by '+' (e.g. moving+dusk); recipes: "
                        + ", ".join(SCENARIO_RECIPES))
    p.add_argument("--frames", type=_positive_int, default=40, help="frames per scenario")
    p.add_argument("--width", type=_int_in(16, 7680), default=640)
    p.add_argument("--height", type=_int_in(16, 4320), default=480)
    p.add_argument("--encoding", choices=["rgb8", "bgr8", "mono8"], default="rgb8")
    p.add_argument("--compressed", choices=["png", "jpeg"], help="also write <image topic>/compressed")
    p.add_argument("--storage", choices=["mcap", "sqlite3"], default="mcap")
    p.add_argument("--fps", type=_float_in(0.1, 1000.0), default=30.0)
    p.add_argument("--image-topic", default="/camera/image_raw")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_make_bag)

    p = sub.add_parser("replay", help="replay a rosbag2 through the node's runtime (offline, and live over DDS "
                                      "with --live) and report accuracy, latency and the certified flag's safety")
    p.add_argument("--bag", required=True, type=Path, help="rosbag2 folder (MCAP or sqlite3)")
    p.add_argument("--bundle", required=True, type=Path, help="deployment bundle (usn-offline export --out)")
    p.add_argument("--out", required=True, type=Path, help="report folder")
    p.add_argument("--image-topic", help="image topic (default: the bag's only Image/CompressedImage topic)")
    p.add_argument("--params", type=Path, help="the node's parameters YAML (default: the shipped "
                                               "launch/usn_keypoint_node.params.yaml)")
    p.add_argument("--live", action="store_true", help="also run the real node as a process and publish the "
                                                      "bag to it over DDS; compare its outputs with offline")
    p.add_argument("--live-rate", type=_nonnegative_float, default=0.0, metavar="R",
                   help="live: 0 publishes lock-step, as fast as the node answers (default); R > 0 publishes at "
                        "the bag's recorded timing R times real time, with /clock and the node on use_sim_time")
    p.add_argument("--frame-timeout", type=_positive_float, default=600.0,
                   help="live: seconds to wait for a frame's status before counting it missing (a liveness "
                        "bound: a frame's proof budget is counted in boxes and may take minutes on a CPU)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_replay)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()  # torch's large tensors: no page faults on every allocation
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except UsnError as exc:
        print(f"usn-offline: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path that is a folder, under a file, unwritable, ...: say which
        if args.verbose:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"usn-offline: error: {where}{exc.strerror or exc} (-v shows where)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("usn-offline: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
