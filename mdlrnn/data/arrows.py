"""Arrow-pointing images (the pLSTM paper's extrapolation task): does the arrow point at the circle?

The facts of the paper's generator; all lengths are absolute pixels, the same at every resolution, so a
larger image only spreads the shapes over a larger area:

- white canvas (1.0), black shapes (0.0), three equal channels; padding p = 30, usable side s = size - 2p;
- arrow midpoint uniform in [0, s)^2; circle radius r uniform in [15, 30); on each axis the circle centre
  is (midpoint + offset) mod s with the offset uniform in [2r, s - 2r]; both are then shifted by p;
- label 1 with probability 1/2. With d the midpoint-centre distance and delta the arrow direction's
  deviation from the direction to the centre, label 1 draws delta uniformly from |delta| <= asin(r / 1.2 / d)
  (the ray from the midpoint passes within r / 1.2 of the centre), label 0 from
  |delta| in (asin(min(1, 1.2 r / d)), pi] (the ray misses the centre by more than 1.2 r);
- arrow length L = int(uniform(15, 30)), line width int(uniform(2, 4)); the shaft runs from midpoint - L/2
  to midpoint + L/2 along the direction, two head strokes of length L / 2.5 leave the tip at +-0.5 rad from
  the reversed direction; the circle is a filled disc of radius r.

Item i of a data set with seed S depends only on (S, i): its uniforms come from
``numpy.random.default_rng([S, i])`` in a fixed order, and only positions scale with s, so the same index at
another image size has the same radius, arrow length, line width and label.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ArrowGeometry", "ArrowPointing"]

HEAD_ANGLE = 0.5  # radians between a head stroke and the reversed direction
HEAD_FRACTION = 1 / 2.5  # head stroke length over arrow length
POSITIVE_MARGIN = 1 / 1.2  # label 1: the ray passes within this many radii of the centre
NEGATIVE_MARGIN = 1.2  # label 0: the ray misses the centre by more than this many radii


@dataclass(frozen=True)
class ArrowGeometry:
    """One image's shapes in pixel coordinates (x = column, y = row; pixel centres at integers)."""

    midpoint: tuple[float, float]
    direction: float  # radians, from the x axis towards the y axis
    length: int
    width: int
    centre: tuple[float, float]
    radius: float
    label: int

    def ray_distance(self) -> float:
        """Distance from the circle centre to the ray from the midpoint along the direction."""
        to_centre_x, to_centre_y = self.centre[0] - self.midpoint[0], self.centre[1] - self.midpoint[1]
        cos, sin = math.cos(self.direction), math.sin(self.direction)
        if to_centre_x * cos + to_centre_y * sin <= 0:  # the centre is behind the midpoint: nearest is the midpoint
            return math.hypot(to_centre_x, to_centre_y)
        return abs(to_centre_x * sin - to_centre_y * cos)


class ArrowPointing(torch.utils.data.Dataset):
    """``num_samples`` arrow-pointing images of ``image_size`` pixels, generated on the fly.

    Items are ``(image, label)``: a float32 tensor (3, S, S) in [0, 1] (a PIL RGB image when ``as_pil``),
    passed through ``transform`` when given, and the int label. The shape ranges default to the paper's;
    ``radius`` is [lo, hi) of a float, ``arrow_length`` and ``line_width`` [lo, hi) of int(uniform(lo, hi)).
    The disc stays inside the canvas when ``radius[1] <= padding`` (true for the defaults).
    """

    def __init__(
        self,
        num_samples: int,
        image_size: int,
        seed: int = 0,
        *,
        padding: int = 30,
        radius: tuple[float, float] = (15, 30),
        arrow_length: tuple[int, int] = (15, 30),
        line_width: tuple[int, int] = (2, 4),
        as_pil: bool = False,
        transform=None,
    ):
        self.num_samples = _check_int("num_samples", num_samples, minimum=0)
        self.image_size = _check_int("image_size", image_size, minimum=1)
        self.seed = _check_int("seed", seed, minimum=0)
        self.padding = _check_int("padding", padding, minimum=0)
        self.radius = _check_range("radius", radius, integer=False)
        self.arrow_length = _check_range("arrow_length", arrow_length, integer=True)
        self.line_width = _check_range("line_width", line_width, integer=True)
        self.usable = self.image_size - 2 * self.padding
        if self.usable <= 4 * self.radius[1]:  # the centre's offset window [2r, s - 2r] must be non-empty
            raise ValueError(
                f"image_size={image_size} is too small for padding={padding} and radius={radius}: need "
                f"image_size - 2 * padding > 4 * radius[1] = {4 * self.radius[1]}, got {self.usable}"
            )
        self.as_pil = bool(as_pil)
        self.transform = transform

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index):
        geometry = self.geometry(index)
        canvas = self._draw(geometry)
        if self.as_pil:
            from PIL import Image  # Pillow is only needed for PIL output, not a dependency of the package

            image = Image.fromarray((canvas[0] * 255).astype(np.uint8), "L").convert("RGB")
        else:
            image = torch.from_numpy(canvas)
        if self.transform is not None:
            image = self.transform(image)
        return image, geometry.label

    def geometry(self, index: int) -> ArrowGeometry:
        """The shapes of item ``index`` (negative indices count from the end)."""
        index = self._check_index(index)
        # Ten uniforms in a fixed order, then scaled: sizes and label do not depend on image_size.
        u = np.random.default_rng([self.seed, index]).random(10)
        usable = self.usable
        radius = self.radius[0] + (self.radius[1] - self.radius[0]) * u[2]
        midpoint = u[0:2] * usable
        centre = (midpoint + 2 * radius + u[3:5] * (usable - 4 * radius)) % usable
        label = int(u[5] < 0.5)
        to_centre = centre - midpoint
        distance = math.hypot(*to_centre)
        if label:
            deviation = math.asin(min(1.0, POSITIVE_MARGIN * radius / distance)) * u[6]
        else:  # |delta| in (lowest, pi]
            lowest = math.asin(min(1.0, NEGATIVE_MARGIN * radius / distance))
            deviation = math.pi - (math.pi - lowest) * u[6]
        deviation = deviation if u[7] < 0.5 else -deviation
        return ArrowGeometry(
            midpoint=tuple(float(v) for v in midpoint + self.padding),
            direction=math.atan2(to_centre[1], to_centre[0]) + deviation,
            length=self.arrow_length[0] + int((self.arrow_length[1] - self.arrow_length[0]) * u[8]),
            width=self.line_width[0] + int((self.line_width[1] - self.line_width[0]) * u[9]),
            centre=tuple(float(v) for v in centre + self.padding),
            radius=float(radius),
            label=label,
        )

    def render(self, geometry: ArrowGeometry) -> torch.Tensor:
        """The (3, S, S) float32 image of ``geometry``."""
        return torch.from_numpy(self._draw(geometry))

    def _draw(self, geometry: ArrowGeometry) -> np.ndarray:
        canvas = np.ones((3, self.image_size, self.image_size), np.float32)
        (cx, cy), r = geometry.centre, geometry.radius
        _blacken(canvas, (cx - r, cy - r), (cx + r, cy + r), lambda x, y: (x - cx) ** 2 + (y - cy) ** 2 <= r * r)

        midpoint = np.array(geometry.midpoint)
        forward = np.array([math.cos(geometry.direction), math.sin(geometry.direction)])
        tip = midpoint + geometry.length / 2 * forward
        head_angles = geometry.direction + math.pi + np.array([HEAD_ANGLE, -HEAD_ANGLE])
        heads = tip + HEAD_FRACTION * geometry.length * np.stack([np.cos(head_angles), np.sin(head_angles)], 1)
        starts = np.stack([midpoint - geometry.length / 2 * forward, tip, tip])
        ends = np.concatenate([tip[None], heads])
        half_width = geometry.width / 2
        corners = np.concatenate([starts, ends])
        _blacken(
            canvas,
            corners.min(0) - half_width,
            corners.max(0) + half_width,
            lambda x, y: _near_segments(x, y, starts, ends, half_width),
        )
        return canvas

    def _check_index(self, index) -> int:
        index = operator.index(index)
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} is out of range for {self.num_samples} samples")
        return index % self.num_samples

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_samples={self.num_samples}, image_size={self.image_size}, seed={self.seed}, "
            f"padding={self.padding}, radius={self.radius}, arrow_length={self.arrow_length}, "
            f"line_width={self.line_width})"
        )


def _blacken(canvas: np.ndarray, low, high, inside) -> None:
    """Set to 0 the pixels of the box [low, high] (x, y; clipped to the canvas) where inside(x, y) holds."""
    size = canvas.shape[-1]
    x0, y0 = (max(0, math.ceil(v)) for v in low)
    x1, y1 = (min(size - 1, math.floor(v)) + 1 for v in high)
    if x0 >= x1 or y0 >= y1:
        return
    box = canvas[:, y0:y1, x0:x1]  # a view: writing into it writes the canvas
    box[:, inside(np.arange(x0, x1, dtype=np.float64)[None, :], np.arange(y0, y1, dtype=np.float64)[:, None])] = 0.0


def _near_segments(x, y, starts, ends, half_width):
    """Whether each pixel (x, y) lies within half_width of any segment starts[k] -> ends[k]."""
    start_x, start_y = starts[:, 0, None, None], starts[:, 1, None, None]
    step_x, step_y = (ends - starts)[:, 0, None, None], (ends - starts)[:, 1, None, None]
    rel_x, rel_y = x - start_x, y - start_y
    along = np.clip((rel_x * step_x + rel_y * step_y) / (step_x**2 + step_y**2), 0.0, 1.0)
    return ((rel_x - along * step_x) ** 2 + (rel_y - along * step_y) ** 2 <= half_width**2).any(0)


def _check_int(name: str, value, minimum: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_range(name: str, value, integer: bool) -> tuple:
    kind = numbers.Integral if integer else numbers.Real
    try:
        low, high = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (lo, hi), got {value!r}") from None
    if not all(isinstance(v, kind) and not isinstance(v, bool) for v in (low, high)) or not 0 < low < high:
        number = "ints" if integer else "numbers"
        raise ValueError(f"{name} must be a pair of {number} with 0 < lo < hi, got {value!r}")
    return (int(low), int(high)) if integer else (float(low), float(high))
