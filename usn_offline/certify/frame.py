"""Per-frame proofs: the keypoints found on this frame are, to within delta, those the
network finds on the same view under nominal lighting.

Model (the assumption every proof rests on). Each channel of the received frame is

    X = Q(clip(a0 X0 + b0, 0, 1)),

where X0 is the same view under nominal lighting (values in [0, 1]), (a0, b0) is an
unknown lighting change inside the stated range R (a0 > 0), and Q rounds to the camera's
step q (half-step error at most). Inverting it pixel by pixel, with a = 1/a0, b = -b0/a0:

- a pixel strictly inside (0, 1): X0 = a X + b + a e with |e| <= q/2 (the rounding);
- a pixel at 0 (clipped dark): X0 anywhere in [0, clip(b + a q/2)];
- a pixel at the maximum (clipped bright): X0 anywhere in [clip(a (1 - q/2) + b), 1].

The rounding term is optional (``FrameProofConfig.camera_rounding``, q = 0 without it):
see there for why it is off by default.

Preprocessing (BT.601 luma, area/linear resize) is linear with non-negative weights, so
the network input of X0 lies in the *pixel set* a u + b m + c, c in [c_lo, c_hi] per
input pixel (:func:`~usn_offline.certify.ops.input_terms`), for every (a, b) in the box
R' that bounds the inverse of R. Branch and bound proves over that set that every
keypoint stays within delta of the keypoints served on the frame, so nothing here rests
on an estimate of the unknown nominal image, and clipped pixels are covered soundly
(they only widen the set). Each box it bounds gets the set of its own (a, b) (the clipped
pixels' intervals shrink with it), after shrinking it to where the frame can arise at
all (:class:`FramePixelSets`).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from usn_offline.certify.bab import BabConfig, Status, certify_boxes
from usn_offline.certify.bounds import BoundOptions, PixelMap
from usn_offline.certify.boxes import Boxes
from usn_offline.certify.errors import CertificationError
from usn_offline.certify.graph import Graph
from usn_offline.certify.spec import KeypointProperty, Norm
from usn_offline.certify.standardise import body_of, standardised_sets_of
from usn_offline.perturb import PhotometricBox
from usn_offline.runtime.bundle import Bundle
from usn_offline.runtime.preprocess import (
    _LUMA,
    PreprocessConfig,
    full_scale,
    normalised_to_pixels,
    resize_image,
)


def inverse_box(lighting: PhotometricBox) -> PhotometricBox:
    """The box of (1/a0, -b0/a0) over (a0, b0) in ``lighting`` (exact bounds: the inverse
    is monotone in each parameter on each side of b0 = 0)."""
    if not lighting.a_lo > 0:
        raise CertificationError(f"the lighting range needs contrast > 0, got a_lo={lighting.a_lo}")
    a_lo, a_hi, b_lo, b_hi = lighting.a_lo, lighting.a_hi, lighting.b_lo, lighting.b_hi
    low = -b_hi / (a_lo if b_hi >= 0 else a_hi)
    high = -b_lo / (a_lo if b_lo <= 0 else a_hi)
    return PhotometricBox(1.0 / a_hi, 1.0 / a_lo, low, high)


def camera_step(frame: np.ndarray) -> tuple[float, float]:
    """(rounding step q, maximum value) of a frame's pixel type, in [0, 1] units."""
    max_value = full_scale(frame.dtype)
    return (1.0 / max_value if frame.dtype.kind in "ui" else 0.0), max_value


def _light_channels(frame: np.ndarray) -> np.ndarray:
    """The frame's light channels as float64 raw values: (H, W) mono or (H, W, 3) colour
    (a single channel squeezed, alpha dropped)."""
    channels = frame[:, :, :3] if frame.ndim == 3 and frame.shape[2] == 4 else frame
    if channels.ndim == 3 and channels.shape[2] == 1:
        channels = channels[:, :, 0]
    return channels.astype(np.float64)


def _network_input(plane: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Preprocessing in float64 of one (H, W) or (H, W, 3) plane: BT.601 luma, then the
    resize — both linear with non-negative weights."""
    gray = plane if plane.ndim == 2 else plane @ np.array(_LUMA[3])
    return resize_image(np.ascontiguousarray(gray), config)


# A part of a frame's pixel set (branch and bound's split of it beyond (a, b)): limits
# (lo, hi), each (1, 1, H, W) float64, on every network pixel's hidden offset t
# (:meth:`FramePixelSets.hidden_offsets`); -inf/inf where there are none.
HiddenPart = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class FramePixelSets:
    """The pixel sets of one frame for every sub-box of the inverse range, as network
    inputs: ``value`` (u), ``inside`` (m) and the preprocessed indicators of the pixels
    clipped dark and bright, each (1, H, W) float64.

    A clipped pixel's hidden value depends on (a, b): dark ones lie in [0, clip(b + a q/2)],
    bright ones in [clip(a (1 - q/2) + b), 1]. Over a sub-box the set therefore shrinks with
    it, so branch and bound recomputes the set per box (:meth:`for_boxes`) instead of
    keeping the whole range's intervals.

    And the frame can arise only at some (a, b) (:meth:`restrict`): the nominal image's
    values lie in [0, 1], so its darkest unclipped pixel X needs a (X + q/2) + b >= 0, its
    brightest a (X - q/2) + b <= 1, a dark clipped pixel b + a q/2 >= 0, a bright one
    a (1 - q/2) + b <= 1; and (1/a, -b/a) must lie in the lighting range, which bounds b
    by the range's brightness times a (the inverse of a box is a wedge, not a box).
    ``constraints`` holds these as (p, r, sense): p a + b >= r (sense 1) or <= r (-1)."""

    value: torch.Tensor
    inside: torch.Tensor
    dark: torch.Tensor
    bright: torch.Tensor
    half_step: float  # q/2 in [0, 1] units (0: the camera's rounding not modelled)
    constraints: tuple[tuple[float, float, int], ...] = ()

    @classmethod
    def of_frame(cls, frame: np.ndarray, config: PreprocessConfig, lighting: PhotometricBox | None = None,
                 rounding: bool = False) -> FramePixelSets:
        """The sets of ``frame``; ``lighting`` (the range R of (a0, b0)) adds the constraints
        of :meth:`restrict`. Without ``rounding`` the camera's rounding is not modelled
        (q = 0; clipped pixels are still those at 0 and at the maximum)."""
        step, max_value = camera_step(frame)
        half = (step if rounding else 0.0) / 2
        raw = _light_channels(frame)
        dark, bright = raw <= 0, raw >= max_value
        inside = ~(dark | bright)
        planes = [np.where(inside, raw / max_value, 0.0), inside, dark, bright]
        value, inside_plane, dark_plane, bright_plane = (
            torch.from_numpy(_network_input(np.asarray(p, np.float64), config))[None] for p in planes)
        constraints: list[tuple[float, float, int]] = []
        if lighting is not None:
            constraints += [(lighting.b_hi, 0.0, 1), (lighting.b_lo, 0.0, -1)]  # -b/a in [b0_lo, b0_hi]
            # Every pixel must be consistent; the darkest and brightest bind.
            lows, highs = [half] if dark.any() else [], [1.0 - half] if bright.any() else []
            if inside.any():
                lows.append(float(raw[inside].min()) / max_value + half)
                highs.append(float(raw[inside].max()) / max_value - half)
            constraints += [(min(lows), 0.0, 1)] if lows else []
            constraints += [(max(highs), 1.0, -1)] if highs else []
        return cls(value, inside_plane, dark_plane, bright_plane, half, tuple(constraints))

    # Pixels whose hidden offset :meth:`split` considers splitting (the largest shares).
    SPLIT_CANDIDATES = 8

    # Outward slack of :meth:`restrict` (float64 rounding of its own arithmetic): it may
    # keep a sliver too much, never drop a point where the frame can arise.
    SLACK = 1e-9

    def restrict(self, boxes: Boxes, parts: list[HiddenPart | None] | None = None) -> Boxes:
        """Each box shrunk to a box around its points (a, b) where the frame can arise
        (interval propagation of ``constraints``, a > 0); empty (lo > hi) where none can,
        or where a pixel's hidden offset can take no value inside its part's limits."""
        a_lo, a_hi, b_lo, b_hi = boxes.a_lo.clone(), boxes.a_hi.clone(), boxes.b_lo.clone(), boxes.b_hi.clone()
        eps = self.SLACK
        for _ in range(3):  # a fixed number of rounds: each one only tightens, soundly
            for p, r, sense in self.constraints:
                lo_pa, hi_pa = torch.minimum(p * a_lo, p * a_hi), torch.maximum(p * a_lo, p * a_hi)
                if sense > 0:  # b >= r - p a
                    b_lo = torch.maximum(b_lo, r - hi_pa - eps)
                    if p != 0:  # p a >= r - b_hi
                        bound = (r - b_hi) / p
                        a_lo, a_hi = ((torch.maximum(a_lo, bound - eps), a_hi) if p > 0
                                      else (a_lo, torch.minimum(a_hi, bound + eps)))
                else:  # b <= r - p a
                    b_hi = torch.minimum(b_hi, r - lo_pa + eps)
                    if p != 0:  # p a <= r - b_lo
                        bound = (r - b_lo) / p
                        a_lo, a_hi = ((a_lo, torch.minimum(a_hi, bound + eps)) if p > 0
                                      else (torch.maximum(a_lo, bound - eps), a_hi))
        shrunk = Boxes(a_lo, a_hi, b_lo, b_hi)
        if parts is not None and any(p is not None for p in parts):
            t_lo, t_hi = self.hidden_offsets(shrunk, parts)
            outside = (t_lo > t_hi).flatten(1).any(dim=1)
            shrunk = Boxes(torch.where(outside, a_hi + 1, a_lo), a_hi, b_lo, b_hi)
        return shrunk

    def for_boxes(self, boxes: Boxes) -> torch.Tensor:
        """The planes (B, 4, H, W) = (u, m, c_lo, c_hi) of the set over each box, in the
        dtype and on the device of ``boxes``: the network inputs of every nominal image
        the frame can come from under the model above, for (a, b) in that box."""
        dtype, device = boxes.a_lo.dtype, boxes.a_lo.device
        view = (-1, 1, 1, 1)
        dark_hi = (boxes.b_hi + boxes.a_hi * self.half_step).clamp(0.0, 1.0).view(view)
        bright_lo = (boxes.a_lo * (1 - self.half_step) + boxes.b_lo).clamp(0.0, 1.0).view(view)
        error = (boxes.a_hi * self.half_step).view(view)  # the rounding error after inversion
        u, m, dark, bright = (t.to(device, dtype)[None] for t in (self.value, self.inside, self.dark, self.bright))
        n = len(boxes)
        return torch.cat([u.expand(n, -1, -1, -1), m.expand(n, -1, -1, -1),
                          bright_lo * bright - error * m, dark_hi * dark + bright + error * m], dim=1)

    def _limits(self, parts: list[HiddenPart | None] | None, boxes: Boxes
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The parts' limits stacked (B, 1, H, W) in the boxes' dtype and device (-inf/inf
        for a box with none), or None when no box has a part."""
        if parts is None or all(p is None for p in parts):
            return None
        dtype, device = boxes.a_lo.dtype, boxes.a_lo.device
        whole = torch.full((1, *self.value.shape), math.inf, dtype=dtype, device=device)
        lo = torch.cat([-whole if p is None else p[0].to(device, dtype) for p in parts])
        hi = torch.cat([whole if p is None else p[1].to(device, dtype) for p in parts])
        return lo, hi

    def hidden_offsets(self, boxes: Boxes, parts: list[HiddenPart | None] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bounds (B, 1, H, W) of t in the form x = a (u + t) + b of every network input of
        the set over each box, u = ``value``: the set as an input standardisation sees it,
        since it removes a and b (``certify.standardise``).

        Per frame pixel, with h the half step (the module docstring's model):
        - unclipped: X0 = a (X + e) + b, so t = e in [-h, h];
        - dark: X0 in [0, clip(b + a h)], which needs b + a h >= 0 (else no X0 >= 0 gives
          the frame), so t = (X0 - b)/a lies in [-b/a, h];
        - bright: X0 in [clip(a (1 - h) + b), 1], so t = (X0 - b)/a lies in [1 - h, (1 - b)/a]
          (X0 >= a (1 - h) + b, and X0 <= 1).
        -b/a and (1 - b)/a are monotone in a for fixed b and in b for fixed a, so their
        extremes over a box lie at its corners. Every pixel of a kind has the same interval,
        so a network pixel's t lies in the sum of the intervals weighted by its shares of
        the kinds (the ``inside``, ``dark`` and ``bright`` planes: the preprocessing's
        non-negative weights). Unlike (c - b (1 - m)) / a by interval arithmetic on
        :meth:`for_boxes`' planes, this keeps the dependence of a clipped pixel's hidden
        value on (a, b): a bright pixel's t lies in [1, 1.5] over the widest box of the goal
        range, not anywhere in [0.4, 1.5].

        ``parts``: per box, limits on t that branch and bound split the set with
        (:meth:`split`); t's interval is intersected with them (empty where lo > hi)."""
        dtype, device = boxes.a_lo.dtype, boxes.a_lo.device
        view = (-1, 1, 1, 1)
        a_c, b_c = boxes.corners()
        dark_lo = (-b_c / a_c).min(dim=1).values.view(view)
        bright_hi = ((1 - b_c) / a_c).max(dim=1).values.view(view)
        h = self.half_step
        inside, dark, bright = (t.to(device, dtype)[None] for t in (self.inside, self.dark, self.bright))
        # Outward by the rounding of these few products and sums (values of order 1).
        slack = 1e-12 if dtype == torch.float64 else 1e-5
        t_lo = dark * dark_lo + bright * (1 - h) - h * inside - slack
        t_hi = dark * h + bright * bright_hi + h * inside + slack
        limits = self._limits(parts, boxes)
        if limits is not None:
            t_lo, t_hi = torch.maximum(t_lo, limits[0]), torch.minimum(t_hi, limits[1])
        return t_lo, t_hi

    def bound_inputs(self, graph: Graph, boxes: Boxes, parts: list[HiddenPart | None] | None = None
                     ) -> tuple[Graph, torch.Tensor, Boxes]:
        """(graph, inputs, boxes) to bound the set over each box (and part) with: for a
        network that standardises its input, its body over the standardised sets made from
        :meth:`hidden_offsets` (tighter than standardising :meth:`for_boxes`' sets);
        otherwise the network over :meth:`for_boxes` (which :meth:`split` never parts)."""
        if graph.standardise is None:
            return graph, self.for_boxes(boxes), boxes
        t_lo, t_hi = self.hidden_offsets(boxes, parts)
        u = self.value.to(boxes.a_lo.device, boxes.a_lo.dtype)[None]
        return (body_of(graph), *standardised_sets_of(graph.standardise, u, t_lo, t_hi, boxes))

    def split(self, graph: Graph, boxes: Boxes, parts: list[HiddenPart | None] | None, worst: torch.Tensor,
              halved: tuple[Boxes, Boxes]) -> list[tuple[HiddenPart, HiddenPart] | None]:
        """Per box, the set split in two at the midpoint of one network pixel's hidden
        offset t, or None to halve the box into ``halved`` instead.

        Once the box is small, what keeps a frame unproved is mostly its clipped pixels'
        hidden values: they stay free intervals however small the box (a blown pixel's t
        is anywhere in [1, (1 - b)/a] even at a point (a, b)). On the goal bag's frame 270
        the worst of 23 sub-boxes has a bound of 2.31 px; with every t fixed at its
        midpoint it is 0.10 px, and halving the t of one pixel alone takes it to 1.86 px.

        The choice is first-order: with g the gradient of output coordinate ``worst`` with
        respect to the standardised input z = A d + B + v at the set's centre, a set's
        bound is estimated by sum_i |g_i| width(v_i) + |g . d| width(A) + |sum g| width(B)
        (the standardisation's scale A and shift B narrow with the t's too). The split
        whose worse half has the smaller estimate wins: the box's halves, or the two
        halves of t at one of the :attr:`SPLIT_CANDIDATES` pixels of largest |g_i| width(v_i).
        Only for a network that standardises its input; every candidate covers the set."""
        n = len(boxes)
        if graph.standardise is None:
            return [None] * n
        dtype, device = boxes.a_lo.dtype, boxes.a_lo.device
        parts = list(parts or [None] * n)
        t_lo, t_hi = self.hidden_offsets(boxes, parts)
        u = self.value.to(device, dtype)[None]
        planes, set_boxes = standardised_sets_of(graph.standardise, u, t_lo, t_hi, boxes)
        d = planes[:, :1]
        centre = (d * ((set_boxes.a_lo + set_boxes.a_hi) / 2).view(-1, 1, 1, 1)
                  + ((set_boxes.b_lo + set_boxes.b_hi) / 2).view(-1, 1, 1, 1)
                  + (planes[:, 2:3] + planes[:, 3:4]) / 2).requires_grad_(True)
        one = torch.ones(n, dtype=dtype, device=device)
        with torch.enable_grad():
            out = body_of(graph).evaluate(centre, one, one - 1)
            (grad,) = torch.autograd.grad(out.gather(1, worst.view(-1, 1)).sum(), (centre,))
        weights = (grad.abs(), (grad * d).flatten(1).sum(1).abs(), grad.flatten(1).sum(1).abs())

        def estimate(idx: torch.Tensor, child_boxes: Boxes, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
            """The first-order estimate of each candidate half (its parent's weights)."""
            sets, sb = standardised_sets_of(graph.standardise, u, lo, hi, child_boxes)
            g, g_a, g_b = (w[idx] for w in weights)
            return ((g * (sets[:, 3:4] - sets[:, 2:3])).flatten(1).sum(1)
                    + g_a * (sb.a_hi - sb.a_lo) + g_b * (sb.b_hi - sb.b_lo))

        every = torch.arange(n, device=device)
        box_cost = torch.maximum(*(estimate(every, h, *self.hidden_offsets(h, parts)) for h in halved))
        share = (weights[0] * (t_hi - t_lo)).flatten(1)
        k = min(self.SPLIT_CANDIDATES, share.shape[1])
        pixels = share.topk(k, dim=1).indices  # (n, k)
        idx = every.repeat_interleave(k)
        flat = pixels.flatten()
        mids = ((t_lo + t_hi) / 2).flatten(1)[idx, flat]
        rows = torch.arange(n * k, device=device)
        lo, hi = t_lo[idx].clone(), t_hi[idx].clone()
        below_hi, above_lo = hi.clone(), lo.clone()
        below_hi.view(n * k, -1)[rows, flat] = mids
        above_lo.view(n * k, -1)[rows, flat] = mids
        repeated = boxes.select(idx)
        t_cost = torch.maximum(estimate(idx, repeated, lo, below_hi),
                               estimate(idx, repeated, above_lo, hi)).view(n, k)
        best_cost, best = t_cost.min(dim=1)
        whole = torch.full((1, *self.value.shape), math.inf, dtype=torch.float64)
        pairs: list[tuple[HiddenPart, HiddenPart] | None] = []
        for j, part in enumerate(parts):
            if not bool(best_cost[j] < box_cost[j]):
                pairs.append(None)
                continue
            pixel, mid = int(pixels[j, best[j]]), float(mids[j * k + int(best[j])])
            lo_j, hi_j = (-whole, whole) if part is None else part
            below, above = hi_j.clone(), lo_j.clone()
            below.view(-1)[pixel] = mid
            above.view(-1)[pixel] = mid
            pairs.append(((lo_j, below), (above, hi_j)))
        return pairs


def pixel_set(frame: np.ndarray, config: PreprocessConfig, inverse: PhotometricBox,
              rounding: bool = False) -> np.ndarray:
    """The planes (4, H, W) = (u, m, c_lo, c_hi), float64, of the network inputs of every
    nominal image the frame can come from under the model above, for (a, b) in ``inverse``
    (:class:`FramePixelSets`)."""
    sets = FramePixelSets.of_frame(frame, config, rounding=rounding)
    return sets.for_boxes(Boxes.from_boxes([inverse]))[0].numpy()


def frame_bab_config(graph: Graph, crown_share: float = 0.08) -> BabConfig:
    """Branch and bound for a frame's pixel sets: every box the forward bounds leave
    unproved gets CROWN intermediate bounds while they leave at most ``crown_share`` of
    the network's ReLU neurons unstable.

    The offline default (at most 3,000 unstable neurons, else split the box) suits (a, b)
    boxes, whose unstable neurons splitting removes. A frame's clipped pixels are free
    intervals that splitting (a, b) narrows only partly (a black pixel's stays [0, b] for
    the boxes of b > 0), and the forward bounds over them leave thousands of neurons
    unstable, so that cap kept CROWN from ever running on them. On
    the QUICK demo's bag (a network of ~126,000 such neurons: a share of 0.08 is ~10,100),
    the in-range frames left unproved had 3,600-14,400 unstable neurons under forward
    bounds and bounds of 130-5,400 px; with CROWN, 8 of their 9 distinct frames prove (6
    in one box, at 0.3-1.5 px), all with at most 9,400. The one with 14,400 and frames far
    outside the range (dusk at contrast <= 0.69, glare, a lens cap: 11,000-73,000) stayed
    unproved at 15-30 s per CROWN box, hence the share (docs/METHOD.md). The budget stays
    counted in work. On the demo's goal box the share changes little (56.2 -> 56.6 % of the
    in-range frames): its hidden values span intervals too wide for CROWN.
    """
    neurons = sum(math.prod(graph.nodes[r].shape) for r in graph.relu_indices
                  if not graph.nodes[r].name.startswith("clip."))
    return BabConfig(bounds=BoundOptions(crown_max_unstable=int(crown_share * neurons)))


@dataclass(frozen=True)
class FrameProofConfig:
    """What a per-frame proof covers and how much work it may take.

    ``lighting``: the range R of lighting changes (a0, b0) from nominal to the frame that
    the proof covers; ``delta``: the keypoint bound in network-input pixels (the
    certificate's); ``max_boxes``: the branch-and-bound budget per frame (work, not time).
    ``camera_rounding``: add each pixel's rounding error (q/2 before inversion) to the set.
    Sound for the rounding too, but the set then holds an L-inf ball around the frame that
    an ordinarily trained network is not robust to provably: on the demo model the bound
    grows from ~0.8 px to ~4000 px at +-3 %. Off by default: the stated model is then the
    frame being exactly clip(a0 X0 + b0) (sensor noise and rounding not modelled), like
    the offline certificate.
    """

    lighting: PhotometricBox
    delta: float
    norm: Norm = Norm.LINF
    max_boxes: int = 16
    max_depth: int = 6
    camera_rounding: bool = False
    bab: BabConfig | None = None  # None: frame_bab_config(graph)


@dataclass(frozen=True)
class FrameProof:
    status: Status
    deviation_px: float  # largest proven deviation from the served keypoints, network px (inf if none)
    boxes: int
    detail: str = ""

    @property
    def certified(self) -> bool:
        return self.status is Status.CERTIFIED


# A frame outside the stated model is not certified: the promise would hold vacuously,
# but its assumption is what fails.
_IMPOSSIBLE = ("not proved: no nominal image in [0, 1] gives this frame under a lighting change in the range "
               "(its darkest and brightest pixels and the range's brightness rule every one out)")


_OUTSIDE_UNIT = ("not proved: float pixels from {low:.4g} to {high:.4g}, outside [0, 1]: the frame is not "
                 "clip(a x + b, 0, 1) of any nominal image")


class FrameCertifier:
    """Proves per frame that the served keypoints hold under the lighting range."""

    def __init__(self, graph: Graph, preprocess: PreprocessConfig, config: FrameProofConfig):
        if graph.input_shape[0] != 1 or not config.lighting.a_lo > 0:
            raise CertificationError("per-frame proofs need a one-channel network and contrast > 0")
        self.graph = graph
        self.preprocess = preprocess
        self.config = config
        self.inverse = inverse_box(config.lighting)
        h, w = preprocess.input_height, preprocess.input_width
        bab = config.bab or frame_bab_config(graph)
        self._bab = replace(bab, max_depth=config.max_depth, max_boxes=config.max_boxes)
        self._size = (h, w)
        self._recent: OrderedDict[bytes, FrameProof] = OrderedDict()

    @classmethod
    def from_onnx(cls, path: Path | str, preprocess: PreprocessConfig, config: FrameProofConfig
                  ) -> FrameCertifier:
        from usn_offline.certify.onnx_lowering import lower_onnx

        return cls(lower_onnx(path), preprocess, config)

    @classmethod
    def for_bundle(cls, bundle: Bundle, max_boxes: int = 16, lighting: PhotometricBox | None = None
                   ) -> FrameCertifier:
        """Proofs for a bundle's own model, delta and norm; the lighting range defaults to
        the certificate's first certified box (what the offline proof established for the
        test images)."""
        if lighting is None:
            first = bundle.region[0]
            lighting = PhotometricBox(first.a_lo, first.a_hi, first.b_lo, first.b_hi)
        norm = Norm(bundle.certificate.get("norm", Norm.LINF.value))
        return cls.from_onnx(bundle.onnx_path, bundle.preprocess,
                             FrameProofConfig(lighting, bundle.delta_px, norm, max_boxes=max_boxes))

    # Proofs of the last few distinct (frame, keypoints) pairs, by content: a proof depends
    # on nothing else, and a still camera (or a stalled driver re-sending its last image)
    # sends the same frame many times; one proof then takes seconds to minutes.
    RECENT_PROOFS = 8

    def prove(self, frame: np.ndarray, keypoints_normalised: np.ndarray) -> FrameProof:
        """Prove for ``frame`` (as received) that the network's keypoints on its nominal
        image lie within delta (network px) of ``keypoints_normalised`` (the served output,
        (2K,) normalised). A frame and keypoints identical to one of the last
        :attr:`RECENT_PROOFS` get that proof again without recomputing it."""
        keypoints = np.ascontiguousarray(keypoints_normalised, np.float64)
        digest = hashlib.blake2b(np.ascontiguousarray(frame).tobytes(), digest_size=32)
        digest.update(f"{frame.dtype.str}{frame.shape}".encode())
        digest.update(keypoints.tobytes())
        key = digest.digest()
        if key in self._recent:
            self._recent.move_to_end(key)
            return self._recent[key]
        proof = self._prove(frame, keypoints)
        self._recent[key] = proof
        if len(self._recent) > self.RECENT_PROOFS:
            self._recent.popitem(last=False)
        return proof

    def _property(self, keypoints_normalised: np.ndarray) -> tuple[np.ndarray, PixelMap, KeypointProperty]:
        """The served keypoints in network-input pixels ((2K,) float64), the network outputs'
        map to those pixels, and the property a proof (or an attack) is about: every
        keypoint within delta of the served ones."""
        h, w = self._size
        graph = self.graph
        reference = normalised_to_pixels(np.asarray(keypoints_normalised, np.float64).reshape(-1, 2), h, w)
        pixels = PixelMap.for_image(reference.shape[0], h, w, graph.dtype, graph.device)
        prop = KeypointProperty(torch.as_tensor(reference.reshape(-1), dtype=graph.dtype, device=graph.device),
                                self.config.delta, self.config.norm)
        return reference.reshape(-1), pixels, prop

    def _prove(self, frame: np.ndarray, keypoints_normalised: np.ndarray) -> FrameProof:
        graph = self.graph
        if frame.dtype.kind == "f":
            light = _light_channels(frame)
            low, high = float(light.min()), float(light.max())
            if low < 0 or high > 1:  # no clip(a X0 + b, 0, 1) is: the stated model fails, not the network
                return FrameProof(Status.NOT_CERTIFIED, math.inf, 0, _OUTSIDE_UNIT.format(low=low, high=high))
        sets = FramePixelSets.of_frame(frame, self.preprocess, self.config.lighting, self.config.camera_rounding)
        root = sets.for_boxes(Boxes.from_boxes([self.inverse], graph.dtype, graph.device))
        ref, pixels, prop = self._property(keypoints_normalised)
        outcome = certify_boxes(graph, root, prop, pixels, [self.inverse], self._bab, sets)[0]
        dev = float(np.maximum(ref - np.asarray(outcome.lower), np.asarray(outcome.upper) - ref).max())
        if not dev > -math.inf:  # every box, the root too, was ruled out: nothing was bounded
            return FrameProof(Status.NOT_CERTIFIED, math.inf, outcome.boxes_bounded, _IMPOSSIBLE)
        status, detail = outcome.status, ""
        if status is Status.FALSIFIED:
            moved = self._confirm(frame, outcome.counterexample, prop, pixels)
            if moved is None:  # a point of the over-approximating set, not a real nominal image
                status = Status.NOT_CERTIFIED
            else:
                a, b = outcome.counterexample
                detail = (f"falsified: the nominal image clip({a:.4g} x + {b:.4g}) of this frame, which it is "
                          f"under a lighting change in the range, moves a keypoint by {moved:.3g} px (network input)")
        if status is Status.NOT_CERTIFIED:
            detail = (f"not proved: bound {dev:.3g} px > delta {self.config.delta:g} px (network input) after "
                      f"{outcome.boxes_bounded} of {self.config.max_boxes} boxes")
        return FrameProof(status, dev, outcome.boxes_bounded, detail)

    def attack(self, frame: np.ndarray, keypoints_normalised: np.ndarray, grid: int = 5, restarts: int = 4,
               steps: int = 40) -> float:
        """The largest deviation (network px) from the served ``keypoints_normalised`` that
        signed gradient steps on the frame's hidden values find: at a ``grid`` x ``grid``
        lattice of points (a, b) of the inverse range where the frame arises, each network
        pixel's value moves within its interval of the set (from the intervals' middles,
        then from random points). A lower bound on what the proof bounds from above, so
        never above a proof's ``deviation_px``; -inf where the frame arises nowhere.

        Above delta it says that the frame is breakable by a member of its set, if the set
        is exact there: it treats network pixels as independent, while the resize couples
        neighbours through shared frame pixels (bench/frame_gap.py; docs/METHOD.md)."""
        graph = self.graph
        sets = FramePixelSets.of_frame(frame, self.preprocess, self.config.lighting, self.config.camera_rounding)
        root = sets.restrict(Boxes.from_boxes([self.inverse], graph.dtype, graph.device))
        _, pixels, prop = self._property(keypoints_normalised)
        axes = [torch.linspace(float(lo[0]), float(hi[0]), grid, dtype=graph.dtype, device=graph.device)
                for lo, hi in ((root.a_lo, root.a_hi), (root.b_lo, root.b_hi))]
        a, b = axes[0].repeat_interleave(grid), axes[1].repeat(grid)
        arising = sets.restrict(Boxes(a, a, b, b))
        keep = ((arising.a_lo <= arising.a_hi) & (arising.b_lo <= arising.b_hi)).nonzero().flatten()
        if not keep.numel():
            return -math.inf
        points = Boxes(a[keep], a[keep], b[keep], b[keep])
        planes = sets.for_boxes(points)
        shape = (len(points), 1, *planes.shape[2:])
        best = -math.inf
        for start in range(restarts):
            generator = torch.Generator().manual_seed(start)
            # Where each hidden value sits in its interval (Graph.evaluate's ``fill``).
            fill = (torch.rand(shape, generator=generator, dtype=graph.dtype).to(graph.device) if start
                    else torch.full(shape, 0.5, dtype=graph.dtype, device=graph.device))
            step = 0.25
            for k in range(steps + 1):
                fill.requires_grad_(k < steps)
                with torch.enable_grad():
                    deviation = prop.deviation(pixels(graph.evaluate(planes, points.a_lo, points.b_lo, fill)))
                best = max(best, float(deviation.detach().max()))
                if k == steps:
                    break
                (grad,) = torch.autograd.grad(deviation.sum(), fill)
                fill = (fill.detach() + step * grad.sign()).clamp(0.0, 1.0)
                step = step * 0.93
        return best

    def _confirm(self, frame: np.ndarray, point: tuple[float, float] | None, prop: KeypointProperty,
                 pixels: PixelMap) -> float | None:
        """The keypoint deviation of the explicit nominal image X0 = clip(a X + b) at a
        counterexample (a, b) of the pixel set, when X0 really gives this frame under the
        lighting change (1/a, -b/a) (frame == clip(X0 / a - b / a) up to float rounding)
        and violates the property; else None."""
        if point is None:
            return None
        a, b = point
        observed = _light_channels(frame) / full_scale(frame.dtype)
        nominal = np.clip(a * observed + b, 0.0, 1.0)
        if np.abs(np.clip(nominal / a - b / a, 0.0, 1.0) - observed).max() > 1e-9:
            return None
        x0 = torch.from_numpy(_network_input(nominal, self.preprocess))
        one = torch.ones(1, dtype=self.graph.dtype, device=self.graph.device)
        with torch.no_grad():
            out = pixels(self.graph.evaluate(x0.to(self.graph.device, self.graph.dtype)[None, None], one, one - 1))
        deviation = float(prop.deviation(out)[0])
        return deviation if bool(prop.violates(torch.tensor([deviation]))[0]) else None


def background_process() -> None:
    """Make this process a background prover beside a serving one (the node's proof
    process, runtime/proof_process.py): the lowest CPU priority (nice 19 and Linux's
    SCHED_IDLE policy, under which any other task that wants the core preempts it), and
    torch's work on one thread. Proofs then take spare CPU only and do not slow the frames
    being served (bench/node_bench.py)."""
    torch.set_num_threads(1)
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not permitted: the priority stays
        os.setpriority(os.PRIO_PROCESS, 0, 19)
    with contextlib.suppress(AttributeError, OSError):  # each setting on its own: one may fail alone
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def make_verifier(bundle: Bundle, enabled: bool, max_boxes: int, lighting: tuple[float, ...] = (0.0,) * 4
                  ) -> FrameCertifier | None:
    """The per-frame prover the node and the replay use (None when ``enabled`` is off);
    ``lighting`` (contrast min, max, brightness min, max), all zero: the certificate's box."""
    if not enabled:
        return None
    box = bundle.lighting_range(lighting)
    return FrameCertifier.for_bundle(bundle, max_boxes, PhotometricBox(box.a_lo, box.a_hi, box.b_lo, box.b_hi))
