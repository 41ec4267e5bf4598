"""Procedural, GenEval-style quality metric for the captioned-shapes dataset (``training.data``).

The metric can fail: a caption is parsed into a :class:`Spec`, objects are detected in the image
with a small classical detector, and every stated property is checked.

Detector (:func:`detect`), pure numpy (+ the dataset's own SDF renderer for shape templates):
  1. background = mean of the most common colour bin among the border pixels;
  2. foreground = pixels whose 3x3-smoothed colour distance to the background exceeds a threshold
     (0.4x the smallest palette-to-background distance, >= 24);
  3. 4-connected components (vectorised min-label propagation with pointer jumping); components
     smaller than 0.5% of the image are dropped as noise;
  4. per component: local background = median of a ring around it; object colour = median of its
     most saturated pixels, classified to the nearest palette colour; soft coverage ``alpha`` =
     projection of each pixel onto the background->object colour line (blur- and AA-invariant area);
  5. area = sum(alpha) -> size (threshold at the geometric mean of the two nominal areas; all
     shapes are equal-area per size), centre = alpha centroid;
  6. shape = analysis by synthesis: each of the 6 shapes is rendered (numpy SDF) at the detected
     centre with the detected area, at scales 0.9/1.0/1.1 and blurred by 0/1/1.8 px, and the shape
     with the best soft IoU wins.

Checks (:func:`score`): count (exactly as many objects as stated), colours, shapes, sizes (where
stated), positions (single-object position phrase and pairwise relations, see ``training.data``),
background. ``correct`` = all checks pass (strict). Objects are matched to detections by the
assignment that satisfies the most checks.

Diversity (:func:`diversity`): mean over image pairs of the RMS pixel difference / 255 (0 for
identical images, ~0.3-0.5 for unrelated ones). :func:`diversity_report` adds the spread of the
detected object centres (mean distance of each image's largest-object centre to their mean).

Video (:func:`video_metrics`): identity consistency across chunk boundaries, per-frame adherence
to the caption's object set, motion direction accuracy (bounces at walls allowed) and colour-change
accuracy.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from dataclasses import dataclass, field

import numpy as np

from fewstep.training import data as D

__all__ = [
    "ObjSpec", "Spec", "Detection", "parse_caption", "detect", "estimate_background", "score",
    "adherence", "diversity", "diversity_report", "video_metrics", "self_check", "video_self_check",
    "degrade",
]

_PALETTE_NAMES = list(D.COLORS)
_PALETTE = np.array([D.COLORS[c] for c in _PALETTE_NAMES], dtype=np.float32)
_BG_NAMES = list(D.BACKGROUNDS)
_BG_PALETTE = np.array([D.BACKGROUNDS[b] for b in _BG_NAMES], dtype=np.float32)
_SIZE_THRESHOLD = math.sqrt(D.SIZE_RADIUS["small"] * D.SIZE_RADIUS["large"])  # eq. radius

# --------------------------------------------------------------------------------------------
# Caption parsing
# --------------------------------------------------------------------------------------------


@dataclass
class ObjSpec:
    shape: str
    color: str
    size: str | None = None          # None: size not stated
    position: str | None = None      # single-object position phrase
    motion: str | None = None        # video: direction of motion ("left"/"right"/"up"/"down")
    turn_to: str | None = None       # video: colour it turns into


@dataclass
class Spec:
    objects: list[ObjSpec]
    relations: list[tuple[int, str, int]] = field(default_factory=list)  # (i, rel, j): i REL j
    background: str | None = None


_POS_PHRASES = {tuple(p.split()): k for k, p in D.POSITION_PHRASES.items()}
_REL_PHRASES = {tuple(r.split()): r for r in D.RELATIONS}


def parse_caption(caption: str) -> Spec:
    """Parse a caption of the ``training.data`` grammar. Raises ValueError if it does not parse."""
    toks = caption.lower().replace(",", " ").split()
    background = None
    if len(toks) >= 4 and toks[-1] == "background" and toks[-3] in ("a", "an") and toks[-4] == "on":
        background = toks[-2]
        if background not in D.BACKGROUNDS:
            raise ValueError(f"unknown background {background!r} in {caption!r}")
        toks = toks[:-4]
    i = 0
    objects: list[ObjSpec] = []
    relations: list[tuple[int, str, int]] = []

    def parse_obj() -> ObjSpec:
        nonlocal i
        if i >= len(toks) or toks[i] not in ("a", "an"):
            raise ValueError(f"expected 'a' at token {i} of {caption!r}")
        i += 1
        size = None
        if i < len(toks) and toks[i] in D.SIZES:
            size = toks[i]
            i += 1
        if i >= len(toks) or toks[i] not in D.COLORS:
            raise ValueError(f"expected a colour at token {i} of {caption!r}")
        color = toks[i]
        i += 1
        if i >= len(toks) or toks[i] not in D.SHAPES:
            raise ValueError(f"expected a shape at token {i} of {caption!r}")
        shape = toks[i]
        i += 1
        return ObjSpec(shape, color, size)

    def match(table: dict) -> str | None:
        nonlocal i
        for words, val in table.items():
            if tuple(toks[i:i + len(words)]) == words:
                i += len(words)
                return val
        return None

    objects.append(parse_obj())
    while i < len(toks):
        cur = len(objects) - 1
        pos = match(_POS_PHRASES)
        if pos is not None:
            objects[cur].position = pos
            continue
        if toks[i] == "which" and i + 1 < len(toks) and toks[i + 1] == "is":
            i += 2
            rel = match(_REL_PHRASES)
            if rel is None:
                raise ValueError(f"expected a relation after 'which is' in {caption!r}")
            objects.append(parse_obj())
            relations.append((cur, rel, cur + 1))
            continue
        rel = match(_REL_PHRASES)
        if rel is not None:
            objects.append(parse_obj())
            relations.append((cur, rel, cur + 1))
            continue
        if toks[i] == "moving" and i + 1 < len(toks) and toks[i + 1] in D.DIRECTIONS:
            objects[cur].motion = toks[i + 1]
            i += 2
            continue
        if toks[i] == "turning" and i + 1 < len(toks) and toks[i + 1] in D.COLORS:
            objects[cur].turn_to = toks[i + 1]
            i += 2
            continue
        if toks[i] == "and":
            i += 1
            objects.append(parse_obj())
            continue
        raise ValueError(f"unexpected token {toks[i]!r} in {caption!r}")
    return Spec(objects, relations, background)


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------


@dataclass
class Detection:
    shape: str
    color: str
    size: str
    cx: float                      # alpha centroid, [0, 1] image coordinates
    cy: float
    area: float                    # soft area as a fraction of the image
    bbox: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # x0, y0, x1, y1 in [0, 1]
    rgb: tuple[float, float, float] = (0.0, 0.0, 0.0)
    shape_iou: float = 0.0         # soft IoU of the best shape template


def estimate_background(image: np.ndarray) -> np.ndarray:
    """Robust background colour: per-channel median of the border pixels, refined as the median
    of the border pixels close to it (objects touching the border are ignored)."""
    img = np.asarray(image, dtype=np.float32)
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]], axis=0)
    bg = np.median(border, axis=0)
    d = np.sqrt(((border - bg) ** 2).sum(1))
    close = d <= max(30.0, 2.0 * float(np.median(d)))
    return np.median(border[close], axis=0) if close.any() else bg


def _box3(x: np.ndarray) -> np.ndarray:
    p = np.pad(x, 1, mode="edge")
    h, w = x.shape
    return sum(p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9.0


def _dilate(m: np.ndarray, it: int = 1) -> np.ndarray:
    for _ in range(it):
        p = np.pad(m, 1)
        h, w = m.shape
        m = p[1:h + 1, 1:w + 1] | p[0:h, 1:w + 1] | p[2:h + 2, 1:w + 1] | p[1:h + 1, 0:w] | p[1:h + 1, 2:w + 2]
        m = m | p[0:h, 0:w] | p[0:h, 2:w + 2] | p[2:h + 2, 0:w] | p[2:h + 2, 2:w + 2]
    return m


def _components(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels (0 = background) by min-label propagation + pointer jumping."""
    h, w = mask.shape
    big = h * w + 1
    idx = np.arange(1, h * w + 1).reshape(h, w)
    lab = np.where(mask, idx, big)
    while True:
        p = np.pad(lab, 1, constant_values=big)
        new = np.minimum.reduce([lab, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        new = np.where(mask, new, big)
        flat = new.ravel()
        # pointer jumping: a label is the index of a pixel of the same component
        jumped = np.where(mask.ravel(), flat[np.minimum(flat, big - 1) - 1], big).reshape(h, w)
        new = np.minimum(new, jumped)
        if np.array_equal(new, lab):
            break
        lab = new
    return np.where(mask, lab, 0)


def _nearest(rgb: np.ndarray, palette: np.ndarray) -> int:
    return int(np.argmin(((palette - rgb[None]) ** 2).sum(1)))


def detect(image: np.ndarray, min_area: float = 0.005, max_components: int = 16) -> list[Detection]:
    """Detect shapes in a uint8 ``[H, W, 3]`` image (square images; any resolution >= 32).

    Only the ``max_components`` largest foreground components are analysed (an image with more
    fails the count check anyway)."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected [H, W, 3], got {img.shape}")
    h, w, _ = img.shape
    side = math.sqrt(h * w)
    bg = estimate_background(img)
    min_pal = float(np.sqrt(((_PALETTE - bg[None]) ** 2).sum(1)).min())
    thr = max(24.0, 0.4 * min_pal)
    dist = np.sqrt(((img - bg) ** 2).sum(-1))
    # noise level from the border (robust): smooth the distance map more on noisy images
    border = np.concatenate([dist[0], dist[-1], dist[1:-1, 0], dist[1:-1, -1]])
    noise = float(np.median(border)) / 1.5          # ~ per-channel std for Gaussian noise
    sm = _box3(dist)
    if noise > 8.0:
        sm = _box3(sm)
    mask = sm > thr
    lab = _components(mask)
    ids, counts = np.unique(lab[lab > 0], return_counts=True)
    dets: list[Detection] = []
    any_fg = lab > 0
    yy, xx = np.mgrid[0:h, 0:w]
    order = np.argsort(-counts, kind="stable")[:max_components]   # bounded cost on garbage images
    for cid, cnt in zip(ids[order], counts[order]):
        if cnt < min_area * h * w:
            continue
        comp = lab == cid
        ys, xs = np.nonzero(comp)
        y0, y1 = max(ys.min() - 4, 0), min(ys.max() + 5, h)
        x0, x1 = max(xs.min() - 4, 0), min(xs.max() + 5, w)
        c_win = comp[y0:y1, x0:x1]
        other = any_fg[y0:y1, x0:x1] & ~c_win
        near = _dilate(c_win, 1) & ~_dilate(other, 1)
        ring = _dilate(c_win, 3) & ~_dilate(c_win, 1) & ~_dilate(other, 1)
        win = img[y0:y1, x0:x1]
        local_bg = np.median(win[ring], axis=0) if ring.sum() >= 8 else bg
        d = np.sqrt(((win - local_bg) ** 2).sum(-1))
        dc = d[c_win]
        core = c_win & (d >= 0.7 * np.percentile(dc, 90))
        rgb = np.median(win[core], axis=0)
        color = _PALETTE_NAMES[_nearest(rgb, _PALETTE)]
        # coverage is measured against the palette colour when the object is close to it: blur
        # lowers the peak colour of small shapes but preserves sum(alpha) w.r.t. the true colour
        pal = _PALETTE[_PALETTE_NAMES.index(color)]
        axis = (pal if float(np.sqrt(((pal - rgb) ** 2).sum())) < 60.0 else rgb) - local_bg
        denom = float((axis ** 2).sum())
        if denom < 1.0:
            continue
        alpha = np.clip(((win - local_bg) * axis).sum(-1) / denom, 0.0, 1.0) * near
        area_px = float(alpha.sum())
        if area_px < min_area * h * w:
            continue
        cy = float((alpha * (yy[y0:y1, x0:x1] + 0.5)).sum() / area_px) / h
        cx = float((alpha * (xx[y0:y1, x0:x1] + 0.5)).sum() / area_px) / w
        area = area_px / (h * w)
        r_eq = math.sqrt(area / math.pi)
        size = "small" if r_eq < _SIZE_THRESHOLD else "large"
        shape, iou = _classify_shape(alpha, (y0, y1, x0, x1), cx, cy, r_eq, h, w)
        on = alpha > 0.5
        oy, ox = np.nonzero(on) if on.any() else (ys - y0, xs - x0)
        bbox = ((ox.min() + x0) / w, (oy.min() + y0) / h, (ox.max() + x0 + 1) / w, (oy.max() + y0 + 1) / h)
        dets.append(Detection(shape, color, size, cx, cy, area, tuple(float(v) for v in bbox),
                              tuple(float(v) for v in rgb), iou))
    dets.sort(key=lambda d: -d.area)
    return dets


_SCALES = np.array([0.9, 1.0, 1.1], dtype=np.float32).reshape(-1, 1, 1)
_TEMPLATE_BLURS = (0.0, 1.0, 1.8)   # pixels; generated images are often softer than renders


def _blur2d(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over the last two axes (zero padding: templates vanish at edges)."""
    rad = max(1, int(math.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-rad, rad + 1) / sigma) ** 2)
    k /= k.sum()
    h, w = x.shape[-2:]
    p = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(rad, rad), (0, 0)])
    x = sum(k[i] * p[..., i:i + h, :] for i in range(2 * rad + 1))
    p = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, 0), (rad, rad)])
    return sum(k[i] * p[..., :, i:i + w] for i in range(2 * rad + 1))


def _classify_shape(alpha, win, cx, cy, r_eq, h, w) -> tuple[str, float]:
    """Soft IoU of the component's coverage against every shape rendered (numpy SDF) at the
    detected centre and area, over a few scales and blur levels; best shape wins."""
    y0, y1, x0, x1 = win
    size = max(h, w)
    xs = ((np.arange(x0, x1, dtype=np.float32) + 0.5) / w).reshape(1, 1, -1)
    ys = ((np.arange(y0, y1, dtype=np.float32) + 0.5) / h).reshape(1, -1, 1)
    tmpl = np.stack([D.shape_alpha_np(s, cx, cy, r_eq * _SCALES, xs, ys, size) for s in D.SHAPES])
    stacks = [tmpl] + [_blur2d(tmpl, sg) for sg in _TEMPLATE_BLURS if sg > 0]
    t = np.stack(stacks, axis=1)                      # [shape, blur, scale, h, w]
    a = alpha[None, None, None]
    inter = np.minimum(a, t).sum((-1, -2))
    union = np.maximum(a, t).sum((-1, -2)) + 1e-6
    iou = (inter / union).reshape(len(D.SHAPES), -1).max(1)
    k = int(np.argmax(iou))
    return D.SHAPES[k], float(iou[k])


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------

CHECKS = ("count", "colors", "shapes", "sizes", "positions", "background")


def position_of(cx: float, cy: float) -> str:
    dx, dy = cx - 0.5, cy - 0.5
    if max(abs(dx), abs(dy)) < 0.1:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def relation_holds(a: Detection, rel: str, b: Detection) -> bool:
    """``a REL b`` judged from the centre offset b - a (dominant axis and sign)."""
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if rel == "left of":
        return dx > abs(dy)
    if rel == "right of":
        return -dx > abs(dy)
    if rel == "above":
        return dy > abs(dx)
    if rel == "below":
        return -dy > abs(dx)
    raise ValueError(rel)


def _color_ok(o: ObjSpec, d: Detection) -> bool:
    return d.color == o.color or (o.turn_to is not None and d.color == o.turn_to)


def _assign(spec: Spec, dets: list[Detection]) -> list[Detection | None]:
    """Assignment of detections to caption objects satisfying the most checks."""
    n = len(spec.objects)
    cand: list[Detection | None] = list(dets[:8]) + [None] * n
    best, best_key = [None] * n, None
    seen = set()
    for perm in itertools.permutations(range(len(cand)), n):
        key_perm = tuple(p if p < len(cand) - n else -1 for p in perm)
        if key_perm in seen:
            continue
        seen.add(key_perm)
        a = [cand[p] for p in perm]
        s = 0
        for o, d in zip(spec.objects, a):
            if d is None:
                continue
            s += 1 + (d.shape == o.shape) + _color_ok(o, d) + (o.size is None or d.size == o.size)
            s += o.position is None or position_of(d.cx, d.cy) == o.position
        for i, rel, j in spec.relations:
            if a[i] is not None and a[j] is not None:
                s += relation_holds(a[i], rel, a[j])
        if best_key is None or s > best_key:
            best, best_key = a, s
    return best


def score(image: np.ndarray, caption: str | Spec, dets: list[Detection] | None = None) -> dict:
    """Strict GenEval-style check of one uint8 image against its caption."""
    spec = parse_caption(caption) if isinstance(caption, str) else caption
    if dets is None:
        dets = detect(image)
    a = _assign(spec, dets)
    matched = all(d is not None for d in a)
    res = {
        "count": len(dets) == len(spec.objects),
        "colors": matched and all(_color_ok(o, d) for o, d in zip(spec.objects, a)),
        "shapes": matched and all(d.shape == o.shape for o, d in zip(spec.objects, a)),
        "sizes": matched and all(o.size is None or d.size == o.size for o, d in zip(spec.objects, a)),
        "positions": matched
        and all(o.position is None or position_of(d.cx, d.cy) == o.position for o, d in zip(spec.objects, a))
        and all(relation_holds(a[i], rel, a[j]) for i, rel, j in spec.relations),
    }
    if spec.background is None:
        res["background"] = True
    else:
        bg = estimate_background(image)
        res["background"] = _BG_NAMES[_nearest(bg, _BG_PALETTE)] == spec.background
    res["correct"] = all(res[c] for c in CHECKS)
    res["n_detected"] = len(dets)
    return res


def _as_uint8_list(images) -> list[np.ndarray]:
    try:
        import torch
        if isinstance(images, torch.Tensor):
            images = D.to_uint8(images) if images.shape[1] == 3 else images.cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    return [np.asarray(im) for im in images]


def adherence(images, captions: list[str]) -> dict:
    """Accuracy (strict) and per-check pass rates over a set of images (uint8 [N,H,W,3], a list,
    or a float tensor [N,3,H,W] in [-1, 1])."""
    ims = _as_uint8_list(images)
    if len(ims) != len(captions):
        raise ValueError("images and captions differ in length")
    results = [score(im, c) for im, c in zip(ims, captions)]
    n = max(len(results), 1)
    out = {"accuracy": sum(r["correct"] for r in results) / n, "n": len(results)}
    for c in CHECKS:
        out[c] = sum(r[c] for r in results) / n
    return out


# --------------------------------------------------------------------------------------------
# Diversity
# --------------------------------------------------------------------------------------------


def diversity(images) -> float:
    """Mean pairwise RMS pixel distance / 255 between the images generated for one prompt
    (different seeds). 0 for identical images; ~0.3-0.5 for unrelated ones."""
    ims = np.stack(_as_uint8_list(images)).astype(np.float32) / 255.0
    n = ims.shape[0]
    if n < 2:
        return 0.0
    flat = ims.reshape(n, -1).astype(np.float64)
    d = [np.sqrt(np.mean((flat[i] - flat[j]) ** 2)) for i in range(n) for j in range(i + 1, n)]
    return float(np.mean(d))


def diversity_report(images) -> dict:
    """``pixel``: :func:`diversity`; ``center_spread``: mean distance (image fraction) of each
    image's largest detected object centre to their mean (0 when all in the same place)."""
    ims = _as_uint8_list(images)
    centres = []
    for im in ims:
        dets = detect(im)
        if dets:
            centres.append((dets[0].cx, dets[0].cy))
    spread = 0.0
    if len(centres) >= 2:
        c = np.array(centres)
        spread = float(np.sqrt(((c - c.mean(0)) ** 2).sum(1)).mean())
    return {"pixel": diversity(ims), "center_spread": spread, "n": len(ims)}


# --------------------------------------------------------------------------------------------
# Video metrics
# --------------------------------------------------------------------------------------------

_DIR = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}


def _blend_weight(rgb, c0: str, c1: str, tol: float = 40.0) -> float | None:
    """Position (0 = c0, 1 = c1) of ``rgb`` on the segment between two palette colours, or None
    if it is farther than ``tol`` from that segment (a colour-changing object mid-transition)."""
    a = np.asarray(D.COLORS[c0], dtype=np.float32)
    b = np.asarray(D.COLORS[c1], dtype=np.float32)
    p = np.asarray(rgb, dtype=np.float32)
    e = b - a
    t = float(np.clip(((p - a) * e).sum() / (e * e).sum(), 0.0, 1.0))
    return t if float(np.sqrt(((a + t * e - p) ** 2).sum())) <= tol else None


def _signature(spec: Spec, dets: list[Detection]) -> tuple:
    """Multiset of (shape, colour); a colour-changing object's colour (anywhere on its colour
    transition) is identified with its first colour."""
    sig = []
    for d in dets:
        col = d.color
        for o in spec.objects:
            if o.turn_to is not None and d.shape == o.shape and _blend_weight(d.rgb, o.color, o.turn_to) is not None:
                col = o.color
        sig.append((d.shape, col))
    return tuple(sorted(sig))


def _track(spec_obj: ObjSpec, per_frame: list[list[Detection]]) -> list[Detection | None]:
    """Follow one captioned object: candidates have its shape and its colour (or, for a
    colour-changing object, a colour on its transition); nearest to the previous position."""
    def fits(d: Detection) -> bool:
        if d.shape != spec_obj.shape:
            return False
        if spec_obj.turn_to is not None:
            return _blend_weight(d.rgb, spec_obj.color, spec_obj.turn_to) is not None
        return d.color == spec_obj.color

    track: list[Detection | None] = []
    prev = None
    for dets in per_frame:
        cands = [d for d in dets if fits(d)]
        if not cands:
            track.append(None)
            continue
        if prev is None:
            pick = max(cands, key=lambda d: d.color == spec_obj.color)
        else:
            pick = min(cands, key=lambda d: (d.cx - prev.cx) ** 2 + (d.cy - prev.cy) ** 2)
        track.append(pick)
        prev = pick
    return track


def _motion_accuracy(track: list[Detection | None], direction: str, eps: float = 0.003,
                     wall: float = 0.1) -> float:
    """Fraction of frame steps moving the expected way. The expected sign starts as captioned and
    may flip only when the object is within ``wall`` of the wall it was heading to (a bounce)."""
    axis, sign = _DIR[direction]
    ok = total = 0
    for a, b in zip(track[:-1], track[1:]):
        total += 1
        if a is None or b is None:
            continue
        da = (b.cx - a.cx, b.cy - a.cy)
        d, perp = da[axis], da[1 - axis]

        def near(det: Detection) -> bool:
            lo, hi = (det.bbox[0], det.bbox[2]) if axis == 0 else (det.bbox[1], det.bbox[3])
            return (1.0 - hi) < wall if sign > 0 else lo < wall

        if near(a) or near(b):
            ok += 1
            if d * sign < -eps:
                sign = -sign
            continue
        if d * sign > eps and abs(d) > abs(perp):
            ok += 1
    return ok / total if total else 0.0


def video_metrics(frames, caption: str, chunk_boundaries: list[int] = ()) -> dict:
    """Metrics for one video (uint8 ``[T, H, W, 3]``) against its caption.

    identity_consistency: fraction of chunk boundaries b (0 < b < T) where the multiset of detected
      (shape, colour) at frame b-1 equals that at frame b and is non-empty (1.0 if no boundaries).
    frame_adherence: fraction of frames whose detected (shape, colour) multiset equals the caption's.
    motion_accuracy: mean over moving objects of :func:`_motion_accuracy` (None if none move).
    color_change_accuracy: mean over colour-changing objects of [its colour stays on the segment
      between the two captioned colours, starts nearer the first, ends nearer the second, and
      crosses the midpoint exactly once] (None if none change; needs T > t0 + blend, i.e. >= 17).
    """
    frames = np.asarray(frames)
    spec = parse_caption(caption)
    per_frame = [detect(f) for f in frames]
    T = len(per_frame)
    sigs = [_signature(spec, d) for d in per_frame]
    want = tuple(sorted((o.shape, o.color) for o in spec.objects))
    bounds = [b for b in chunk_boundaries if 0 < b < T]
    ident = [bool(sigs[b - 1] == sigs[b] and len(sigs[b]) > 0) for b in bounds]
    out = {
        "identity_consistency": float(np.mean(ident)) if ident else 1.0,
        "frame_adherence": float(np.mean([s == want for s in sigs])) if T else 0.0,
        "motion_accuracy": None,
        "color_change_accuracy": None,
        "frames": T,
    }
    mot = [_motion_accuracy(_track(o, per_frame), o.motion) for o in spec.objects if o.motion]
    if mot:
        out["motion_accuracy"] = float(np.mean(mot))
    cc = []
    for o in spec.objects:
        if o.turn_to is None:
            continue
        track = _track(o, per_frame)
        ws = [None if d is None else _blend_weight(d.rgb, o.color, o.turn_to) for d in track]
        labels = [None if w is None else int(w >= 0.5) for w in ws]
        ok = (T > 0 and None not in labels and labels[0] == 0 and labels[-1] == 1
              and sum(x != y for x, y in zip(labels[:-1], labels[1:])) == 1)
        cc.append(float(ok))
    if cc:
        out["color_change_accuracy"] = float(np.mean(cc))
    return out


# --------------------------------------------------------------------------------------------
# Self-check
# --------------------------------------------------------------------------------------------


def _gauss_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return img
    rad = max(1, int(math.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-rad, rad + 1) / sigma) ** 2)
    k /= k.sum()
    x = img.astype(np.float32)
    p = np.pad(x, ((rad, rad), (0, 0), (0, 0)), mode="edge")
    x = sum(k[i] * p[i:i + x.shape[0]] for i in range(2 * rad + 1))
    p = np.pad(x, ((0, 0), (rad, rad), (0, 0)), mode="edge")
    return sum(k[i] * p[:, i:i + x.shape[1]] for i in range(2 * rad + 1))


def degrade(image: np.ndarray, rng: np.random.Generator, noise: float = 8.0, blur: float = 0.7) -> np.ndarray:
    """Mild Gaussian blur (sigma in pixels) + Gaussian noise (std in 0..255 levels)."""
    x = _gauss_blur(np.asarray(image, dtype=np.float32), blur)
    x = x + rng.normal(0.0, noise, x.shape)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def self_check(n: int = 600, seed: int = 0, size: int = 64, noise: float = 8.0, blur: float = 0.7,
               verbose: bool = False) -> dict:
    """Detector accuracy on the dataset's own renders (half train, half held-out captions), clean
    and degraded (blur + noise). Should be >= 0.95 (the metric is only meaningful if it is)."""
    rng = np.random.default_rng(seed)
    scenes = [D.sample_scene(rng, "train" if i % 2 == 0 else "heldout") for i in range(n)]
    ims = D.to_uint8(D.render(scenes, size))
    noisy = [degrade(im, rng, noise, blur) for im in ims]
    caps = [s.caption for s in scenes]
    out = {"n": n}
    failures = []
    for name, batch in (("clean", ims), ("noisy", noisy)):
        res = [score(im, c) for im, c in zip(batch, caps)]
        out[f"{name}_accuracy"] = sum(r["correct"] for r in res) / max(n, 1)
        out[f"{name}_checks"] = {c: sum(r[c] for r in res) / max(n, 1) for c in CHECKS}
        failures += [(name, c, {k: v for k, v in r.items() if v is False})
                     for c, r in zip(caps, res) if not r["correct"]]
    out["accuracy"] = out["clean_accuracy"]
    out["failures"] = failures[:20]
    if verbose:
        for f in failures[:20]:
            print(f, file=sys.stderr)
    return out


def video_self_check(n: int = 40, frames: int = 48, chunk: int = 8, seed: int = 0, size: int = 64) -> dict:
    """Video metrics on the dataset's own videos (should all be ~1.0)."""
    rng = np.random.default_rng(seed)
    vss = [D.sample_video_scene(rng, "train" if i % 2 == 0 else "heldout") for i in range(n)]
    vids = D.render_video(vss, frames, size)
    keys = ("identity_consistency", "frame_adherence", "motion_accuracy", "color_change_accuracy")
    acc: dict[str, list[float]] = {k: [] for k in keys}
    for vs, v in zip(vss, vids):
        m = video_metrics(D.to_uint8(v), vs.caption, list(range(chunk, frames, chunk)))
        for k in keys:
            if m[k] is not None:
                acc[k].append(m[k])
    return {k: (float(np.mean(v)) if v else None) for k, v in acc.items()} | {"n": n}


def served_adherence(model_dir: str, n: int = 256, steps: int | None = None, no_background: bool = False,
                     batch: int = 32, seed: int = 1) -> dict:
    """Prompt adherence of what the engine serves (``FewStepPipeline``: the checkpoint's own steps, sigmas and
    ``prompt_completion``) on ``n`` held-out prompts, seeds 0..n-1; ``no_background`` strips each prompt's
    background phrase first, as a newcomer types them. (``fewstep train eval`` scores the raw model instead.)"""
    from fewstep.engines.loading import load_checkpoint
    from fewstep.engines.pipeline import FewStepPipeline

    prompts = D.heldout_prompts(n, seed=seed)
    if no_background:
        prompts = [D.without_background(p) for p in prompts]
    pipe = FewStepPipeline(load_checkpoint(model_dir))
    images = []
    for i in range(0, n, batch):
        images += list(pipe(prompts[i:i + batch], list(range(i, min(n, i + batch))), steps=steps).numpy())
    return {"model": str(model_dir), "steps": steps or pipe.default_steps, "no_background": no_background,
            **adherence(images, prompts)}


def stream_frames(pipe, prompts: list[str], frames: int, seeds: list[int] | None = None,
                  negative: str | None = None, nasa_scale: float | None = None,
                  nag: tuple[float, float, float] | None = None, ramp: str | None = None) -> list[np.ndarray]:
    """The first ``frames`` frames ([frames, H, W, 3] uint8) the engine streams for each prompt (``EngineCore`` with
    ``pipe``, a ``StreamPipeline``; one session per prompt, seed ``seeds[i]`` (default its index), all stepped
    together), each steered away from ``negative`` at NASA scale ``nasa_scale`` when given (``nag``: NAG's
    renormalised form at (phi, tau, alpha) instead); ``ramp``: the buffer's warm-up ramp (``StreamConfig.ramp``;
    None: the checkpoint's)."""
    from fewstep.engines.config import EngineConfig, StreamConfig
    from fewstep.engines.core import EngineCore
    from fewstep.engines.stream import StreamStart

    n = len(prompts)
    seeds = list(range(n)) if seeds is None else seeds
    core = EngineCore({"video": pipe}, EngineConfig(stream=StreamConfig(max_sessions=n, max_batch_sessions=n,
                                                                        ramp=ramp)))
    try:
        sessions = [core.open_stream(StreamStart(prompt=p, seed=s, fps=0, format="raw", negative_prompt=negative,
                                                 nasa_scale=nasa_scale,
                                                 **({} if nag is None else dict(zip(("nag_scale", "nag_tau",
                                                                                     "nag_alpha"), nag)))))
                    for p, s in zip(prompts, seeds)]
        got: list[list[np.ndarray]] = [[] for _ in prompts]
        while any(sum(len(c) for c in g) < frames for g in got):
            core.stream_step()
            for s, g in zip(sessions, got):   # read every step: an unread outbox drops its oldest chunks
                while (c := s.owner.take()) is not None:
                    g.append(c.frames)
    finally:
        core.shutdown()
    return [np.concatenate(g)[:frames] for g in got]


def stream_adherence(pipe, prompts: list[str], frames: int) -> dict:
    """Per-frame prompt adherence of the first ``frames`` frames the engine streams for each prompt
    (:func:`stream_frames`)."""
    images = [f for v in stream_frames(pipe, prompts, frames) for f in v]
    return adherence(images, [p for p in prompts for _ in range(frames)])


def served_video_adherence(model_dir: str, n: int = 24, frames: int = 16, no_background: bool = False,
                           seed: int = 7) -> dict:
    """``stream_adherence`` of a video checkpoint (its policy and ``prompt_completion``) on ``n`` held-out video
    prompts; ``no_background`` strips each prompt's background phrase first."""
    from fewstep.engines.loading import load_checkpoint
    from fewstep.engines.stream import StreamPipeline

    rng = np.random.default_rng(seed)
    prompts = [D.sample_video_scene(rng, "heldout").caption for _ in range(n)]
    if no_background:
        prompts = [D.without_background(p) for p in prompts]
    return {"model": str(model_dir), "prompts": n, "frames": frames, "no_background": no_background,
            **stream_adherence(StreamPipeline(load_checkpoint(model_dir)), prompts, frames)}


def build_parser() -> argparse.ArgumentParser:
    """The command line of `fewstep bench quality`, built without side effects."""
    ap = argparse.ArgumentParser(prog="fewstep bench quality",
                                 description="Prompt adherence of the embedded models as served, and checks of the "
                                             "detector behind it.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    sc = sub.add_parser("self-check", help="detector accuracy on the dataset's own renders")
    sc.add_argument("--n", type=int, default=600, help="images rendered, half from training and half from held-out "
                    "captions (default 600)")
    sc.add_argument("--seed", type=int, default=0, help="picks the scenes and the degradation noise (default 0)")
    sc.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    sc.add_argument("--verbose", action="store_true", help="print up to 20 failed captions with the checks they "
                    "failed (default off)")
    vc = sub.add_parser("video-self-check", help="video metrics on the dataset's own videos")
    vc.add_argument("--n", type=int, default=40, help="videos rendered (default 40)")
    vc.add_argument("--frames", type=int, default=48, help="frames per video (default 48)")
    vc.add_argument("--seed", type=int, default=0, help="picks the video scenes (default 0)")
    sv = sub.add_parser("served", help="adherence of what the engine serves on held-out prompts")
    sv.add_argument("--model", default=None, help="a checkpoint folder (default: the embedded image model; with "
                    "--video, the embedded video model)")
    sv.add_argument("--n", type=int, default=None, help="held-out prompts (default 256 images; with --video, 24 "
                    "streams)")
    sv.add_argument("--steps", type=int, default=None, help="denoising steps per image (default: the "
                    "checkpoint's; images only)")
    sv.add_argument("--no-background", action="store_true", help="strip the prompts' background phrase, as a "
                    "newcomer types them (default off)")
    sv.add_argument("--video", action="store_true",
                    help="stream a video model instead (default: the embedded one): --n prompts x --frames frames")
    sv.add_argument("--frames", type=int, default=16, help="with --video: frames scored per stream (default 16)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.cmd == "served":
        from fewstep.server.config import DEFAULT_MODEL_DIR, DEFAULT_VIDEO_MODEL_DIR
        if args.video:
            r = served_video_adherence(args.model or str(DEFAULT_VIDEO_MODEL_DIR), args.n or 24, args.frames,
                                       args.no_background)
        else:
            r = served_adherence(args.model or str(DEFAULT_MODEL_DIR), args.n or 256, args.steps, args.no_background)
        print(json.dumps(r), flush=True)
        return 0
    if args.cmd == "self-check":
        r = self_check(args.n, args.seed, args.size, verbose=args.verbose)
        print(f"clean accuracy: {r['clean_accuracy']:.4f}  noisy accuracy: {r['noisy_accuracy']:.4f}  (n={r['n']})")
        print(json.dumps({"clean_checks": r["clean_checks"], "noisy_checks": r["noisy_checks"]}, indent=1))
        return 0 if min(r["clean_accuracy"], r["noisy_accuracy"]) >= 0.95 else 1
    r = video_self_check(args.n, args.frames, seed=args.seed)
    print(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
