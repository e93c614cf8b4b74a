"""Procedural skill icons: the data the embedded default model is trained on, drawn with Pillow.

Each image is one skill's icon in one colour on a light or dark background, with a caption that names all
three ("a blue guitar skill icon on a dark background"). Icons are drawn in their colour and shades of it, so
the caption's colour is the image's dominant hue, and the border is always background: the quality scorer
(`bench.quality`) judges colour and background from pixels with those two facts.

Everything follows from (seed, index): item i of a dataset is the same picture on every machine.
"""

from __future__ import annotations

import colorsys
import itertools
import math
import random
from collections.abc import Callable, Iterator, Sequence

from PIL import Image, ImageDraw
from pydantic import BaseModel

RGB = tuple[int, int, int]

# Vivid colours whose hues sit at least ~28 degrees apart, so a hue read from pixels names one of them.
COLORS: dict[str, RGB] = {
    "red": (215, 30, 45),
    "orange": (240, 110, 20),
    "yellow": (245, 220, 25),
    "green": (40, 160, 60),
    "blue": (35, 90, 215),
    "purple": (135, 55, 200),
    "pink": (235, 85, 170),
}
BACKGROUNDS = ("light", "dark")
# Drawing at a multiple of the output size and box-reducing is the antialiasing.
SUPERSAMPLE = 4


class IconSpec(BaseModel, frozen=True):
    skill: str
    color: str
    background: str

    @property
    def caption(self) -> str:
        return caption(self.color, self.skill, self.background)


def caption(color: str, skill: str, background: str) -> str:
    article = "an" if color[0] in "aeiou" else "a"
    return f"{article} {color} {skill} skill icon on a {background} background"


class _Pen:
    """Draws in icon units: (0, 0)..(1, 1) is the icon's box on the layer."""

    def __init__(self, draw: ImageDraw.ImageDraw, left: float, top: float, side: float):
        self.draw, self.left, self.top, self.side = draw, left, top, side

    def xy(self, x: float, y: float) -> tuple[float, float]:
        return self.left + x * self.side, self.top + y * self.side

    def px(self, length: float) -> int:
        return max(1, round(length * self.side))

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, fill: RGB) -> None:
        self.draw.ellipse([self.xy(cx - rx, cy - ry), self.xy(cx + rx, cy + ry)], fill=fill)

    def circle(self, cx: float, cy: float, r: float, fill: RGB) -> None:
        self.ellipse(cx, cy, r, r, fill)

    def rect(self, x0: float, y0: float, x1: float, y1: float, fill: RGB, radius: float = 0.0) -> None:
        self.draw.rounded_rectangle([self.xy(x0, y0), self.xy(x1, y1)], radius=self.px(radius), fill=fill)

    def poly(self, points: Sequence[tuple[float, float]], fill: RGB) -> None:
        self.draw.polygon([self.xy(x, y) for x, y in points], fill=fill)

    def line(self, points: Sequence[tuple[float, float]], fill: RGB, width: float) -> None:
        self.draw.line([self.xy(x, y) for x, y in points], fill=fill, width=self.px(width), joint="curve")

    def arc(self, box: tuple[float, float, float, float], start: float, end: float, fill: RGB, width: float) -> None:
        x0, y0, x1, y1 = box
        self.draw.arc([self.xy(x0, y0), self.xy(x1, y1)], start, end, fill=fill, width=self.px(width))


class _Ink(BaseModel, frozen=True):
    main: RGB
    dark: RGB
    light: RGB
    background: RGB


def _guitar(p: _Pen, c: _Ink) -> None:
    p.rect(0.455, 0.08, 0.545, 0.56, c.main)
    p.rect(0.43, 0.0, 0.57, 0.12, c.dark, radius=0.03)
    p.ellipse(0.5, 0.76, 0.23, 0.2, c.main)
    p.ellipse(0.5, 0.53, 0.17, 0.15, c.main)
    p.circle(0.5, 0.6, 0.065, c.background)
    p.rect(0.41, 0.79, 0.59, 0.83, c.dark)
    p.line([(0.5, 0.1), (0.5, 0.8)], c.light, 0.012)


def _laptop(p: _Pen, c: _Ink) -> None:
    p.rect(0.14, 0.14, 0.86, 0.63, c.main, radius=0.04)
    p.rect(0.2, 0.2, 0.8, 0.57, c.background)
    p.line([(0.38, 0.29), (0.3, 0.385), (0.38, 0.48)], c.main, 0.045)
    p.line([(0.62, 0.29), (0.7, 0.385), (0.62, 0.48)], c.main, 0.045)
    p.line([(0.55, 0.27), (0.45, 0.5)], c.light, 0.04)
    p.poly([(0.04, 0.66), (0.96, 0.66), (0.88, 0.78), (0.12, 0.78)], c.main)
    p.rect(0.42, 0.66, 0.58, 0.69, c.dark)


def _paintbrush(p: _Pen, c: _Ink) -> None:
    p.poly([(0.46, 0.0), (0.54, 0.0), (0.57, 0.55), (0.43, 0.55)], c.main)
    p.rect(0.41, 0.55, 0.59, 0.68, c.light)
    p.poly([(0.4, 0.68), (0.6, 0.68), (0.62, 0.84), (0.5, 1.0), (0.38, 0.84)], c.main)
    p.line([(0.45, 0.72), (0.47, 0.9)], c.dark, 0.02)


def _football(p: _Pen, c: _Ink) -> None:
    p.circle(0.5, 0.5, 0.44, c.main)
    corners = [(0.5 + 0.14 * math.sin(a), 0.5 - 0.14 * math.cos(a)) for a in (i * 2 * math.pi / 5 for i in range(5))]
    p.poly(corners, c.dark)
    for x, y in corners:
        dx, dy = x - 0.5, y - 0.5
        p.line([(x, y), (0.5 + dx * 2.9, 0.5 + dy * 2.9)], c.dark, 0.03)
        p.circle(0.5 + dx * 3.1, 0.5 + dy * 3.1, 0.06, c.dark)


def _chefs_knife(p: _Pen, c: _Ink) -> None:
    p.poly([(0.41, 0.62), (0.41, 0.1), (0.45, 0.0), (0.54, 0.1), (0.6, 0.3), (0.61, 0.62)], c.main)
    p.rect(0.39, 0.61, 0.63, 0.67, c.light)
    p.rect(0.44, 0.67, 0.58, 0.99, c.dark, radius=0.04)
    p.circle(0.51, 0.76, 0.02, c.background)
    p.circle(0.51, 0.89, 0.02, c.background)


def _camera(p: _Pen, c: _Ink) -> None:
    p.rect(0.32, 0.17, 0.62, 0.32, c.main, radius=0.03)
    p.rect(0.06, 0.27, 0.94, 0.86, c.main, radius=0.08)
    p.circle(0.5, 0.565, 0.23, c.background)
    p.circle(0.5, 0.565, 0.17, c.dark)
    p.circle(0.5, 0.565, 0.08, c.light)
    p.rect(0.74, 0.34, 0.86, 0.42, c.light)


def _book(p: _Pen, c: _Ink) -> None:
    p.poly([(0.04, 0.8), (0.5, 0.9), (0.96, 0.8), (0.96, 0.86), (0.5, 0.96), (0.04, 0.86)], c.dark)
    p.poly([(0.06, 0.2), (0.48, 0.29), (0.48, 0.87), (0.06, 0.78)], c.main)
    p.poly([(0.94, 0.2), (0.52, 0.29), (0.52, 0.87), (0.94, 0.78)], c.main)
    for y in (0.36, 0.49, 0.62):
        p.line([(0.13, y), (0.41, y + 0.06)], c.background, 0.025)
        p.line([(0.87, y), (0.59, y + 0.06)], c.background, 0.025)


def _microphone(p: _Pen, c: _Ink) -> None:
    p.rect(0.35, 0.03, 0.65, 0.52, c.main, radius=0.15)
    for y in (0.16, 0.26, 0.36):
        p.line([(0.37, y), (0.63, y)], c.dark, 0.022)
    p.arc((0.25, 0.22, 0.75, 0.68), 0, 180, c.main, 0.05)
    p.line([(0.5, 0.67), (0.5, 0.86)], c.main, 0.055)
    p.rect(0.3, 0.84, 0.7, 0.92, c.dark, radius=0.03)


def _dumbbell(p: _Pen, c: _Ink) -> None:
    p.rect(0.12, 0.46, 0.88, 0.54, c.dark)
    p.rect(0.2, 0.22, 0.33, 0.78, c.main, radius=0.03)
    p.rect(0.67, 0.22, 0.8, 0.78, c.main, radius=0.03)
    p.rect(0.09, 0.32, 0.2, 0.68, c.main, radius=0.03)
    p.rect(0.8, 0.32, 0.91, 0.68, c.main, radius=0.03)
    p.rect(0.03, 0.44, 0.09, 0.56, c.dark)
    p.rect(0.91, 0.44, 0.97, 0.56, c.dark)


def _wrench(p: _Pen, c: _Ink) -> None:
    p.rect(0.43, 0.28, 0.57, 0.97, c.main, radius=0.07)
    p.circle(0.5, 0.2, 0.19, c.main)
    p.rect(0.43, -0.01, 0.57, 0.2, c.background)
    p.circle(0.5, 0.87, 0.035, c.background)


def _chess_pawn(p: _Pen, c: _Ink) -> None:
    p.circle(0.5, 0.2, 0.14, c.main)
    p.poly([(0.41, 0.38), (0.59, 0.38), (0.69, 0.77), (0.31, 0.77)], c.main)
    p.ellipse(0.5, 0.37, 0.17, 0.045, c.dark)
    p.rect(0.2, 0.77, 0.8, 0.93, c.main, radius=0.03)
    p.rect(0.26, 0.74, 0.74, 0.79, c.dark)


def _pencil(p: _Pen, c: _Ink) -> None:
    p.rect(0.39, 0.0, 0.61, 0.06, c.dark, radius=0.03)
    p.rect(0.39, 0.05, 0.61, 0.11, c.light)
    p.rect(0.39, 0.11, 0.61, 0.7, c.main)
    p.line([(0.465, 0.11), (0.465, 0.7)], c.dark, 0.014)
    p.line([(0.535, 0.11), (0.535, 0.7)], c.dark, 0.014)
    p.poly([(0.39, 0.7), (0.61, 0.7), (0.5, 0.97)], c.light)
    p.poly([(0.455, 0.86), (0.545, 0.86), (0.5, 0.97)], c.dark)


_Drawer = Callable[[_Pen, _Ink], None]
# skill name as captions say it -> (drawing, its resting angle in degrees: long tools lie diagonally)
_ICONS: dict[str, tuple[_Drawer, float]] = {
    "guitar": (_guitar, -35.0),
    "laptop": (_laptop, 0.0),
    "paintbrush": (_paintbrush, 40.0),
    "football": (_football, 0.0),
    "chef's knife": (_chefs_knife, -40.0),
    "camera": (_camera, 0.0),
    "book": (_book, 0.0),
    "microphone": (_microphone, -15.0),
    "dumbbell": (_dumbbell, 25.0),
    "wrench": (_wrench, 45.0),
    "chess pawn": (_chess_pawn, 0.0),
    "pencil": (_pencil, -45.0),
}
SKILLS: tuple[str, ...] = tuple(_ICONS)


def _hsv_rgb(h: float, s: float, v: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return round(r * 255), round(g * 255), round(b * 255)


def _ink(color: str, background: str, rng: random.Random) -> _Ink:
    h, s, v = colorsys.rgb_to_hsv(*(x / 255 for x in COLORS[color]))
    h += rng.uniform(-0.01, 0.01)
    s *= rng.uniform(0.88, 1.0)
    v *= rng.uniform(0.88, 1.0)
    # Backgrounds stay near grey (light) or near black (dark) so they never read as an icon colour.
    grey = rng.uniform(222, 248) if background == "light" else rng.uniform(16, 46)
    bg = tuple(round(min(255.0, max(0.0, grey + rng.uniform(-5, 5)))) for _ in range(3))
    return _Ink(
        main=_hsv_rgb(h, s, v),
        dark=_hsv_rgb(h, s, v * 0.62),
        light=_hsv_rgb(h, s * 0.5, min(1.0, v * 1.1)),
        background=bg,
    )


def draw_icon(spec: IconSpec, rng: random.Random, size_px: int = 64) -> Image.Image:
    """One icon; every random choice (shade, placement, angle) is drawn from `rng`."""
    if spec.skill not in _ICONS or spec.color not in COLORS or spec.background not in BACKGROUNDS:
        raise ValueError(f"unknown icon {spec}: skills {SKILLS}, colours {tuple(COLORS)}, backgrounds {BACKGROUNDS}")
    drawer, angle = _ICONS[spec.skill]
    ink = _ink(spec.color, spec.background, rng)
    canvas = size_px * SUPERSAMPLE
    side = canvas * rng.uniform(0.6, 0.74)
    cx = canvas / 2 + rng.uniform(-0.05, 0.05) * canvas
    cy = canvas / 2 + rng.uniform(-0.05, 0.05) * canvas
    layer = Image.new("RGBA", (canvas, canvas), (0, 0, 0, 0))
    drawer(_Pen(ImageDraw.Draw(layer), cx - side / 2, cy - side / 2, side), ink)
    layer = layer.rotate(angle + rng.uniform(-10, 10), resample=Image.Resampling.BICUBIC, center=(cx, cy))
    image = Image.new("RGBA", (canvas, canvas), ink.background + (255,))
    image.alpha_composite(layer)
    return image.convert("RGB").reduce(SUPERSAMPLE)


def icon_specs(count: int, seed: int = 0) -> list[IconSpec]:
    """`count` specs that go through every (skill, colour, background) once per round, in a seeded order."""
    combos = [IconSpec(skill=s, color=c, background=b) for s, c, b in itertools.product(SKILLS, COLORS, BACKGROUNDS)]
    specs: list[IconSpec] = []
    while len(specs) < count:
        order = combos[:]
        random.Random(f"icons:{seed}:round:{len(specs) // len(combos)}").shuffle(order)
        specs.extend(order)
    return specs[:count]


class IconDataset(Sequence[tuple[Image.Image, str]]):
    """`count` (image, caption) pairs; item i depends only on (seed, i, size_px)."""

    def __init__(self, count: int, seed: int = 0, size_px: int = 64):
        if size_px % 8:
            raise ValueError(f"size_px must be a multiple of 8 (the VAE's downscale), got {size_px}")
        self.specs = icon_specs(count, seed)
        self.seed = seed
        self.size_px = size_px

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, i: int) -> tuple[Image.Image, str]:
        spec = self.specs[i]
        image = draw_icon(spec, random.Random(f"icons:{self.seed}:item:{i}"), self.size_px)
        return image, spec.caption

    def __iter__(self) -> Iterator[tuple[Image.Image, str]]:
        return (self[i] for i in range(len(self)))
