"""Errors of the certification stage."""

from usn_offline.errors import UsnError


class CertificationError(UsnError):
    """The network or the certification request cannot be handled."""
