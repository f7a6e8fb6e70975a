"""Training: the loss drops, checkpoints round-trip, resume continues exactly."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from usn_offline.data import load_split
from usn_offline.errors import CheckpointError, ConfigError, TrainingError
from usn_offline.models import build_model, model_config_for
from usn_offline.runtime.preprocess import PreprocessConfig, normalised_to_pixels, pixels_to_normalised
from usn_offline.train import TrainConfig, evaluate_model, load_checkpoint, train_model
from usn_offline.train.checkpoint import CheckpointInfo, config_path, save_checkpoint
from usn_offline.train.device import resolve_device
from usn_offline.train.loop import collapse_message, geometric_batch
from usn_offline.train.metrics import predict_pixels

SMALL = dict(widths=(8, 8, 8, 8, 8), hidden=32)


@pytest.fixture(scope="module")
def splits(tiny_dataset):
    return load_split(tiny_dataset, "train"), load_split(tiny_dataset, "val")


def test_short_training_run_reduces_the_loss(splits, tmp_path, device):
    train, val = splits
    result = train_model(train, val, model_config_for("cnn7", **SMALL),
                         TrainConfig(epochs=6, batch_size=16, lr=3e-3, device=device),
                         tmp_path / "m.pt", progress=False)
    assert len(result.loss_history) == 6
    assert result.loss_history[-1] < 0.6 * result.loss_history[0]


def test_resnet_trains_one_epoch(splits, tmp_path):
    train, val = splits
    config = model_config_for("resnet", widths=(4, 4, 8), hidden=16)
    result = train_model(train, val, config, TrainConfig(epochs=1, batch_size=32, device="cpu"),
                         tmp_path / "r.pt", progress=False)
    model, _ = load_checkpoint(result.checkpoint)
    assert np.isfinite(evaluate_model(model, val).mean_px_error)


def test_resume_after_interruption_matches_an_uninterrupted_run(splits, tmp_path):
    train, val = splits
    model_config = model_config_for("cnn7", **SMALL)
    config = TrainConfig(epochs=3, batch_size=32, device="cpu", seed=4)
    full = train_model(train, val, model_config, config, tmp_path / "full.pt", progress=False)

    class Interrupted(Exception):
        pass

    def stop_after_first(epoch, loss, val_err):
        if epoch == 1:
            raise Interrupted

    out = tmp_path / "part.pt"
    with pytest.raises(Interrupted):
        train_model(train, val, model_config, config, out, progress=False, on_epoch_end=stop_after_first)
    resumed = train_model(train, val, model_config, config, out, resume=True, progress=False)
    assert resumed.epochs_run == 2
    assert resumed.loss_history == pytest.approx(full.loss_history, rel=1e-6)
    a, _ = load_checkpoint(tmp_path / "full.pt")
    b, _ = load_checkpoint(out)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb)
    # The run was planned for 3 epochs (its learning-rate schedule): resuming it with
    # another count is refused clearly, more or fewer, and the checkpoint is untouched.
    before = out.read_bytes()
    for epochs in (5, 2):
        with pytest.raises(TrainingError, match=f"planned for 3 epochs \\(3 done\\), not {epochs}: resume with "
                                                "--epochs 3, or train into a new --out"):
            train_model(train, val, model_config, replace(config, epochs=epochs), out, resume=True, progress=False)
    assert out.read_bytes() == before
    assert train_model(train, val, model_config, config, out, resume=True, progress=False).epochs_run == 0
    # Other settings or data are another run: refused, naming what changed, even when every
    # epoch is done (it would otherwise say "up to date" about the old run).
    for other_config, other_train, fragment in (
            (replace(config, lr=1e-3), train, "lr 0.002 -> 0.001"),
            (replace(config, seed=5), train, "seed 4 -> 5"),
            (config, train.subset(slice(0, len(train) - 1)), "training data ")):
        with pytest.raises(TrainingError, match=f"was trained with other settings \\(.*{fragment}"):
            train_model(other_train, val, model_config, other_config, out, resume=True, progress=False)
    assert out.read_bytes() == before
    assert train_model(train, val, model_config, replace(config, device="auto"), out, resume=True,
                       progress=False).epochs_run == 0  # the device is not a setting of the run


def test_a_diverging_run_stops_with_a_clear_error_and_writes_nothing(splits, tmp_path):
    """One NaN keypoint in the data (or a learning rate that blows up) makes a NaN loss:
    training stops there and writes no checkpoint of it."""
    train, val = splits
    poisoned = replace(train, keypoints=train.keypoints.copy())
    poisoned.keypoints[5, 0, 0] = np.nan
    out = tmp_path / "nan.pt"
    with pytest.raises(TrainingError, match=r"training diverged: the loss is nan at epoch 1, batch \d+"):
        train_model(poisoned, val, model_config_for("cnn7", **SMALL), TrainConfig(epochs=2, batch_size=16),
                    out, progress=False)
    assert not out.exists()
    with pytest.raises(TrainingError, match="the loss is (nan|inf) at epoch"):
        train_model(train, val, model_config_for("cnn7", **SMALL), TrainConfig(epochs=2, batch_size=16, lr=1e30),
                    out, progress=False)


def test_a_collapsed_run_stops_with_a_clear_error_and_writes_nothing(splits, tiny_checkpoint, tmp_path):
    """A dataset made to collapse: every image is the same picture, with different labels,
    so the network can only learn one answer for all. Training ends with a clear error and
    leaves no checkpoint; a network trained on the real images passes the check."""
    train, val = splits
    same = lambda ds: replace(ds, images=np.repeat(ds.images[:1], len(ds), axis=0))  # noqa: E731
    out = tmp_path / "flat.pt"
    with pytest.raises(TrainingError, match=r"training collapsed: the network gives the same keypoints for all "
                                            rf"{len(val)} validation images \(spread 0 px, labels \d"):
        train_model(same(train), same(val), model_config_for("cnn7", **SMALL), TrainConfig(epochs=1, batch_size=16),
                    out, progress=False)
    assert not out.exists() and not config_path(out).exists() and not out.with_suffix(".resume.pt").exists()
    assert collapse_message(predict_pixels(load_checkpoint(tiny_checkpoint)[0], val), val) is None


def test_checkpoint_round_trip(tmp_path):
    config = model_config_for("resnet", widths=(4, 4, 8), hidden=16)
    model = build_model(config)
    with torch.no_grad():  # non-default BatchNorm statistics must survive too
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    info = CheckpointInfo(model=config, preprocess=PreprocessConfig(64, 64),
                          keypoint_names=("a", "b", "c", "d"), training={"note": "x"})
    path = save_checkpoint(tmp_path / "ck.pt", model, info)
    loaded, loaded_info = load_checkpoint(path)
    assert loaded_info.model == config and loaded_info.keypoint_names == info.keypoint_names
    x = torch.rand(2, 1, 64, 64)
    model.eval()
    torch.testing.assert_close(loaded(x), model(x))


def _saved(tmp_path):
    config = model_config_for("cnn7", **SMALL)
    info = CheckpointInfo(model=config, preprocess=PreprocessConfig(64, 64),
                          keypoint_names=("a", "b", "c", "d"))
    return save_checkpoint(tmp_path / "ck.pt", build_model(config), info)


def test_checkpoint_errors_are_specific(tmp_path):
    path = _saved(tmp_path)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "other.pt")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(path)


def test_checkpoint_config_mismatch(tmp_path):
    path = _saved(tmp_path)
    doc = json.loads(config_path(path).read_text())
    doc["model"]["hidden"] = 64
    config_path(path).write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="weights do not match the architecture"):
        load_checkpoint(path)
    doc["schema_version"] = 99
    config_path(path).write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="unsupported schema_version 99"):
        load_checkpoint(path)
    doc["schema_version"] = True  # not 1
    config_path(path).write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="unsupported schema_version True"):
        load_checkpoint(path)
    doc["schema_version"] = 1
    doc["model"]["hidden"] = model_config_for("cnn7", **SMALL).hidden
    doc["preprocess"]["input_width"] = 64.5
    config_path(path).write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="invalid value \\(input_width must be an integer, got 64.5\\)"):
        load_checkpoint(path)
    config_path(path).unlink()
    with pytest.raises(CheckpointError, match="checkpoint config not found"):
        load_checkpoint(path)


def test_hostile_checkpoints_give_one_clear_error(tmp_path):
    """An empty model.pt, a config whose widths would need terabytes, and fields of the
    wrong JSON type: CheckpointError, before anything is allocated."""
    path = _saved(tmp_path)
    good = path.read_bytes()
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(path)
    path.write_bytes(good)
    doc = json.loads(config_path(path).read_text())
    huge = json.loads(json.dumps(doc))
    huge["model"]["widths"] = [10**6] * len(doc["model"]["widths"])
    config_path(path).write_text(json.dumps(huge))
    # (building that network would try to allocate ~4 TB: the check runs on the meta device)
    with pytest.raises(CheckpointError, match="weights do not match the architecture .*first difference"):
        load_checkpoint(path)
    for field, value, message in (("model", [], "field 'model' must be a JSON object, got list"),
                                  ("preprocess", 3, "field 'preprocess' must be a JSON object, got int"),
                                  ("keypoint_names", "abcd", "field 'keypoint_names' must be a JSON list")):
        bad = json.loads(json.dumps(doc))
        bad[field] = value
        config_path(path).write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(path)


def test_a_checkpoint_with_nan_weights_is_refused(tmp_path):
    """Everything computed from it would be NaN (prune would write a NaN model, exit 0)."""
    path = _saved(tmp_path)
    state = torch.load(path, weights_only=True)
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name].view(-1)[0] = float("nan")
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=f"weights {name} hold NaN or infinite values"):
        load_checkpoint(path)


def test_pickled_objects_are_refused(tmp_path):
    path = _saved(tmp_path)
    torch.save({"w": torch.zeros(1), "evil": object()}, path)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(path)


def test_train_config_validation(splits, tmp_path):
    with pytest.raises(ConfigError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match="augment_contrast"):
        TrainConfig(augment_contrast=(1.5, 0.5))
    train, val = splits
    with pytest.raises(ConfigError, match="model expects 5 keypoints|dataset has 4 keypoints"):
        train_model(train, val, model_config_for("cnn7", num_keypoints=5, **SMALL), TrainConfig(epochs=1),
                    tmp_path / "x.pt", progress=False)


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="invalid device"):
        resolve_device("tpu:x")


def _blob(h, w, centre, sigma=1.5):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * sigma ** 2)).astype(np.float32)


@pytest.mark.parametrize("hw", [(64, 64), (48, 80)])
def test_geometric_augmentation_moves_keypoints_with_the_image(hw):
    """A blob drawn at a keypoint is found, after turning and scaling, where the augmented
    keypoint says (its centroid, within a tenth of a pixel); a keypoint that would leave
    the frame leaves its image untouched."""
    h, w = hw
    centres = [(w * 0.62, h * 0.40), (w * 0.30, h * 0.55), (w - 4.0, h - 4.0)]
    x = torch.from_numpy(np.stack([_blob(h, w, c) for c in centres]))[:, None]
    y = torch.from_numpy(pixels_to_normalised(np.array(centres), h, w).astype(np.float32)).reshape(3, 2)
    yy, xx = np.mgrid[0:h, 0:w]
    for config in (TrainConfig(augment_rotation_deg=180.0, augment_scale=(0.7, 1.0)),
                   TrainConfig(augment_scale=(1.3, 1.3))):
        out, moved = geometric_batch(x, y, config, torch.Generator().manual_seed(3))
        for i in (0, 1):  # (blob 2 ends near an edge, where the repeated border pixels bias a centroid)
            img = out[i, 0].numpy()
            found = np.array([(img * xx).sum(), (img * yy).sum()]) / img.sum()
            want = normalised_to_pixels(moved[i].numpy().astype(np.float64), h, w)
            assert not np.allclose(want, centres[i], atol=0.5)  # it did move
            np.testing.assert_allclose(found, want, atol=0.1)
    assert torch.equal(out[2], x[2]) and torch.equal(moved[2], y[2])  # scaled up, it would leave the frame


def test_no_geometric_augmentation_by_default_draws_nothing():
    x, y = torch.rand(4, 1, 16, 16), torch.rand(4, 8)
    gen = torch.Generator().manual_seed(0)
    before = gen.get_state().clone()
    out, moved = geometric_batch(x, y, TrainConfig(), gen)
    assert out is x and moved is y and torch.equal(gen.get_state(), before)
    with pytest.raises(ConfigError, match="augment_rotation_deg must be in"):
        TrainConfig(augment_rotation_deg=200)
    with pytest.raises(ConfigError, match="augment_scale must satisfy"):
        TrainConfig(augment_scale=(1.2, 0.8))


def test_training_with_geometric_augmentation_learns(splits, tmp_path):
    train, val = splits
    result = train_model(train, val, model_config_for("cnn7", **SMALL),
                         TrainConfig(epochs=4, batch_size=16, lr=3e-3, augment_rotation_deg=30.0,
                                     augment_scale=(0.8, 1.0)), tmp_path / "g.pt", progress=False)
    assert result.loss_history[-1] < 0.8 * result.loss_history[0]
