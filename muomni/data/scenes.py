"""Scenes and clips of coloured shapes: sampling their symbolic description and drawing them.

A scene is 1-3 objects on a 3 x 3 grid. Each object is a dict

    {"shape": "circle", "colour": "red", "size": "big", "row": 0, "col": 2, "x": 0.84, "y": 0.17,
     "angle": 12.0, "scale": 1.05, "rgb": [214, 52, 40]}

with (x, y) its centre as a fraction of the image side: a free position anywhere inside its cell, so
the place name ("top right") is the cell that holds the centre. Objects of one scene have distinct
cells and distinct (colour, shape) pairs. A clip is one object moving left/right/up/down over a few
frames, sometimes beside a still distractor.

Drawing is *randomised* in everything that does not change the answer to a question, so that a
model learns shapes and colours rather than one way of drawing them (domain randomisation):
each object's rotation, size jitter and shade inside its named hue; per picture a `style` — the
background (flat, gradient or noisy, any light or dark tint), filled or outlined shapes, the
resolution it is drawn at, a little blur and JPEG compression. `sample_style(rng, family)` draws a
style; family ``"train"`` is used for train/val/test/comp, family ``"wild"`` is a rendering never seen
in training (textured backgrounds, sticker-like shapes with a contrasting border, no anti-aliasing,
stronger rotation) for the `wild` split. A style is a plain dict stored in the manifest, so every
picture can be redrawn exactly. Images are `(size, size, 3)` uint8 RGB.

Compositional hold-out: `HELD_OUT_PAIRS` are colour-shape pairs that never occur in the train, val or
test splits, only in `comp`; every colour and every shape still occurs in training with other partners.
"""

from __future__ import annotations

import colorsys
import io
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from muomni.data.language import COLOURS, DIRECTIONS, SHAPES, SIZES

RGB = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 100, 235),
    "yellow": (235, 215, 40), "purple": (160, 70, 210), "orange": (245, 140, 30),
}
HELD_OUT_PAIRS = (("red", "star"), ("green", "triangle"), ("blue", "square"), ("yellow", "circle"))
RADIUS = {"big": 0.14, "small": 0.09}  # object radius as a fraction of the image side
JITTER = 0.03  # random offset of an object from its cell centre (fraction of the side), plain scenes
FAMILIES = ("train", "wild")


def allowed_pairs(comp: bool) -> list[tuple[str, str]]:
    """Colour-shape pairs a split may use: all of them for `comp`, the rest otherwise."""
    return [(c, s) for c in COLOURS for s in SHAPES if comp or (c, s) not in HELD_OUT_PAIRS]


# ---------------------------------------------------------------------------------------------
# what may vary: the factors of a drawing, drawn from one random stream


def jittered_rgb(colour: str, rng: random.Random, amount: float = 1.0) -> list[int]:
    """A shade of the named colour: hue within +-7 degrees, a little less saturated or darker.

    The named hues are at least 25 degrees apart (red 0, orange 30, yellow 53), so a shade never
    crosses into a neighbour's name.
    """
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in RGB[colour]))
    h = (h + amount * rng.uniform(-0.02, 0.02)) % 1.0
    s *= 1 - amount * rng.uniform(0.0, 0.3)
    v *= 1 - amount * rng.uniform(0.0, 0.25)
    return [int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, s, v)]


def _tint(rng: random.Random) -> list[int]:
    """A background colour: any brightness, nearly grey (a pale or dark tint, never a named hue)."""
    grey = rng.uniform(10, 245)
    return [int(np.clip(grey + rng.uniform(-10, 10), 0, 255)) for _ in range(3)]


def sample_style(rng: random.Random, family: str = "train") -> dict:
    """How one picture is drawn. ``family``: "train" (the training renderings) or "wild" (held out)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown rendering family '{family}'; expected one of {', '.join(FAMILIES)}")
    wild = family == "wild"
    background = {"kind": rng.choice(("texture",) if wild else ("flat", "gradient", "gradient", "noise")),
                  "colours": [_tint(rng), _tint(rng)], "angle": rng.uniform(0, 360),
                  "period": rng.randint(4, 10), "noise": rng.choice((4, 8, 14)), "seed": rng.randrange(2**31)}
    return {
        "family": family,
        "background": background,
        "outline": 0.0 if wild else rng.choice((0.0, 0.0, rng.uniform(0.15, 0.35))),  # line width / radius; 0: filled
        "border": wild,  # a contrasting border around a filled shape, like a sticker
        "supersample": 1 if wild else 4,  # 1: jagged edges, as a plain renderer draws them
        "render_size": rng.choice((48, 64, 96, 128)),  # drawn at this size, then resized to the image size
        "blur": rng.choice((0.0, 0.0, rng.uniform(0.3, 0.8))),  # Gaussian blur radius at the image size
        "jpeg": rng.choice((0, 0, rng.randint(30, 90))),  # JPEG quality; 0: no compression
    }


def extent(obj: dict) -> float:
    """How far the drawn shape reaches from its centre (fraction of the side; a star's points reach 1.2 r)."""
    return 1.2 * RADIUS[obj["size"]] * obj.get("scale", 1.0)


def sample_object(colour: str, shape: str, size: str, row: int, col: int, rng: random.Random,
                  max_angle: float = 20.0) -> dict:
    """One object in cell (row, col): its centre anywhere in the cell's inner 70% that keeps the shape
    inside the picture, a rotation within +-``max_angle`` degrees, +-12% size and a shade of its colour."""
    obj = {"shape": shape, "colour": colour, "size": size, "row": row, "col": col,
           "angle": round(rng.uniform(-max_angle, max_angle), 1), "scale": round(rng.uniform(0.88, 1.12), 3),
           "rgb": jittered_rgb(colour, rng)}
    for key, cell in (("x", col), ("y", row)):
        centre = (cell + 0.5) / 3 + rng.uniform(-0.35 / 3, 0.35 / 3)
        obj[key] = round(min(max(centre, extent(obj)), 1 - extent(obj)), 3)
    return obj


def _apart(objects: list[dict]) -> bool:
    """No two shapes overlap (their reaches plus a small gap)."""
    return all(np.hypot(a["x"] - b["x"], a["y"] - b["y"]) > extent(a) + extent(b) + 0.02
               for k, a in enumerate(objects) for b in objects[k + 1:])


def sample_scene(rng: random.Random, comp: bool = False, family: str | None = None) -> dict:
    """A random scene; in `comp` at least one object uses a held-out colour-shape pair.

    ``family`` None gives a plain scene (objects near their cell centres on a grey background, as the
    notebooks draw by hand); "train" or "wild" a randomised one with its `style`.
    """
    n = rng.choice((1, 2, 2, 3, 3))
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], n)
    pool = allowed_pairs(comp=False)
    pairs = rng.sample(pool, n)
    if comp:
        pairs[0] = rng.choice(HELD_OUT_PAIRS)  # distinct from the rest, which come from the pool
    max_angle = 30.0 if family == "wild" else 20.0
    if family is None:
        objects = []
        for (row, col), (colour, shape) in zip(cells, pairs):
            x, y = (col + 0.5) / 3 + rng.uniform(-JITTER, JITTER), (row + 0.5) / 3 + rng.uniform(-JITTER, JITTER)
            objects.append({"shape": shape, "colour": colour, "size": rng.choice(SIZES), "row": row, "col": col,
                            "x": round(x, 3), "y": round(y, 3)})
    else:
        sizes = [rng.choice(SIZES) for _ in cells]
        while True:  # free positions: draw again until no two shapes overlap (a few tries at most)
            objects = [sample_object(colour, shape, size, row, col, rng, max_angle=max_angle)
                       for (row, col), (colour, shape), size in zip(cells, pairs, sizes)]
            if _apart(objects):
                break
    scene = {"objects": objects, "background": rng.randint(15, 70), "noise": rng.choice((0, 6, 12)),
             "seed": rng.randrange(2**31)}
    if family is not None:
        scene["style"] = sample_style(rng, family)
    return scene


def sample_clip(rng: random.Random, n_frames: int, comp: bool = False, family: str | None = None) -> dict:
    """A clip: one object moving in a straight line across the grid, maybe a still distractor.

    Returns ``{"mover", "direction", "path": [[x, y] per frame], "distractor", background...}`` and,
    with a ``family``, a drawing `style`, a free lane, start, speed and rotation.
    """
    pool = allowed_pairs(comp=False)
    colour, shape = rng.choice(HELD_OUT_PAIRS) if comp else rng.choice(pool)
    direction = rng.choice(DIRECTIONS)
    lane = rng.randrange(3)  # the row (horizontal motion) or column (vertical motion) it moves along
    if family is None:
        start, end, across = 0.8, 0.2, (lane + 0.5) / 3 + rng.uniform(-JITTER, JITTER)
    else:  # any start on the first half of the way, any speed that crosses at least half the picture
        start, end, across = rng.uniform(0.75, 0.88), rng.uniform(0.12, 0.3), (lane + 0.5) / 3 + rng.uniform(-0.1, 0.1)
    if direction in ("right", "down"):
        start, end = 1 - start, 1 - end
    along = [start + (end - start) * t / (n_frames - 1) for t in range(n_frames)]
    horizontal = direction in ("left", "right")
    path = [[round(a, 3), round(across, 3)] if horizontal else [round(across, 3), round(a, 3)] for a in along]
    mover = {"shape": shape, "colour": colour, "size": rng.choice(SIZES)}
    if family is not None:
        mover.update(angle=round(rng.uniform(-20, 20), 1), scale=round(rng.uniform(0.88, 1.12), 3),
                     rgb=jittered_rgb(colour, rng))
    distractor = None
    if rng.random() < 0.5:
        others = [(c, s) for c, s in pool if c != colour and s != shape]
        d_colour, d_shape = rng.choice(others)
        d_lane = rng.choice([k for k in range(3) if k != lane])
        d_across, d_along = (d_lane + 0.5) / 3, (rng.randrange(3) + 0.5) / 3
        x, y = (d_along, d_across) if horizontal else (d_across, d_along)
        distractor = {"shape": d_shape, "colour": d_colour, "size": rng.choice(SIZES), "x": round(x, 3),
                      "y": round(y, 3)}
        if family is not None:
            distractor.update(angle=round(rng.uniform(-20, 20), 1), rgb=jittered_rgb(d_colour, rng))
    clip = {"mover": mover, "direction": direction, "path": path, "distractor": distractor,
            "background": rng.randint(15, 70), "noise": rng.choice((0, 6, 12)), "seed": rng.randrange(2**31)}
    if family is not None:
        clip["style"] = sample_style(rng, family)
    return clip


# ---------------------------------------------------------------------------------------------
# drawing


def shape_outline(shape: str, cx: float, cy: float, r: float, angle: float = 0.0) -> list[tuple[float, float]] | None:
    """The polygon of a shape of radius ``r`` centred at (cx, cy), rotated by ``angle`` degrees
    (None for a circle, which Pillow draws as an ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        h = 0.85 * r  # a square of the same visual weight as the circle
        points = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "triangle":
        big_r = 1.15 * r  # the centroid sits low in an upright triangle
        points = [(big_r * np.cos(a), 0.2 * r + big_r * np.sin(a)) for a in np.deg2rad([-90, 30, 150])]
    elif shape == "star":
        angles = np.deg2rad(np.arange(10) * 36 - 90)
        radii = np.where(np.arange(10) % 2 == 0, 1.2 * r, 0.5 * r)
        points = [(q * np.cos(a), q * np.sin(a)) for q, a in zip(radii, angles)]
    else:
        raise ValueError(f"unknown shape '{shape}'; expected one of {', '.join(SHAPES)}")
    turn = np.deg2rad(angle)
    cos, sin = np.cos(turn), np.sin(turn)
    return [(cx + px * cos - py * sin, cy + px * sin + py * cos) for px, py in points]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple,
                angle: float = 0.0, line: int = 0, border: tuple | None = None) -> None:
    """Draw one shape: filled (``line`` 0) or as an outline ``line`` pixels wide; ``border`` adds a
    contrasting edge around a filled shape."""
    edge = border if border is not None else (fill if line else None)
    width = max(line, 2 if border is not None else 0)
    polygon = shape_outline(shape, cx, cy, r, angle)
    inside = None if line else fill
    if polygon is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=inside, outline=edge, width=width)
    else:
        draw.polygon(polygon, fill=inside, outline=edge, width=width)


def draw_background(kind: str, colours: list, size: int, angle: float = 0.0, period: int = 6, noise: float = 0.0,
               seed: int = 0) -> np.ndarray:
    """A background ``(size, size, 3)`` float32: flat, a linear gradient, flat + noise, or a texture
    (checks or stripes in two close tints)."""
    first, second = np.array(colours[0], np.float32), np.array(colours[1], np.float32)
    if kind == "flat":
        return np.broadcast_to(first, (size, size, 3)).copy()
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    if kind == "gradient":
        turn = np.deg2rad(angle)
        t = (np.cos(turn) * (cols - 0.5) + np.sin(turn) * (rows - 0.5)) / np.sqrt(0.5) + 0.5
        return first + np.clip(t, 0, 1)[..., None] * (second - first)
    if kind == "noise":
        grain = np.random.default_rng(seed).normal(0.0, noise, (size, size, 1)).astype(np.float32)
        return first + grain
    if kind == "texture":
        second = first + np.clip(second - first, -40, 40)  # a gentle pattern, so the shapes stay on top
        step = max(1, round(period * size / 64))
        r, c = np.mgrid[0:size, 0:size] // step
        pattern = ((r + c) % 2 if seed % 2 else c % 2).astype(np.float32)
        return first + pattern[..., None] * (second - first)
    raise ValueError(f"unknown background kind '{kind}'")


def render(objects: list[dict], size: int, background: int = 40, noise: float = 0.0, seed: int = 0,
           style: dict | None = None) -> Image.Image:
    """Draw objects (each with shape, colour, size, x, y; optional angle, scale, rgb) on a
    `size` x `size` RGB image. Without a ``style``: anti-aliased filled shapes on a flat grey
    ``background`` with optional grey ``noise`` (the plain drawing of the notebooks)."""
    style = style or {}
    draw_size = style.get("render_size", size)
    scale = style.get("supersample", 4 if draw_size <= 128 else 2)  # supersampling for smooth edges
    big = draw_size * scale
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    outline = style.get("outline", 0.0)
    for obj in objects:
        r = RADIUS[obj["size"]] * obj.get("scale", 1.0) * big
        fill = tuple(obj.get("rgb", RGB[obj["colour"]])) + (255,)
        border = None
        if style.get("border"):  # dark on a light picture, light on a dark one
            light = np.mean(style["background"]["colours"][0]) > 128
            border = (25, 25, 25, 255) if light else (235, 235, 235, 255)
        _draw_shape(draw, obj["shape"], obj["x"] * big, obj["y"] * big, r, fill, obj.get("angle", 0.0),
                    line=max(1, round(outline * r)) if outline else 0, border=border)
    layer = layer.resize((draw_size, draw_size), Image.LANCZOS if scale > 1 else Image.NEAREST)
    if "background" in style:
        ground = draw_background(**style["background"], size=draw_size)
    else:
        ground = np.full((draw_size, draw_size, 3), background, dtype=np.float32)
        if noise:
            ground += np.random.default_rng(seed).normal(0.0, noise, (draw_size, draw_size, 1)).astype(np.float32)
    image = Image.fromarray(np.clip(ground, 0, 255).astype(np.uint8), "RGB").convert("RGBA")
    image = Image.alpha_composite(image, layer).convert("RGB")
    if draw_size != size:
        image = image.resize((size, size), Image.BILINEAR)
    if style.get("blur"):
        image = image.filter(ImageFilter.GaussianBlur(style["blur"]))
    if style.get("jpeg"):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=style["jpeg"])
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image


def render_scene(scene: dict, size: int) -> Image.Image:
    return render(scene["objects"], size, scene["background"], scene["noise"], scene["seed"], scene.get("style"))


def render_clip(clip: dict, size: int) -> np.ndarray:
    """The frames of a clip: `(frames, size, size, 3)` uint8; background and distractor stay still."""
    frames = []
    for x, y in clip["path"]:
        objects = ([clip["distractor"]] if clip["distractor"] else []) + [{**clip["mover"], "x": x, "y": y}]
        frames.append(np.asarray(render(objects, size, clip["background"], clip["noise"], clip["seed"],
                                        clip.get("style"))))
    return np.stack(frames)
