"""Scenes and clips of coloured shapes: sampling their symbolic description and drawing them.

A scene is 1-3 objects on a 3 x 3 grid. Each object is a dict

    {"shape": "circle", "colour": "red", "size": "big", "row": 0, "col": 2, "x": 0.84, "y": 0.17}

with (x, y) its centre as a fraction of the image side. Objects of one scene have distinct cells and
distinct (colour, shape) pairs. A clip is one object moving left/right/up/down over a few frames,
sometimes beside a still distractor. Drawing uses Pillow: shapes are drawn on a canvas several times
larger and downsampled (anti-aliasing), then laid over a grey background with optional noise, so
the images are `(size, size, 3)` uint8 RGB.

Compositional hold-out: `HELD_OUT_PAIRS` are colour-shape pairs that never occur in the train, val or
test splits, only in `comp`; every colour and every shape still occurs in training with other partners.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw

from muomni.data.language import COLOURS, DIRECTIONS, SHAPES, SIZES

RGB = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 100, 235),
    "yellow": (235, 215, 40), "purple": (160, 70, 210), "orange": (245, 140, 30),
}
HELD_OUT_PAIRS = (("red", "star"), ("green", "triangle"), ("blue", "square"), ("yellow", "circle"))
RADIUS = {"big": 0.14, "small": 0.09}  # object radius as a fraction of the image side
JITTER = 0.03  # random offset of an object from its cell centre (fraction of the side)


def allowed_pairs(comp: bool) -> list[tuple[str, str]]:
    """Colour-shape pairs a split may use: all of them for `comp`, the rest otherwise."""
    return [(c, s) for c in COLOURS for s in SHAPES if comp or (c, s) not in HELD_OUT_PAIRS]


def _place(row: int, col: int, rng: random.Random) -> tuple[float, float]:
    return ((col + 0.5) / 3 + rng.uniform(-JITTER, JITTER), (row + 0.5) / 3 + rng.uniform(-JITTER, JITTER))


def sample_scene(rng: random.Random, comp: bool = False) -> dict:
    """A random scene; in `comp` at least one object uses a held-out colour-shape pair."""
    n = rng.choice((1, 2, 2, 3, 3))
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], n)
    pool = allowed_pairs(comp=False)
    pairs = rng.sample(pool, n)
    if comp:
        pairs[0] = rng.choice(HELD_OUT_PAIRS)  # distinct from the rest, which come from the pool
    objects = []
    for (row, col), (colour, shape) in zip(cells, pairs):
        x, y = _place(row, col, rng)
        objects.append({"shape": shape, "colour": colour, "size": rng.choice(SIZES), "row": row, "col": col,
                        "x": round(x, 3), "y": round(y, 3)})
    return {"objects": objects, "background": rng.randint(15, 70), "noise": rng.choice((0, 6, 12)),
            "seed": rng.randrange(2**31)}


def sample_clip(rng: random.Random, n_frames: int, comp: bool = False) -> dict:
    """A clip: one object moving in a straight line across the grid, maybe a still distractor.

    Returns ``{"mover", "direction", "path": [[x, y] per frame], "distractor", background...}``.
    """
    pool = allowed_pairs(comp=False)
    colour, shape = rng.choice(HELD_OUT_PAIRS) if comp else rng.choice(pool)
    direction = rng.choice(DIRECTIONS)
    lane = rng.randrange(3)  # the row (horizontal motion) or column (vertical motion) it moves along
    start, end = (0.8, 0.2) if direction in ("left", "up") else (0.2, 0.8)
    along = [start + (end - start) * t / (n_frames - 1) for t in range(n_frames)]
    across = (lane + 0.5) / 3 + rng.uniform(-JITTER, JITTER)
    horizontal = direction in ("left", "right")
    path = [[round(a, 3), round(across, 3)] if horizontal else [round(across, 3), round(a, 3)] for a in along]
    mover = {"shape": shape, "colour": colour, "size": rng.choice(SIZES)}
    distractor = None
    if rng.random() < 0.5:
        others = [(c, s) for c, s in pool if c != colour and s != shape]
        d_colour, d_shape = rng.choice(others)
        d_lane = rng.choice([k for k in range(3) if k != lane])
        d_across, d_along = (d_lane + 0.5) / 3, (rng.randrange(3) + 0.5) / 3
        x, y = (d_along, d_across) if horizontal else (d_across, d_along)
        distractor = {"shape": d_shape, "colour": d_colour, "size": rng.choice(SIZES), "x": round(x, 3),
                      "y": round(y, 3)}
    return {"mover": mover, "direction": direction, "path": path, "distractor": distractor,
            "background": rng.randint(15, 70), "noise": rng.choice((0, 6, 12)), "seed": rng.randrange(2**31)}


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = 0.85 * r  # a square of the same visual weight as the circle
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        big_r, cy = 1.15 * r, cy + 0.2 * r  # centroid sits low in an upright triangle
        draw.polygon([(cx + big_r * np.cos(a), cy + big_r * np.sin(a)) for a in np.deg2rad([-90, 30, 150])], fill=fill)
    elif shape == "star":
        angles = np.deg2rad(np.arange(10) * 36 - 90)
        radii = np.where(np.arange(10) % 2 == 0, 1.2 * r, 0.5 * r)
        draw.polygon([(cx + q * np.cos(a), cy + q * np.sin(a)) for q, a in zip(radii, angles)], fill=fill)
    else:
        raise ValueError(f"unknown shape '{shape}'; expected one of {', '.join(SHAPES)}")


def render(objects: list[dict], size: int, background: int = 40, noise: float = 0.0, seed: int = 0) -> Image.Image:
    """Draw objects (each with shape, colour, size, x, y) on a `size` x `size` RGB image."""
    scale = 4 if size <= 128 else 2  # supersampling factor for smooth edges
    big = size * scale
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for obj in objects:
        _draw_shape(draw, obj["shape"], obj["x"] * big, obj["y"] * big, RADIUS[obj["size"]] * big,
                    RGB[obj["colour"]] + (255,))
    layer = layer.resize((size, size), Image.LANCZOS)
    ground = np.full((size, size, 3), background, dtype=np.float32)
    if noise:
        ground += np.random.default_rng(seed).normal(0.0, noise, (size, size, 1)).astype(np.float32)
    image = Image.fromarray(np.clip(ground, 0, 255).astype(np.uint8), "RGB").convert("RGBA")
    return Image.alpha_composite(image, layer).convert("RGB")


def render_scene(scene: dict, size: int) -> Image.Image:
    return render(scene["objects"], size, scene["background"], scene["noise"], scene["seed"])


def render_clip(clip: dict, size: int) -> np.ndarray:
    """The frames of a clip: `(frames, size, size, 3)` uint8; background and distractor stay still."""
    frames = []
    for x, y in clip["path"]:
        objects = ([clip["distractor"]] if clip["distractor"] else []) + [{**clip["mover"], "x": x, "y": y}]
        frames.append(np.asarray(render(objects, size, clip["background"], clip["noise"], clip["seed"])))
    return np.stack(frames)
