"""Named, seeded lighting and camera recipes for scenario bags.

A scenario is one or more recipe names joined by ``+`` (``"moving+dusk"``): lighting
recipes compose (each is a map x -> a x + b of the light, applied one after the other),
at most one camera recipe says whether the view moves, and ``malformed`` corrupts a few
image messages on purpose. Everything is a pure function of the frame position, so a
scenario with the same length and seed always gives the same frames.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from usn_offline.errors import ConfigError

# Lighting: (position t in [0, 1), frame number i) -> (contrast a, brightness b).
Lighting = Callable[[float, int], tuple[float, float]]


def _constant(t: float, i: int) -> tuple[float, float]:
    return 1.0, 0.0


def _dusk(t: float, i: int) -> tuple[float, float]:
    """Light fades to a quarter, with a slight offset drop (black level)."""
    return 1.0 - 0.75 * t, -0.05 * t


def _tunnel(t: float, i: int) -> tuple[float, float]:
    """A step into a tunnel at 40 % of the segment."""
    return (1.0, 0.0) if t < 0.4 else (0.35, -0.03)


def _flicker(t: float, i: int) -> tuple[float, float]:
    """Mains flicker aliased against the frame rate: contrast swings +-25 %."""
    return 1.0 + 0.25 * math.sin(2 * math.pi * 0.23 * i), 0.0


def _flash(t: float, i: int) -> tuple[float, float]:
    """A flash (or glare) over the middle tenth of the segment: most of the frame saturates."""
    return (1.8, 0.35) if 0.45 <= t < 0.55 else (1.0, 0.0)


def _exposure_hunting(t: float, i: int) -> tuple[float, float]:
    """Auto-exposure overshooting and settling: a damped oscillation of gain and offset."""
    decay = math.exp(-3.0 * t)
    return 1.0 + 0.6 * decay * math.sin(2 * math.pi * i / 10), 0.1 * decay * math.sin(2 * math.pi * i / 10 + 1.0)


def _lens_cap(t: float, i: int) -> tuple[float, float]:
    """Black frames for the first quarter (a lens cap at start), then nominal light."""
    return (0.0, 0.0) if t < 0.25 else (1.0, 0.0)


LIGHTING: dict[str, Lighting] = {
    "constant": _constant, "dusk": _dusk, "tunnel": _tunnel, "flicker": _flicker, "flash": _flash,
    "exposure_hunting": _exposure_hunting, "lens_cap": _lens_cap,
}
CAMERA = ("static", "moving")
EXTRAS = ("malformed",)
# Malformed messages, in the order they are used (see bag_writer.malform).
MALFORMED_KINDS = ("unsupported_encoding", "truncated_data", "empty_image", "step_too_small")

# The scenario bag `make demo` replays: every recipe once, and two combinations.
DEFAULT_SCENARIOS = ("static", "dusk", "tunnel", "flicker", "flash", "exposure_hunting", "moving",
                     "moving+dusk", "lens_cap", "static+malformed")


@dataclass(frozen=True)
class FrameRecipe:
    """What one frame of a scenario looks like."""

    scenario: str
    position: int  # frame number within the scenario
    contrast: float
    brightness: float
    view: int  # which view (dataset image) of the scenario is shown
    motion: float  # camera motion phase in [0, 1): 0 for a static camera
    malformed: str | None  # one of MALFORMED_KINDS, or None


@dataclass(frozen=True)
class Scenario:
    """A parsed scenario name."""

    name: str
    lighting: tuple[str, ...]
    moving: bool
    malformed: bool

    @classmethod
    def parse(cls, name: str) -> Scenario:
        parts = [p.strip() for p in name.split("+")]
        known = sorted([*LIGHTING, *CAMERA, *EXTRAS])
        unknown = [p for p in parts if p not in known]
        if not name.strip() or unknown:
            raise ConfigError(f"unknown scenario recipe {', '.join(map(repr, unknown or [name]))} in "
                              f"'{name}' (known: {', '.join(known)}; combine with '+')")
        cameras = [p for p in parts if p in CAMERA]
        if len(cameras) > 1:
            raise ConfigError(f"scenario '{name}' names more than one camera recipe ({', '.join(cameras)})")
        if len(set(parts)) != len(parts):
            raise ConfigError(f"scenario '{name}' repeats a recipe")
        lighting = tuple(p for p in parts if p in LIGHTING) or ("constant",)
        return cls("+".join(parts), lighting, cameras == ["moving"], "malformed" in parts)

    def views(self, frames: int) -> int:
        """Distinct views shown: a moving camera passes to a new scene every ~15 frames."""
        return max(1, math.ceil(frames / 15)) if self.moving else 1

    def frame(self, position: int, frames: int) -> FrameRecipe:
        """The recipe of frame ``position`` of a segment of ``frames`` frames."""
        if not 0 <= position < frames:
            raise ConfigError(f"frame {position} is outside a scenario of {frames} frames")
        t = position / frames
        a, b = 1.0, 0.0
        for name in self.lighting:  # x -> a2 (a1 x + b1) + b2
            a2, b2 = LIGHTING[name](t, position)
            a, b = a2 * a, a2 * b + b2
        views = self.views(frames)
        view = min(views - 1, position * views // frames)
        motion = (position / frames * views) % 1.0 if self.moving else 0.0
        malformed = None
        if self.malformed and position % 10 == 5:
            malformed = MALFORMED_KINDS[(position // 10) % len(MALFORMED_KINDS)]
        return FrameRecipe(self.name, position, a, b, view, motion, malformed)
