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
