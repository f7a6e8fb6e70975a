"""The semantic perturbation x'(a, b) = clip(a*x + b, 0, 1) (contrast a, brightness b)."""

from usn_offline.perturb.photometric import PhotometricBox, apply_photometric, sample_photometric

__all__ = ["PhotometricBox", "apply_photometric", "sample_photometric"]
