"""Procedural captioned-shapes dataset (images and streaming videos), deterministic from a seed.

Every image is a flat (optionally slightly graded) background with 1-3 non-overlapping,
axis-aligned, anti-aliased shapes. Every caption is produced by a small fixed grammar whose
statements are all true in the image and machine-checkable (``benchmarks.quality`` parses
captions back and verifies them with a detector).

Caption grammar (all words lower-case, single spaces, vocabulary = :func:`vocabulary`)::

    caption  := objects " on a " BG " background"
    objects  := OBJ [POSPHRASE]                          # one object
              | OBJ " " REL " " OBJ                      # two objects
              | OBJ " " REL " " OBJ " which is " REL " " OBJ   # three objects, chained
    OBJ      := ("a " | "an ") [SIZE " "] COLOR " " SHAPE   # size word optional; "an" before a vowel
    POSPHRASE:= " on the left" | " on the right" | " at the top" | " at the bottom" | " in the center"
    REL      := "left of" | "right of" | "above" | "below"

    video    := VOBJ [" and " VOBJ] " on a " BG " background"
    VOBJ     := OBJ " moving " DIR | OBJ " turning " COLOR | OBJ
    DIR      := "left" | "right" | "up" | "down"

Semantics (what the checker in ``benchmarks.quality`` verifies; the sampler keeps wide margins):
  * position of a single object, with d = centre - (0.5, 0.5): "center" iff max(|dx|,|dy|) < 0.1,
    otherwise the dominant axis decides (left: dx<0 and |dx|>=|dy|, top: dy<0 (y grows downwards)).
    The sampler draws "center" within 0.05 of the middle and the others >= 0.18 off-centre
    along the axis and <= 0.08 across it.
  * "A REL B": the centre offset B-A is dominated by the stated axis with the stated sign
    ("A left of B": B.cx - A.cx > |B.cy - A.cy|). The sampler uses >= 0.28 along, <= 0.08 across.
  * "A REL1 B which is REL2 C": A REL1 B and B REL2 C ("which" always refers to the object just
    before it).
  * sizes: equal-area shapes; "small" has area-equivalent radius 0.08*size, "large" 0.14*size
    (+-5% jitter), so the size is readable from the pixel area alone whatever the shape.

Held-out split (compositional generalisation): the (shape, colour) pairs in :data:`HELDOUT_PAIRS`
are never rendered in the training split. The set is a fixed Latin-style design: shape i is held
out with colour ``COLOR_NAMES[(3*i + 2) % 8]``, i.e. every shape has exactly one held-out colour and
every colour at most one held-out shape (6 of 48 pairs = 12.5%). A caption/scene is "heldout" iff at
least one of its objects uses a held-out pair (for colour-changing video objects, either colour);
"train" scenes use only training pairs. Therefore every held-out caption is built from seen words
but is never produced by the train sampler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "COLORS", "COLOR_NAMES", "SHAPES", "SIZES", "POSITIONS", "RELATIONS", "DIRECTIONS",
    "BACKGROUNDS", "HELDOUT_PAIRS", "SIZE_RADIUS", "SHAPE_EXTENT",
    "Obj", "Scene", "Motion", "VideoScene",
    "is_heldout_pair", "split_of", "sample_scene", "render", "render_uint8", "sample_batch",
    "vocabulary", "heldout_prompts", "train_prompts",
    "sample_video_scene", "video_frame_objects", "render_video", "render_video_uint8",
    "sample_video_batch", "shape_alpha", "shape_alpha_np", "to_uint8",
]

# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "cyan": (40, 200, 210),
    "pink": (245, 120, 180),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")

SIZES: tuple[str, ...] = ("small", "large")
#: area-equivalent radius (fraction of the image side): every shape of a given size has the
#: area of a circle of this radius.
SIZE_RADIUS: dict[str, float] = {"small": 0.08, "large": 0.14}
SIZE_JITTER = 0.05

POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left", "right": "on the right", "top": "at the top",
    "bottom": "at the bottom", "center": "in the center",
}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "cream": (245, 236, 212),
    "navy": (22, 28, 66),
    "mint": (212, 240, 224),
}

#: circumradius of each shape divided by its area-equivalent radius (for layout / bounds).
SHAPE_EXTENT: dict[str, float] = {
    "circle": 1.0,
    "square": 1.2534,
    "triangle": 1.5551,
    "diamond": 1.2534,
    "cross": 1.2357,
    "star": 1.4622,
}

# shape geometry constants (all relative to the area-equivalent radius r)
_SQ_HALF = math.sqrt(math.pi) / 2.0            # square half-side: (2a)^2 = pi r^2
_DIA_HALF = math.sqrt(math.pi / 2.0)           # diamond half-diagonal: 2 d^2 = pi r^2
_TRI_R = math.sqrt(math.pi / (3.0 * math.sqrt(3.0) / 4.0))   # equilateral circumradius
_CROSS_W = 0.35                                 # arm half-width / arm half-length
_CROSS_L = math.sqrt(math.pi / (8 * _CROSS_W - 4 * _CROSS_W ** 2))
_STAR_INNER = 0.5                               # inner/outer radius
_STAR_R = math.sqrt(math.pi / (5 * _STAR_INNER * math.sin(math.radians(36))))

HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    (s, COLOR_NAMES[(3 * i + 2) % len(COLOR_NAMES)]) for i, s in enumerate(SHAPES)
)
_TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (s, c) for s in SHAPES for c in COLOR_NAMES if (s, c) not in HELDOUT_PAIRS
)
_HELDOUT_LIST: tuple[tuple[str, str], ...] = tuple(sorted(HELDOUT_PAIRS))
_ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((s, c) for s in SHAPES for c in COLOR_NAMES)

_REL_AXIS = {  # relation -> (axis, sign of (B - A) along the axis); axis 0 = x, 1 = y (down)
    "left of": (0, +1), "right of": (0, -1), "above": (1, +1), "below": (1, -1),
}
_OPPOSITE_REL = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def is_heldout_pair(shape: str, color: str) -> bool:
    return (shape, color) in HELDOUT_PAIRS


# --------------------------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------------------------

@dataclass
class Obj:
    shape: str
    color: str
    size: str
    cx: float          # centre (area centroid) in [0, 1] image coordinates, x to the right
    cy: float          # y downwards
    radius: float = 0.0  # area-equivalent radius (fraction of image side); 0 -> nominal for size

    def __post_init__(self) -> None:
        if not self.radius:
            self.radius = SIZE_RADIUS[self.size]

    @property
    def extent(self) -> float:
        return self.radius * SHAPE_EXTENT[self.shape]


@dataclass
class Scene:
    objects: list[Obj]
    background: str
    caption: str
    gradient: tuple[float, float] = (0.0, 0.0)   # mild linear background gradient, [-1,1] units


@dataclass
class Motion:
    """How one object of a video evolves. ``kind`` is "move", "turn" (colour change) or "still".

    move: the centre travels along ``direction`` at ``speed`` (image fraction per frame) from its
    frame-0 position and bounces off the walls (triangle wave between the reachable bounds).
    turn: the colour is the object's colour for t < t0, blends linearly over ``blend`` frames, and
    is ``to_color`` afterwards.
    """
    kind: str = "still"
    direction: str | None = None
    speed: float = 0.0
    to_color: str | None = None
    t0: int = 0
    blend: int = 4


@dataclass
class VideoScene:
    objects: list[Obj]          # state at frame 0
    motions: list[Motion]
    background: str
    caption: str
    gradient: tuple[float, float] = (0.0, 0.0)


def split_of(objects: list[Obj], motions: list[Motion] | None = None) -> str:
    pairs = [(o.shape, o.color) for o in objects]
    if motions:
        pairs += [(o.shape, m.to_color) for o, m in zip(objects, motions) if m.kind == "turn"]
    return "heldout" if any(p in HELDOUT_PAIRS for p in pairs) else "train"


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------

def _check_split(split: str) -> None:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")


def _sample_pairs(rng: np.random.Generator, n: int, split: str) -> list[tuple[str, str]]:
    if split == "train":
        return [_TRAIN_PAIRS[int(rng.integers(len(_TRAIN_PAIRS)))] for _ in range(n)]
    pairs = [_ALL_PAIRS[int(rng.integers(len(_ALL_PAIRS)))] for _ in range(n)]
    j = int(rng.integers(n))
    pairs[j] = _HELDOUT_LIST[int(rng.integers(len(_HELDOUT_LIST)))]
    return pairs


def _obj_phrase(o: Obj, with_size: bool) -> str:
    words = f"{o.size} {o.color} {o.shape}" if with_size else f"{o.color} {o.shape}"
    return ("an " if words[0] in "aeiou" else "a ") + words


def _make_objs(rng: np.random.Generator, pairs: list[tuple[str, str]]) -> list[Obj]:
    objs = []
    for shape, color in pairs:
        size = SIZES[int(rng.integers(2))]
        r = SIZE_RADIUS[size] * (1.0 + SIZE_JITTER * float(rng.uniform(-1, 1)))
        objs.append(Obj(shape, color, size, 0.5, 0.5, r))
    return objs


_MARGIN = 0.015   # min distance between a shape's circumcircle and the image border
_GAP = 0.05       # min gap between two shapes' circumcircles


def _bounds(o: Obj) -> tuple[float, float]:
    e = o.extent + _MARGIN
    return e, 1.0 - e


def _half_extents(o: Obj) -> tuple[float, float, float, float]:
    """Exact (left, right, up, down) extents of the shape from its centre (image fraction)."""
    r = o.radius
    if o.shape == "circle":
        e = (r,) * 4
    elif o.shape == "square":
        e = (_SQ_HALF * r,) * 4
    elif o.shape == "diamond":
        e = (_DIA_HALF * r,) * 4
    elif o.shape == "cross":
        e = (_CROSS_L * r,) * 4
    elif o.shape == "triangle":
        R = _TRI_R * r
        e = (R * math.sqrt(3.0) / 2.0, R * math.sqrt(3.0) / 2.0, R, 0.5 * R)
    elif o.shape == "star":
        R = _STAR_R * r
        h = R * math.sin(math.radians(72))
        e = (h, h, R, R * math.cos(math.radians(36)))
    else:
        raise ValueError(o.shape)
    return e


def _no_overlap(objs: list[Obj]) -> bool:
    for i in range(len(objs)):
        for j in range(i + 1, len(objs)):
            a, b = objs[i], objs[j]
            if math.hypot(a.cx - b.cx, a.cy - b.cy) < a.extent + b.extent + _GAP:
                return False
    return True


def _in_bounds(o: Obj) -> bool:
    lo, hi = _bounds(o)
    return lo <= o.cx <= hi and lo <= o.cy <= hi


def _place_single(rng: np.random.Generator, o: Obj, position: str | None) -> None:
    lo, hi = _bounds(o)
    if position is None:
        o.cx, o.cy = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
        return
    if position == "center":
        o.cx, o.cy = 0.5 + float(rng.uniform(-0.05, 0.05)), 0.5 + float(rng.uniform(-0.05, 0.05))
        return
    along_max = 0.5 - lo                      # how far off-centre we can go
    off = float(rng.uniform(0.18, max(0.18, min(0.3, along_max))))
    across = float(rng.uniform(-0.08, 0.08))
    if position == "left":
        o.cx, o.cy = 0.5 - off, 0.5 + across
    elif position == "right":
        o.cx, o.cy = 0.5 + off, 0.5 + across
    elif position == "top":
        o.cx, o.cy = 0.5 + across, 0.5 - off
    elif position == "bottom":
        o.cx, o.cy = 0.5 + across, 0.5 + off
    else:
        raise ValueError(position)


def _relative_offset(rng: np.random.Generator, subj: Obj, obj: Obj, rel: str) -> tuple[float, float]:
    """Random offset (obj - subj) such that "subj REL obj" holds with a wide margin."""
    axis, sign = _REL_AXIS[rel]       # sign of (obj - subj) along the axis
    sep = max(0.28, subj.extent + obj.extent + _GAP) + float(rng.uniform(0.0, 0.12))
    across = float(rng.uniform(-0.08, 0.08))
    d = [0.0, 0.0]
    d[axis] = sign * sep
    d[1 - axis] = across
    return d[0], d[1]


def _sample_layout(rng: np.random.Generator, objs: list[Obj], rels: list[str]) -> bool:
    """Chain layout: rels[k] relates objs[k] (subject) to objs[k+1]. Offsets relative to the
    middle object objs[1] are drawn first, then objs[1] is placed uniformly in the range that
    keeps every object inside the image. Returns success."""
    for _ in range(20):
        ox, oy = [0.0] * len(objs), [0.0] * len(objs)
        dx, dy = _relative_offset(rng, objs[0], objs[1], rels[0])
        ox[0], oy[0] = -dx, -dy
        if len(objs) == 3:
            ox[2], oy[2] = _relative_offset(rng, objs[1], objs[2], rels[1])
        lo_x = max(_bounds(o)[0] - ox[i] for i, o in enumerate(objs))
        hi_x = min(_bounds(o)[1] - ox[i] for i, o in enumerate(objs))
        lo_y = max(_bounds(o)[0] - oy[i] for i, o in enumerate(objs))
        hi_y = min(_bounds(o)[1] - oy[i] for i, o in enumerate(objs))
        if lo_x > hi_x or lo_y > hi_y:
            continue
        bx, by = float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y))
        for i, o in enumerate(objs):
            o.cx, o.cy = bx + ox[i], by + oy[i]
        if _no_overlap(objs):
            return True
    return False


def _sample_gradient(rng: np.random.Generator) -> tuple[float, float]:
    if rng.random() < 0.5:
        return (0.0, 0.0)
    return (float(rng.uniform(-0.06, 0.06)), float(rng.uniform(-0.06, 0.06)))


def sample_scene(rng: np.random.Generator, split: str = "train") -> Scene:
    """Draw one random scene (1-3 objects) whose caption belongs to ``split``."""
    _check_split(split)
    u = rng.random()
    n = 1 if u < 0.4 else (2 if u < 0.75 else 3)
    background = tuple(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    gradient = _sample_gradient(rng)
    while True:
        pairs = _sample_pairs(rng, n, split)
        objs = _make_objs(rng, pairs)
        with_size = [bool(rng.random() < 0.6) for _ in objs]
        if n == 1:
            o = objs[0]
            position = POSITIONS[int(rng.integers(len(POSITIONS)))] if rng.random() < 0.75 else None
            _place_single(rng, o, position)
            text = _obj_phrase(o, with_size[0])
            if position is not None:
                text += " " + POSITION_PHRASES[position]
            break
        rels = [RELATIONS[int(rng.integers(len(RELATIONS)))]]
        if n == 3:
            allowed = [r for r in RELATIONS if r != _OPPOSITE_REL[rels[0]]]
            rels.append(allowed[int(rng.integers(len(allowed)))])
        if not _sample_layout(rng, objs, rels):
            continue  # e.g. three large stars in a row do not fit: redraw objects
        text = f"{_obj_phrase(objs[0], with_size[0])} {rels[0]} {_obj_phrase(objs[1], with_size[1])}"
        if n == 3:
            text += f" which is {rels[1]} {_obj_phrase(objs[2], with_size[2])}"
        break
    caption = f"{text} on a {background} background"
    return Scene(objs, background, caption, gradient)


# --------------------------------------------------------------------------------------------
# Rendering (vectorised signed-distance fields)
# --------------------------------------------------------------------------------------------

_SHAPE_ID = {s: i for i, s in enumerate(SHAPES)}


class _Ops:
    """The few array ops the SDFs need, for torch tensors or numpy arrays (the quality
    detector renders its shape templates in numpy on small windows)."""

    def __init__(self, is_torch: bool):
        self.t = is_torch

    def sqrt(self, x):
        return torch.sqrt(x) if self.t else np.sqrt(x)

    def relu(self, x):
        return x.clamp(min=0) if self.t else np.maximum(x, 0)

    def neg_part(self, x):
        return x.clamp(max=0) if self.t else np.minimum(x, 0)

    def clip01(self, x):
        return x.clamp(0.0, 1.0) if self.t else np.clip(x, 0.0, 1.0)

    def maximum(self, a, b):
        return torch.maximum(a, b) if self.t else np.maximum(a, b)

    def minimum(self, a, b):
        return torch.minimum(a, b) if self.t else np.minimum(a, b)

    def where(self, c, a, b):
        return torch.where(c, a, b) if self.t else np.where(c, a, b)

    def atan2(self, y, x):
        return torch.atan2(y, x) if self.t else np.arctan2(y, x)

    def remainder(self, x, m):
        return torch.remainder(x, m) if self.t else np.remainder(x, m)

    def cos(self, x):
        return torch.cos(x) if self.t else np.cos(x)

    def sin(self, x):
        return torch.sin(x) if self.t else np.sin(x)


_TORCH_OPS, _NUMPY_OPS = _Ops(True), _Ops(False)


def _box_sdf(o: _Ops, px, py, hx, hy):
    qx = abs(px) - hx
    qy = abs(py) - hy
    outside = o.sqrt(o.relu(qx) ** 2 + o.relu(qy) ** 2)
    inside = o.neg_part(o.maximum(qx, qy))
    return outside + inside


def _sdf(shape: str, px, py, r):
    """Signed distance (image-fraction units, <0 inside) of ``shape`` centred at the origin with
    area-equivalent radius ``r`` (broadcastable). Works on torch tensors and numpy arrays."""
    o = _TORCH_OPS if isinstance(px, torch.Tensor) else _NUMPY_OPS
    if shape == "circle":
        return o.sqrt(px * px + py * py) - r
    if shape == "square":
        a = _SQ_HALF * r
        return _box_sdf(o, px, py, a, a)
    if shape == "diamond":
        return (abs(px) + abs(py) - _DIA_HALF * r) * (1.0 / math.sqrt(2.0))
    if shape == "triangle":  # equilateral, apex up (y grows downwards), centroid at origin
        R = _TRI_R * r
        c, s = math.sqrt(3.0) / 2.0, 0.5
        d1 = py - 0.5 * R
        d2 = c * px - s * py - 0.5 * R
        d3 = -c * px - s * py - 0.5 * R
        return o.maximum(o.maximum(d1, d2), d3)
    if shape == "cross":
        L = _CROSS_L * r
        w = _CROSS_W * L
        return o.minimum(_box_sdf(o, px, py, L, w), _box_sdf(o, px, py, w, L))
    if shape == "star":  # 5 points, one pointing up
        R = _STAR_R * r
        Ri = _STAR_INNER * R
        sector = 2.0 * math.pi / 5.0
        rho = o.sqrt(px * px + py * py)
        theta = o.atan2(py, px) + math.pi / 2.0            # 0 at the upward point
        phi = o.remainder(theta, sector)
        phi = o.minimum(phi, sector - phi)                  # fold into [0, pi/5]
        qx, qy = rho * o.cos(phi), rho * o.sin(phi)
        ax = R
        bx, by = Ri * math.cos(sector / 2), Ri * math.sin(sector / 2)
        ex, ey = bx - ax, by                                # edge A=(R,0) -> B
        wx, wy = qx - ax, qy
        t = o.clip01((wx * ex + wy * ey) / (ex * ex + ey * ey))
        dist = o.sqrt((wx - t * ex) ** 2 + (wy - t * ey) ** 2)
        cross = ex * wy - ey * wx          # >0: on the origin side of edge A->B (inside)
        return o.where(cross > 0, -dist, dist)
    raise ValueError(f"unknown shape {shape!r}")


def shape_alpha_np(shape: str, cx: float, cy: float, r: float, xs: np.ndarray, ys: np.ndarray,
                   size: int) -> np.ndarray:
    """numpy coverage of one shape sampled at pixel-centre coordinates ``xs`` (row vector) and
    ``ys`` (column vector), in image-fraction units, for an image of side ``size``."""
    d = _sdf(shape, xs - cx, ys - cy, r)
    return np.clip(0.5 - d * size, 0.0, 1.0)


def _grid(size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    c = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    return c.view(1, 1, size), c.view(1, size, 1)    # x varies along last dim, y along rows


def shape_alpha(shapes: list[str], cx, cy, r, size: int = 64, device="cpu") -> torch.Tensor:
    """Anti-aliased coverage masks ``[N, size, size]`` in [0, 1] for N shapes (used by the
    renderer and by the quality detector's analysis-by-synthesis shape classifier)."""
    n = len(shapes)
    out = torch.zeros(n, size, size, device=device)
    if n == 0:
        return out
    cx = torch.as_tensor(np.asarray(cx, dtype=np.float32).reshape(n), device=device)
    cy = torch.as_tensor(np.asarray(cy, dtype=np.float32).reshape(n), device=device)
    r = torch.as_tensor(np.asarray(r, dtype=np.float32).reshape(n), device=device)
    gx, gy = _grid(size, device)
    ids = np.array([_SHAPE_ID[s] for s in shapes])
    for sid, name in enumerate(SHAPES):
        idx_np = np.nonzero(ids == sid)[0]
        if idx_np.size == 0:
            continue
        idx = torch.as_tensor(idx_np, device=device)
        px = gx - cx[idx].view(-1, 1, 1)
        py = gy - cy[idx].view(-1, 1, 1)
        d = _sdf(name, px, py, r[idx].view(-1, 1, 1))
        out[idx] = (0.5 - d * size).clamp(0.0, 1.0)     # 1-pixel-wide linear edge ramp
    return out


def _render_flat(shape_lists: list[list[str]], cx: np.ndarray, cy: np.ndarray, r: np.ndarray,
                 rgb: np.ndarray, bg: np.ndarray, grad: np.ndarray, size: int, device) -> torch.Tensor:
    """shape_lists: per image list of shape names (K_b <= K); cx/cy/r: [B, K]; rgb: [B, K, 3]
    in 0..255; bg: [B, 3]; grad: [B, 2]. Returns [B, 3, size, size] in [-1, 1]."""
    B = len(shape_lists)
    K = cx.shape[1] if B else 0
    flat_shapes, flat_b, flat_k = [], [], []
    for b, lst in enumerate(shape_lists):
        for k, s in enumerate(lst):
            flat_shapes.append(s)
            flat_b.append(b)
            flat_k.append(k)
    gx, gy = _grid(size, device)
    bg_t = torch.as_tensor(np.asarray(bg, dtype=np.float32), device=device) / 127.5 - 1.0
    grad_t = torch.as_tensor(np.asarray(grad, dtype=np.float32), device=device)
    img = bg_t.view(B, 3, 1, 1) + (grad_t[:, 0].view(B, 1, 1, 1) * (gx.view(1, 1, 1, size) - 0.5)
                                  + grad_t[:, 1].view(B, 1, 1, 1) * (gy.view(1, 1, size, 1) - 0.5))
    img = img.expand(B, 3, size, size)
    if not flat_shapes:
        return img.clamp(-1.0, 1.0)
    fb = np.asarray(flat_b)
    fk = np.asarray(flat_k)
    alpha = shape_alpha(flat_shapes, cx[fb, fk], cy[fb, fk], r[fb, fk], size, device)  # [N,S,S]
    ia = torch.as_tensor(fb * K + fk, device=device)
    a_dense = torch.zeros(B * K, size, size, device=device)
    a_dense[ia] = alpha
    a_dense = a_dense.view(B, K, 1, size, size)
    col = torch.as_tensor(rgb.astype(np.float32), device=device).view(B, K, 3, 1, 1) / 127.5 - 1.0
    for k in range(K):  # composite in object order (objects never overlap in sampled scenes)
        a = a_dense[:, k]
        img = torch.lerp(img, col[:, k].expand_as(img), a.expand_as(img))
    return img.clamp(-1.0, 1.0)


def _pack(scenes_objs: list[list[Obj]], colors: list[list[tuple]] | None = None):
    B = len(scenes_objs)
    K = max([len(o) for o in scenes_objs] + [1])
    cx = np.zeros((B, K))
    cy = np.zeros((B, K))
    r = np.zeros((B, K))
    rgb = np.zeros((B, K, 3))
    shapes = []
    for b, objs in enumerate(scenes_objs):
        shapes.append([o.shape for o in objs])
        for k, o in enumerate(objs):
            cx[b, k], cy[b, k], r[b, k] = o.cx, o.cy, o.radius
            rgb[b, k] = colors[b][k] if colors is not None else COLORS[o.color]
    return shapes, cx, cy, r, rgb


def scene_arrays(scenes: list[Scene]) -> tuple:
    """What ``render`` needs of ``scenes``, as arrays (shape names per image, cx, cy, r, rgb, bg, grad). Data
    workers send this instead of the scenes: for 256 scenes it unpickles in 0.07 ms against 3 ms for the Scene
    objects (this CPU), time the training process spends holding the GIL."""
    shapes, cx, cy, r, rgb = _pack([s.objects for s in scenes])
    bg = np.array([BACKGROUNDS[s.background] for s in scenes], dtype=np.float32).reshape(-1, 3)
    grad = np.array([s.gradient for s in scenes], dtype=np.float32).reshape(-1, 2)
    return shapes, cx, cy, r, rgb, bg, grad


def render_arrays(arrays: tuple, size: int = 64, device="cpu") -> torch.Tensor:
    return _render_flat(*arrays, size, device)


def render(scenes: list[Scene], size: int = 64, device="cpu") -> torch.Tensor:
    """Render scenes to float32 ``[B, 3, size, size]`` in [-1, 1] (vectorised, CPU or GPU)."""
    return render_arrays(scene_arrays(scenes), size, device)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B,3,H,W] in [-1,1] -> uint8 [B,H,W,3]."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def render_uint8(scene: Scene, size: int = 64) -> np.ndarray:
    return to_uint8(render([scene], size))[0]


def sample_batch(rng: np.random.Generator, batch: int, size: int = 64, split: str = "train",
                 device="cpu") -> tuple[torch.Tensor, list[str]]:
    scenes = [sample_scene(rng, split) for _ in range(batch)]
    return render(scenes, size, device), [s.caption for s in scenes]


# --------------------------------------------------------------------------------------------
# Vocabulary and prompt lists
# --------------------------------------------------------------------------------------------

def vocabulary() -> list[str]:
    words = {"a", "an", "on", "background", "which", "is", "and", "moving", "turning"}
    words.update(COLORS)
    words.update(SHAPES)
    words.update(SIZES)
    words.update(BACKGROUNDS)
    words.update(DIRECTIONS)
    for p in POSITION_PHRASES.values():
        words.update(p.split())
    for r in RELATIONS:
        words.update(r.split())
    return sorted(words)


def _prompts(n: int, seed: int, split: str) -> list[str]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, split).caption for _ in range(n)]


# what the engine appends to a prompt that names no background (model_index.json "fewstep.prompt_completion", read by
# FewStepPipeline.complete_prompt): white, the first of BACKGROUNDS
PROMPT_COMPLETION = {"unless": r"\bbackground\b", "append": " on a white background"}


def without_background(caption: str) -> str:
    """``caption`` without its closing " on a BG background" (unchanged if it has none). A newcomer types "a red
    circle above a blue square"; the ebb3bbb model (2026-11-30), trained only on captions that name the background,
    scored 0.41 strict on held-out prompts stripped this way against 0.77 with the phrase (1 step, 128 prompts,
    CPU). ``--drop-background`` trains on both forms; the scene keeps its (random) background."""
    head, sep, tail = caption.rpartition(" on a ")
    name = tail[: -len(" background")] if tail.endswith(" background") else None
    return head if sep and name in BACKGROUNDS else caption


def drop_backgrounds(captions: list[str], rng: np.random.Generator, prob: float) -> list[str]:
    """Each caption, with probability ``prob`` (one uniform draw from ``rng`` per caption), ``without_background``:
    the ``--drop-background`` of the teacher's data stream and of the distill stage's pair prompts."""
    u = rng.random(len(captions))
    return [without_background(c) if x < prob else c for x, c in zip(u, captions)]


def heldout_prompts(n: int, seed: int = 0) -> list[str]:
    return _prompts(n, seed, "heldout")


def train_prompts(n: int, seed: int = 0) -> list[str]:
    return _prompts(n, seed, "train")


# --------------------------------------------------------------------------------------------
# Videos
# --------------------------------------------------------------------------------------------

_DIR_AXIS = {"left": (0, -1), "right": (0, +1), "up": (1, -1), "down": (1, +1)}


def _segment_distance(a, b, p) -> float:
    """Distance from colour p to the RGB segment a-b (a blend of two colours)."""
    a, b, p = (np.asarray(v, dtype=np.float64) for v in (a, b, p))
    e = b - a
    t = float(np.clip(((p - a) * e).sum() / (e * e).sum(), 0.0, 1.0))
    return float(np.linalg.norm(a + t * e - p))


def sample_video_scene(rng: np.random.Generator, split: str = "train") -> VideoScene:
    """1-2 objects; each moves (bouncing off the walls), changes colour, or (2nd object) stays.

    Two objects have different shapes, share a motion axis and live in separate halves across it
    (e.g. both move horizontally, one in the top half and one in the bottom half), so they never
    collide and each can be tracked unambiguously. A moving object starts >= 3 frames away from
    the wall it heads to; a colour change never passes close to the background colour.
    """
    _check_split(split)
    n = 1 if rng.random() < 0.55 else 2
    background = tuple(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    gradient = _sample_gradient(rng)
    while True:
        pairs = _sample_pairs(rng, n, "train" if split == "train" else "heldout")
        objs = _make_objs(rng, pairs)
        axis = int(rng.integers(2))                 # shared motion axis
        motions: list[Motion] = []
        for k, o in enumerate(objs):
            u = rng.random()
            kind = "move" if u < 0.7 else ("turn" if (u < 0.9 or k == 0) else "still")
            lo, hi = _bounds(o)
            if n == 1:
                across_lo, across_hi = lo, hi
            else:  # object k confined to its half across the motion axis
                across_lo, across_hi = (lo, 0.5 - o.extent - _GAP / 2) if k == 0 else (0.5 + o.extent + _GAP / 2, hi)
            if kind == "move":
                dirs = ("left", "right") if axis == 0 else ("up", "down")
                motion = Motion("move", dirs[int(rng.integers(2))], float(rng.uniform(0.015, 0.03)))
                # start >= 3 frames away from the wall it heads to, so frames 0-3 move as captioned
                if _DIR_AXIS[motion.direction][1] < 0:
                    lo = lo + 3 * motion.speed
                else:
                    hi = hi - 3 * motion.speed
            elif kind == "turn":
                # the colour transition must stay visible against the background all the way
                others = [c for c in COLOR_NAMES if c != o.color
                          and _segment_distance(COLORS[o.color], COLORS[c], BACKGROUNDS[background]) >= 70.0]
                to = others[int(rng.integers(len(others)))]
                motion = Motion("turn", to_color=to, t0=int(rng.integers(4, 13)))
            else:
                motion = Motion("still")
            motions.append(motion)
            along = float(rng.uniform(lo, hi))
            across = float(rng.uniform(across_lo, max(across_lo, across_hi)))
            if axis == 0:
                o.cx, o.cy = along, across
            else:
                o.cx, o.cy = across, along
        ok = all(_in_bounds(o) for o in objs) and _no_overlap(objs)
        ok = ok and len({o.shape for o in objs}) == n    # distinct shapes: each track is unambiguous
        if ok and split_of(objs, motions) == split:
            break
    parts = []
    for o, m in zip(objs, motions):
        text = _obj_phrase(o, bool(rng.random() < 0.5))
        if m.kind == "move":
            text += f" moving {m.direction}"
        elif m.kind == "turn":
            text += f" turning {m.to_color}"
        parts.append(text)
    caption = " and ".join(parts) + f" on a {background} background"
    return VideoScene(objs, motions, background, caption, gradient)


def _bounce(x0: float, v: float, t: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Position of a point starting at x0 with velocity v, reflecting between lo and hi."""
    L = hi - lo
    if L <= 0:
        return np.full(t.shape, x0)
    u = np.mod((x0 - lo) + v * t.astype(np.float64), 2.0 * L)
    return lo + np.where(u <= L, u, 2.0 * L - u)


def video_frame_objects(vs: VideoScene, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Object centres and colours at frames ``t`` (pure function of (scene, t)).

    Returns cx [T, K], cy [T, K], rgb [T, K, 3] (float, 0..255)."""
    t = np.asarray(t, dtype=np.int64)
    T, K = t.shape[0], len(vs.objects)
    cx = np.zeros((T, K))
    cy = np.zeros((T, K))
    rgb = np.zeros((T, K, 3))
    for k, (o, m) in enumerate(zip(vs.objects, vs.motions)):
        cx[:, k], cy[:, k] = o.cx, o.cy
        c0 = np.asarray(COLORS[o.color], dtype=np.float64)
        rgb[:, k] = c0
        if m.kind == "move":
            axis, sign = _DIR_AXIS[m.direction]
            el, er, eu, ed = _half_extents(o)     # bounce where the visible edge meets the margin
            lo, hi = (el + _MARGIN, 1.0 - er - _MARGIN) if axis == 0 else (eu + _MARGIN, 1.0 - ed - _MARGIN)
            pos = _bounce((o.cx, o.cy)[axis], sign * m.speed, t, lo, hi)
            if axis == 0:
                cx[:, k] = pos
            else:
                cy[:, k] = pos
        elif m.kind == "turn":
            c1 = np.asarray(COLORS[m.to_color], dtype=np.float64)
            w = np.clip((t - m.t0) / max(m.blend, 1), 0.0, 1.0)[:, None]
            rgb[:, k] = (1 - w) * c0 + w * c1
    return cx, cy, rgb


def render_video(video_scenes: list[VideoScene], frames: int, size: int = 64, start_frame: int = 0,
                 device="cpu") -> torch.Tensor:
    """Render frames [start_frame, start_frame+frames) -> ``[B, T, 3, size, size]`` in [-1, 1].

    Frame t is a pure function of (scene, t), so an unbounded video can be rendered in chunks."""
    t = np.arange(start_frame, start_frame + frames)
    all_objs, colors, bgs, grads = [], [], [], []
    for vs in video_scenes:
        cx, cy, rgb = video_frame_objects(vs, t)
        for i in range(frames):
            objs = [Obj(o.shape, o.color, o.size, float(cx[i, k]), float(cy[i, k]), o.radius)
                    for k, o in enumerate(vs.objects)]
            all_objs.append(objs)
            colors.append([tuple(rgb[i, k]) for k in range(len(objs))])
            bgs.append(BACKGROUNDS[vs.background])
            grads.append(vs.gradient)
    B = len(video_scenes)
    if B == 0 or frames == 0:
        return torch.zeros(B, frames, 3, size, size, device=device)
    shapes, cx, cy, r, rgb = _pack(all_objs, colors)
    img = _render_flat(shapes, cx, cy, r, rgb, np.asarray(bgs, dtype=np.float32),
                       np.asarray(grads, dtype=np.float32), size, device)
    return img.view(B, frames, 3, size, size)


def render_video_uint8(vs: VideoScene, frames: int, size: int = 64, start_frame: int = 0) -> np.ndarray:
    """One video -> uint8 ``[T, H, W, 3]``."""
    return to_uint8(render_video([vs], frames, size, start_frame)[0])


def sample_video_batch(rng: np.random.Generator, batch: int, frames: int, size: int = 64,
                       split: str = "train", start_frame: int = 0, device="cpu"
                       ) -> tuple[torch.Tensor, list[str]]:
    vss = [sample_video_scene(rng, split) for _ in range(batch)]
    return render_video(vss, frames, size, start_frame, device), [v.caption for v in vss]
