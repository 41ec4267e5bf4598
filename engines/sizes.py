"""The image sizes a model serves: admission refuses every other size before the queue.

A distilled student is trained at one resolution (ours: 64 px images, 32 px video); far from it the output is noise
and the cost grows with the square of the side (a 2048² request is ~1000 native images of work). So a model serves
its native size unless its checkpoint or the server's config says more:

* ``model_index.json`` ``"fewstep": {"sizes": [64, "96x64", ...]}``: a list (an int is a square, "WxH" as in the
  API), or ``"fewstep": {"size_range": [MIN, MAX], "size_step": S}``: every side from MIN to MAX pixels in steps
  of S (default: the model's own size multiple);
* ``EngineConfig.sizes`` (``fewstep serve --sizes 512x512,768x768``): replaces what the checkpoint says, for every
  served model. ``--compile-sizes`` is separate: it picks which served sizes the compiled backend captures.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_WXH = re.compile(r"^(\d{1,5})x(\d{1,5})$")


@dataclass(frozen=True)
class ServedSizes:
    sizes: tuple[tuple[int, int], ...] = ()  # (height, width), exact
    side_range: tuple[int, int] | None = None  # every side in [min, max] that is a multiple of step
    step: int = 1

    def allows(self, height: int, width: int) -> bool:
        if (height, width) in self.sizes:
            return True
        if self.side_range is None:
            return False
        lo, hi = self.side_range
        return all(lo <= v <= hi and v % self.step == 0 for v in (height, width))

    def describe(self) -> str:
        parts = [f"{w}x{h}" for h, w in self.sizes]
        if self.side_range is not None:
            lo, hi = self.side_range
            parts.append(f"any WxH with sides from {lo} to {hi} px" + (f" in steps of {self.step}"
                                                                         if self.step > 1 else ""))
        return ", ".join(parts)

    def check(self, height: int, width: int) -> None:
        if not self.allows(height, width):
            raise ValueError(f"size {width}x{height} is not served by this model; served sizes: {self.describe()}")

    def default(self, native: int) -> tuple[int, int]:
        """(height, width) for work that names no size (warm-up): the native size if served, else the first one."""
        if self.allows(native, native):
            return native, native
        if self.sizes:
            return self.sizes[0]
        lo = self.side_range[0]
        side = -(-lo // self.step) * self.step
        return side, side

    @classmethod
    def native(cls, size: int) -> ServedSizes:
        return cls(((size, size),))

    @classmethod
    def from_meta(cls, meta: dict, native: int, multiple: int, where: str) -> ServedSizes:
        """The checkpoint's declaration (``fewstep.sizes`` / ``fewstep.size_range``); the native size alone if none.
        Raises ValueError naming ``where`` (the model_index.json) for a malformed one."""
        listed, rng = meta.get("sizes"), meta.get("size_range")
        if listed is None and rng is None:
            return cls.native(native)
        sizes: list[tuple[int, int]] = []
        if listed is not None:
            if not isinstance(listed, list) or not listed:
                raise ValueError(f'{where}: fewstep.sizes must be a non-empty list such as [512, "768x512"]')
            sizes = [parse_size(v, where) for v in listed]
        side_range, step = None, multiple
        if rng is not None:
            if (not isinstance(rng, list) or len(rng) != 2 or not all(isinstance(v, int) for v in rng)
                    or not 0 < rng[0] <= rng[1]):
                raise ValueError(f"{where}: fewstep.size_range must be [MIN, MAX] pixels, got {rng!r}")
            side_range = (rng[0], rng[1])
            step = int(meta.get("size_step", multiple))
            if step < 1:
                raise ValueError(f"{where}: fewstep.size_step must be >= 1, got {step}")
        return cls(tuple(sizes), side_range, step)

    @classmethod
    def from_config(cls, sizes: list[tuple[int, int]]) -> ServedSizes:
        return cls(tuple((int(h), int(w)) for h, w in sizes))


def parse_size(v, where: str = "size") -> tuple[int, int]:
    """512 -> (512, 512); "768x512" (WxH) -> (512, 768) as (height, width)."""
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return v, v
    m = _WXH.match(v) if isinstance(v, str) else None
    if not m or not int(m[1]) or not int(m[2]):
        raise ValueError(f'{where}: a size is a positive int (square) or "WxH", got {v!r}')
    return int(m[2]), int(m[1])
