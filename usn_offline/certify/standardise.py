"""Sound input sets through a per-image standardisation z = (x - mean x) / sqrt(var x + eps).

A network that standardises its input first is exactly invariant to x -> a x + b (a > 0)
wherever no pixel clips; only the clipped pixels (and eps) move its input. This module
turns a box of (a, b) over an image — or over a frame's pixel set — into a set of
*standardised* inputs that the bound engine handles as it handles any pixel set:

    z = A d + B + v,   A in [A_lo, A_hi], B in [B_lo, B_hi], v_i in [v_lo_i, v_hi_i],

with d the nominal image minus its mean plus a midpoint of t (below; signed) — for
frames' pixel sets. For plain
images :func:`clip_level_sets` refines it: the clipped pixels' values are shared
parameters of the box instead of independent intervals (much tighter). Derivation, with
n pixels and P the centring projection (P y = y - mean y). Every input before standardisation has the form

    x = a (u + t) + (a constant),

u known per pixel and t_i a per-pixel quantity in an interval over the box:

- an image under clip(a x0 + b): u = x0, t = c / a with c = clip(a x0 + b) - (a x0 + b)
  the clipping residual (zero on pixels that do not clip), and the constant is b;
- a pixel set a u + b m + c (:func:`~usn_offline.certify.ops.input_terms`):
  t = (c - b (1 - m)) / a, constant b.

Then x - mean x = a P(u + t), var x = a^2 s^2 with s = ||P(u + t)|| / sqrt(n), and

    z = P(u + t) / sqrt(s^2 + eps / a^2) = A (P u + t - mean t),  A = 1 / sqrt(s^2 + eps / a^2),

so B = -A mean(t), and with t_m a point of t's interval (the box centre's),
z = A (P u + t_m) + B + v, v = A (t - t_m): the shared scale carries t_m, only t's
deviation from it is free per pixel. s is bounded around t_m by the triangle
inequality (||P y|| <= ||y||): |s - s_m| <= ||t - t_m|| / sqrt(n). The intervals of A, B and
v are taken independently (sound; they are small on the sub-boxes branch and bound makes),
and widened outward for float rounding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from usn_offline.certify.boxes import Boxes
from usn_offline.certify.errors import CertificationError
from usn_offline.certify.ops import input_terms

if TYPE_CHECKING:  # graph.py imports this module
    from usn_offline.certify.graph import Graph

# Relative outward widening of the set's intervals: covers float64 rounding of the sums
# over an image (~n * 1e-16 for n <= 1e5 pixels) with room to spare.
_ROUNDING = {torch.float64: 1e-10, torch.float32: 1e-5}


@dataclass(frozen=True)
class Standardise:
    """The network's first step, z = (x - mean) / sqrt(var + eps) per image and channel
    (torch's ``InstanceNorm2d(affine=False)``, ONNX's InstanceNormalization with scale 1
    and bias 0). ``clip``: for plain images, the input before it is clip(a x + b, 0, 1)."""

    eps: float
    clip: bool = True

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(2, 3), keepdim=True)
        var = (x - mean).pow(2).mean(dim=(2, 3), keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps)


def _interval_product(lo: torch.Tensor, hi: torch.Tensor, s_lo: torch.Tensor, s_hi: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The interval product [lo, hi] * [s_lo, s_hi] (all four end products; broadcast)."""
    ends = torch.stack(torch.broadcast_tensors(lo * s_lo, lo * s_hi, hi * s_lo, hi * s_hi))
    return ends.min(dim=0).values, ends.max(dim=0).values


def _clip_residual_over_a(x0: torch.Tensor, boxes: Boxes, view: tuple[int, ...]
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bounds and box-centre value of t = (clip(a x0 + b) - (a x0 + b)) / a per pixel.

    t = relu(-x0 - b/a) - relu(x0 - (1 - b)/a): nonincreasing in q = b/a and nondecreasing
    in r = (1 - b)/a, whose ranges over a box (a > 0) are attained at its corners."""
    a_c, b_c = boxes.corners()
    q, r = b_c / a_c, (1 - b_c) / a_c
    q_lo, q_hi = q.min(dim=1).values.view(view), q.max(dim=1).values.view(view)
    r_lo, r_hi = r.min(dim=1).values.view(view), r.max(dim=1).values.view(view)

    def t_of(q_: torch.Tensor, r_: torch.Tensor) -> torch.Tensor:
        return torch.relu(-x0 - q_) - torch.relu(x0 - r_)

    a_m, b_m = boxes.centres()
    t_mid = t_of((b_m / a_m).view(view), ((1 - b_m) / a_m).view(view))
    return t_of(q_hi, r_lo), t_of(q_lo, r_hi), t_mid


def clip_level_sets(standardise: Standardise, images: torch.Tensor, boxes: Boxes) -> tuple[torch.Tensor, Boxes]:
    """Input sets (B, 6, H, W) with boxes of (A, B) and two extra parameters that cover the
    standardised clip(a x0 + b) over each box of one-channel images (N, 1, H, W).

    Exactly, z_i = A (y_i - m0) + B with m0 = mean x0, y_i = clamp(x0_i, -q, r),
    q = b / a, r = (1 - b) / a (module docstring: y = x0 + t). Per box each pixel is
    unclipped throughout (z = A d_i + B), clipped bright throughout (z = g_H = A (r - m0) + B,
    one value shared by all of them), clipped dark throughout (g_L = A (-q - m0) + B,
    shared), or switching (y_i in an interval). A, B, g_H and g_L are the box's four
    parameters — (a, b) slots and two extra ones — so the common movement of all clipped
    pixels stays one degree of freedom instead of independent noise on each of them; only
    switching pixels (a thin band of grey levels per box) get an interval of their own."""
    n_boxes, dtype = len(boxes), images.dtype
    rel = _ROUNDING.get(dtype, 1e-5)
    view = (-1, 1, 1, 1)
    dims = (2, 3)
    x0 = images.expand(n_boxes, *images.shape[1:])
    big_a, big_a_hi, (b_set_lo, b_set_hi), _, _ = _scale_and_shift(standardise, images, boxes)
    m0 = x0.mean(dim=dims, keepdim=True)
    a_c, b_c = boxes.corners()
    q, r = b_c / a_c, (1 - b_c) / a_c
    q_lo, q_hi = q.min(dim=1).values.view(view), q.max(dim=1).values.view(view)
    r_lo, r_hi = r.min(dim=1).values.view(view), r.max(dim=1).values.view(view)
    pad = lambda t: rel * (1 + t.abs())  # noqa: E731

    def level(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A (level - m0) + B over the box's intervals, rounded outward."""
        p_lo, p_hi = _interval_product(lo - m0, hi - m0, big_a, big_a_hi)
        lo_, hi_ = p_lo + b_set_lo, p_hi + b_set_hi
        return lo_ - pad(lo_), hi_ + pad(hi_)

    g_hi = level(r_lo, r_hi)
    g_lo = level(-q_hi, -q_lo)
    d = x0 - m0
    zero, one = torch.zeros_like(x0), torch.ones_like(x0)
    if standardise.clip:
        w_lo = boxes.a_lo.view(view) * x0 + boxes.b_lo.view(view)
        w_hi = boxes.a_hi.view(view) * x0 + boxes.b_hi.view(view)
        bright, dark = w_lo >= 1, w_hi <= 0
        may_bright, may_dark = (w_hi >= 1) & ~bright, (w_lo <= 0) & ~dark
    else:
        bright = dark = may_bright = may_dark = torch.zeros_like(x0, dtype=torch.bool)
    both = may_bright & may_dark
    to_bright, to_dark = may_bright & ~both, may_dark & ~both
    # A pixel that may clip bright is z = min(u, g_H), u = A d_i + B: u - g_H = A (x0_i - r)
    # in [l, h]; min(u, g_H) = u - relu(u - g_H) lies in (1 - lam) u + lam g_H + [lam min(l, 0), 0]
    # with lam the chord slope h / (h - l) (0 or 1 when the sign is fixed). Dark alike:
    # z = max(u, g_L) = u + relu(g_L - u), g_L - u = A (-q - x0_i).
    lam_b, low_b = _chord(*_interval_product(x0 - r_hi, x0 - r_lo, big_a, big_a_hi))
    lam_d, low_d = _chord(*_interval_product(-q_hi - x0, -q_lo - x0, big_a, big_a_hi))
    # Pixels that may clip both ways (only in very wide boxes): y_i in an interval.
    y_lo = torch.minimum(torch.maximum(x0, -q_hi), r_lo)
    y_hi = torch.minimum(torch.maximum(x0, -q_lo), r_hi)
    y_mid = (y_lo + y_hi) / 2
    s_lo, s_hi = _interval_product(y_lo - y_mid, y_hi - y_mid, big_a, big_a_hi)
    unclipped = ~(bright | dark | may_bright | may_dark)
    weight = torch.where(to_bright, 1 - lam_b, torch.where(to_dark, 1 - lam_d, one))  # of u
    x_plane = torch.where(unclipped | to_bright | to_dark, weight * d, torch.where(both, y_mid - m0, zero))
    m_plane = torch.where(unclipped | to_bright | to_dark, weight, both.to(dtype))
    bright_plane = torch.where(bright, one, torch.where(to_bright, lam_b, zero))
    dark_plane = torch.where(dark, one, torch.where(to_dark, lam_d, zero))
    c_lo = torch.where(both, s_lo, torch.where(to_bright, lam_b * low_b.clamp(max=0), zero))
    c_hi = torch.where(both, s_hi, torch.where(to_dark, -lam_d * low_d.clamp(max=0), zero))
    # Rounding of d, y, the slopes and products, times A: a small outward margin everywhere.
    margin = rel * (1 + big_a_hi * (1 + x_plane.abs()) + c_hi.abs() + c_lo.abs())
    planes = torch.cat([x_plane, m_plane, c_lo - margin, c_hi + margin, bright_plane, dark_plane], dim=1)
    flat = lambda t: t.reshape(n_boxes)  # noqa: E731
    extra_lo = torch.stack([flat(g_hi[0]), flat(g_lo[0])], dim=1)
    extra_hi = torch.stack([flat(g_hi[1]), flat(g_lo[1])], dim=1)
    return planes, Boxes(flat(big_a), flat(big_a_hi), flat(b_set_lo), flat(b_set_hi), extra_lo, extra_hi)


def _chord(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(slope, low) of relu over [low, high]: relu(s) in [slope s, slope s - slope min(low, 0)]."""
    slope = torch.where(low >= 0, torch.ones_like(low),
                        torch.where(high <= 0, torch.zeros_like(low), high / (high - low).clamp(min=1e-300)))
    return slope.clamp(0, 1), low


def _scale_and_shift(standardise: Standardise, images: torch.Tensor, boxes: Boxes) -> tuple:
    """(A_lo, A_hi, (B_lo, B_hi), (t_lo, t_hi, t_mid), u), A and B of shape (B, 1, 1, 1),
    for plain images (N, 1, H, W) under clip(a x + b) (a x + b without ``clip``) or pixel
    sets (N, 4, H, W) (module docstring)."""
    if images.shape[1] not in (1, 4):
        raise CertificationError(f"input standardisation is bounded for one-channel networks; the input has "
                                 f"{images.shape[1]} planes")
    n_boxes, dtype = len(boxes), images.dtype
    view = (-1, 1, 1, 1)
    a_lo, a_hi = boxes.a_lo.view(view), boxes.a_hi.view(view)
    a_m, b_m = (t.view(view) for t in boxes.centres())
    if images.shape[1] == 1:
        u = images
        if standardise.clip:
            t_lo, t_hi, t_mid = _clip_residual_over_a(u, boxes, view)
        else:
            t_lo = t_hi = t_mid = torch.zeros((n_boxes, *u.shape[1:]), dtype=dtype, device=u.device)
    else:
        u, m, c_lo, c_hi = input_terms(images, 1)
        off = 1 - m  # >= 0 up to rounding; the interval arithmetic below does not rely on it
        b_lo, b_hi = boxes.b_lo.view(view), boxes.b_hi.view(view)
        num_lo = c_lo - torch.maximum(b_lo * off, b_hi * off)
        num_hi = c_hi - torch.minimum(b_lo * off, b_hi * off)
        t_lo, t_hi = _interval_product(num_lo, num_hi, 1 / a_hi, 1 / a_lo)
        t_mid = ((c_lo + c_hi) / 2 - b_m * off) / a_m
    return _scale_and_shift_of(standardise, u, t_lo, t_hi, t_mid, boxes)


def _scale_and_shift_of(standardise: Standardise, u: torch.Tensor, t_lo: torch.Tensor, t_hi: torch.Tensor,
                        t_mid: torch.Tensor, boxes: Boxes) -> tuple:
    """:func:`_scale_and_shift` from the inputs' form x = a (u + t) + b, t in [t_lo, t_hi]
    per pixel over each box (module docstring); ``t_mid``: any point of that interval."""
    # Both entry points come here (t itself divides by a on the plain-image path).
    if not bool((boxes.a_lo > 0).all()):
        raise CertificationError("bounds through input standardisation need contrast a > 0 in every box")
    n_boxes, dtype = len(boxes), u.dtype
    view = (-1, 1, 1, 1)
    rel = _ROUNDING.get(dtype, 1e-5)
    a_lo, a_hi = boxes.a_lo.view(view), boxes.a_hi.view(view)
    u = u.expand(n_boxes, *u.shape[1:])
    t_lo, t_hi, t_mid = (t.expand(n_boxes, *u.shape[1:]) for t in (t_lo, t_hi, t_mid))
    n = u.shape[2] * u.shape[3]
    root_n = n ** 0.5
    dims = (2, 3)
    d = u - u.mean(dim=dims, keepdim=True)
    centred = d + t_mid - t_mid.mean(dim=dims, keepdim=True)
    s_mid = centred.pow(2).sum(dim=dims, keepdim=True).sqrt()
    radius = torch.maximum(t_hi - t_mid, t_mid - t_lo).clamp(min=0).pow(2).sum(dim=dims, keepdim=True).sqrt()
    s_lo = ((s_mid - radius) * (1 - rel) / root_n).clamp(min=0)
    s_hi = (s_mid + radius) * (1 + rel) / root_n
    # And per pixel: n s^2 = sum (d_i + t_i)^2 - n mean(t)^2 (sum d = 0), each term over its
    # own interval; the two bounds are sound, so is their intersection (often far tighter).
    q_lo, q_hi = (d + t_lo).pow(2), (d + t_hi).pow(2)
    q_max = torch.maximum(q_lo, q_hi).sum(dim=dims, keepdim=True)
    straddle = (d + t_lo <= 0) & (d + t_hi >= 0)
    q_min = torch.where(straddle, torch.zeros_like(q_lo), torch.minimum(q_lo, q_hi)).sum(dim=dims, keepdim=True)
    m_lo, m_hi = t_lo.mean(dim=dims, keepdim=True), t_hi.mean(dim=dims, keepdim=True)
    sq_max = torch.maximum(m_lo.pow(2), m_hi.pow(2))
    sq_min = torch.where((m_lo <= 0) & (m_hi >= 0), torch.zeros_like(m_lo), torch.minimum(m_lo.pow(2), m_hi.pow(2)))
    s_lo = torch.maximum(s_lo, ((q_min / n - sq_max).clamp(min=0)).sqrt() * (1 - rel))
    s_hi = torch.minimum(s_hi, ((q_max / n - sq_min).clamp(min=0)).sqrt() * (1 + rel))
    eps = standardise.eps
    big_a = (1 / torch.sqrt(s_hi ** 2 + eps / a_lo ** 2)) * (1 - rel)
    small_s = s_lo ** 2 + eps / a_hi ** 2
    if not bool((small_s > 0).all()):
        raise CertificationError("bounds through input standardisation: the image's spread can reach zero "
                                 "and eps is zero")
    big_a_hi = (1 / torch.sqrt(small_s)) * (1 + rel)
    p_lo, p_hi = _interval_product(m_lo, m_hi, big_a, big_a_hi)
    pad = lambda t: rel * (1 + t.abs())  # noqa: E731
    shift = (-p_hi - pad(p_hi), -p_lo + pad(p_lo))
    return big_a, big_a_hi, shift, (t_lo, t_hi, t_mid), u


def standardised_sets(standardise: Standardise, images: torch.Tensor, boxes: Boxes
                      ) -> tuple[torch.Tensor, Boxes]:
    """The pixel sets (B, 4, H, W) and boxes of (A, B) whose members cover the standardised
    network input of every (a, b) of each box (module docstring), for a one-channel
    network: z = A d + B + v, v_i = A t_i in an interval per pixel. ``images``: (N, 1, H, W)
    plain images or (N, 4, H, W) pixel sets, N = 1 or B. For plain images
    :func:`clip_level_sets` is tighter (clipped pixels share their movement)."""
    return _sets_of(standardise, *_scale_and_shift(standardise, images, boxes), boxes)


def standardised_sets_of(standardise: Standardise, u: torch.Tensor, t_lo: torch.Tensor, t_hi: torch.Tensor,
                         boxes: Boxes) -> tuple[torch.Tensor, Boxes]:
    """As :func:`standardised_sets`, for inputs given in the form x = a (u + t) + b with
    t_i in [t_lo_i, t_hi_i] over each box ((B or 1, 1, H, W) each): a caller that knows
    how its set depends on (a, b) can give t far tighter than the interval arithmetic on
    a x + b m + c does (a frame's pixel sets, ``certify.frame.FramePixelSets``)."""
    if u.shape[1] != 1:
        raise CertificationError(f"input standardisation is bounded for one-channel networks; the input has "
                                 f"{u.shape[1]} planes")
    t_mid = (t_lo + t_hi) / 2
    return _sets_of(standardise, *_scale_and_shift_of(standardise, u, t_lo, t_hi, t_mid, boxes), boxes)


def _sets_of(standardise: Standardise, big_a: torch.Tensor, big_a_hi: torch.Tensor, shift: tuple,
             t: tuple, u: torch.Tensor, boxes: Boxes) -> tuple[torch.Tensor, Boxes]:
    """The planes and boxes of :func:`standardised_sets` from :func:`_scale_and_shift`'s output."""
    (b_set_lo, b_set_hi), (t_lo, t_hi, t_mid) = shift, t
    n_boxes, rel = len(boxes), _ROUNDING.get(u.dtype, 1e-5)
    # z = A (d + t_mid) + B + A (t - t_mid): the scale A, shared by every pixel, carries
    # t's midpoint, and only t's deviation from it is free per pixel. Its interval
    # A [t_lo - t_mid, t_hi - t_mid] is never wider than A [t_lo, t_hi] (narrower by
    # |t| (A_hi - A_lo) where t keeps a sign: on a blown pixel, t ~ 1), and the bounds
    # keep A's dependence exactly (it is a parameter of the set, not per-pixel noise).
    d = u - u.mean(dim=(2, 3), keepdim=True) + t_mid
    v_lo, v_hi = _interval_product(t_lo - t_mid, t_hi - t_mid, big_a, big_a_hi)
    pad = lambda t: rel * (1 + t.abs())  # noqa: E731
    d_abs_err = rel * (1 + d.abs())  # rounding of d itself, times A (<= A_hi) on the way in
    v_lo, v_hi = v_lo - pad(v_lo) - d_abs_err * big_a_hi, v_hi + pad(v_hi) + d_abs_err * big_a_hi
    planes = torch.cat([d, torch.ones_like(d), v_lo, v_hi], dim=1)
    flat = lambda t: t.reshape(n_boxes)  # noqa: E731
    return planes, Boxes(flat(big_a), flat(big_a_hi), flat(b_set_lo), flat(b_set_hi))


def body_of(graph: Graph) -> Graph:
    """The graph without its standardisation (cached): the network the sets feed."""
    cache = graph.__dict__.setdefault("_body_cache", {})
    if "body" not in cache:
        cache["body"] = dataclasses.replace(graph, standardise=None)
    return cache["body"]


def bound_inputs(graph: Graph, images: torch.Tensor, boxes: Boxes) -> tuple[Graph, torch.Tensor, Boxes]:
    """(graph, images, boxes) as the bound propagation takes them: unchanged, or for a
    standardising graph its body with the standardised input sets and their boxes."""
    if graph.standardise is None:
        return graph, images, boxes
    if images.shape[1] == 1:
        sets, set_boxes = clip_level_sets(graph.standardise, images, boxes)
    else:
        sets, set_boxes = standardised_sets(graph.standardise, images, boxes)
    return body_of(graph), sets, set_boxes
