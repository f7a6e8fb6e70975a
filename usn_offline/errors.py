"""Exception hierarchy: every error a user can cause has a message they can act on."""


class UsnError(Exception):
    """Base class of the errors the CLI reports as a one-line message."""


class DatasetError(UsnError):
    """A dataset folder, annotation file or image is missing or malformed."""


class CheckpointError(UsnError):
    """A checkpoint or its JSON config is missing, malformed or inconsistent."""


class BundleError(UsnError):
    """A deployment bundle is missing, corrupt, tampered with or inconsistent."""


class ConfigError(UsnError):
    """A configuration value is out of range or inconsistent."""


class ReplayError(UsnError):
    """A rosbag cannot be read or written, or a replay cannot run; the text says why."""


class TrainingError(UsnError):
    """Training diverged (a loss that is NaN or infinite) or cannot continue as asked."""


def check_finite_loss(value: float, where: str) -> None:
    """Stop training at the first loss that is NaN or infinite, before it reaches the
    weights: nothing of it is written (checkpoints of earlier epochs stay as they were)."""
    if value != value or value in (float("inf"), float("-inf")):
        raise TrainingError(f"training diverged: the loss is {value} at {where}; nothing of it was written "
                            "(lower --lr, or look for NaN/huge values in the data)")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type when the message is empty)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
