"""The world's language: a small grammar that describes scenes, asks about them and tells stories.

Every sentence is made of lowercase words and spaces and ends with `.` or `?`; numbers are spelled
out. The vocabulary is closed (about sixty words) so that a tiny model can learn it in minutes:

    colours   red green blue yellow purple orange
    shapes    circle square triangle star
    sizes     big small
    places    a 3 x 3 grid: top left, top, top right, left, middle, right, bottom left, ...

A scene object is a dict ``{"shape", "colour", "size", "row", "col", ...}`` (see `muomni.data.scenes`).
Questions come with one- or two-word answers and a `kind` (colour, shape, size, count, position,
exist, relation, motion) so evaluation can report accuracy per kind.
"""

from __future__ import annotations

import random
import re
from typing import Sequence

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star")
SIZES = ("big", "small")
NUMBERS = ("zero", "one", "two", "three", "four", "five")
DIRECTIONS = ("left", "right", "up", "down")

# (row, col) on the 3 x 3 grid -> the cell's name, and the phrase that places an object there
PLACE_NAMES = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "middle", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
PLACE_PHRASES = {
    (0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
    (1, 0): "on the left", (1, 1): "in the middle", (1, 2): "on the right",
    (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right",
}
ALL_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES)
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}

# relation word -> test "other is <relation> of/than target" on grid cells
RELATIONS = {
    "left of": lambda o, t: o["col"] < t["col"],
    "right of": lambda o, t: o["col"] > t["col"],
    "above": lambda o, t: o["row"] < t["row"],
    "below": lambda o, t: o["row"] > t["row"],
}


def as_sentence(answer: str) -> str:
    """An answer as the assistant says it: ending in a full stop unless it already ends a sentence."""
    return answer if answer.endswith((".", "?")) else answer + "."


def normalize_transcript(text: str) -> str:
    """Text as a CTC target: lowercase a-z, apostrophe and single spaces (punctuation dropped)."""
    text = re.sub(r"[^a-z' ]+", " ", text.lower())
    return " ".join(text.split())


def noun(obj: dict) -> str:
    """'red circle': colour and shape, the name that is unique inside a scene."""
    return f"{obj['colour']} {obj['shape']}"


def full_noun(obj: dict) -> str:
    """'big red circle'."""
    return f"{obj['size']} {obj['colour']} {obj['shape']}"


def describe(obj: dict) -> str:
    """'a big red circle at the top left' (no final punctuation)."""
    return f"a {full_noun(obj)} {PLACE_PHRASES[(obj['row'], obj['col'])]}"


def reading_order(objects: list[dict]) -> list[dict]:
    """Objects sorted top to bottom, then left to right."""
    return sorted(objects, key=lambda o: (o["row"], o["col"]))


def captions(objects: list[dict], rng: random.Random) -> list[str]:
    """Three captions of one scene: canonical (reading order), 'there is/are', and counted.

    The first caption lists every object with size, colour, shape and place, so it identifies the
    scene among others; retrieval is evaluated on it.
    """
    ordered = reading_order(objects)
    canonical = " and ".join(describe(o) for o in ordered) + "."
    shuffled = list(objects)
    rng.shuffle(shuffled)
    if len(shuffled) == 1:
        there = f"there is {describe(shuffled[0])}."
    else:
        there = f"there are {NUMBERS[len(shuffled)]} shapes. " + " and ".join(describe(o) for o in shuffled) + "."
    word = "shape" if len(objects) == 1 else "shapes"
    counted = f"{NUMBERS[len(objects)]} {word}. " + " and ".join(
        f"a {full_noun(o)}" for o in ordered) + "."
    return [canonical, there, counted]


def _related(objects: list[dict], target: dict, relation: str) -> list[dict]:
    return [o for o in objects if o is not target and RELATIONS[relation](o, target)]


def scene_questions(objects: list[dict], rng: random.Random, pairs: Sequence[tuple[str, str]] = ALL_PAIRS
                    ) -> list[dict]:
    """Question-answer pairs about one scene: ``[{"question", "answer", "kind"}, ...]``.

    `pairs` are the colour-shape pairs an existence question may name (so held-out pairs stay out of
    training text).

    Objects in a scene have distinct (colour, shape) pairs and cells, so "the red circle" is always
    unambiguous; questions that would be ambiguous ("what colour is the circle?" with two circles)
    are not asked.
    """
    qa: list[dict] = []
    shape_count = {s: sum(o["shape"] == s for o in objects) for s in SHAPES}
    colour_count = {c: sum(o["colour"] == c for o in objects) for c in COLOURS}

    qa.append({"question": "how many shapes are there?", "answer": NUMBERS[len(objects)], "kind": "count"})
    shape = rng.choice(SHAPES)
    qa.append({"question": f"how many {PLURALS[shape]} are there?", "answer": NUMBERS[shape_count[shape]],
               "kind": "count"})
    for obj in objects:
        if shape_count[obj["shape"]] == 1:
            qa.append({"question": f"what colour is the {obj['shape']}?", "answer": obj["colour"], "kind": "colour"})
        if colour_count[obj["colour"]] == 1:
            qa.append({"question": f"what shape is the {obj['colour']} one?", "answer": obj["shape"], "kind": "shape"})
        qa.append({"question": f"is the {noun(obj)} big or small?", "answer": obj["size"], "kind": "size"})
        if rng.random() < 0.5:  # one position question per object, in either direction
            qa.append({"question": f"where is the {noun(obj)}?", "answer": PLACE_NAMES[(obj["row"], obj["col"])],
                       "kind": "position"})
        else:
            qa.append({"question": f"what is {PLACE_PHRASES[(obj['row'], obj['col'])]}?", "answer": noun(obj),
                       "kind": "position"})
    # existence: half the time ask about an object that is there, half about one that is not
    present = {(o["colour"], o["shape"]) for o in objects}
    if rng.random() < 0.5:
        colour, shape = rng.choice(sorted(present))
    else:
        colour, shape = rng.choice(pairs)
    qa.append({"question": f"is there a {colour} {shape}?", "answer": "yes" if (colour, shape) in present else "no",
               "kind": "exist"})
    # relations: ask when the answer is a single object; "nothing" now and then so it stays rare
    if len(objects) > 1:
        target = rng.choice(objects)
        for relation in RELATIONS:
            others = _related(objects, target, relation)
            if len(others) == 1 or (not others and rng.random() < 0.25):
                answer = noun(others[0]) if others else "nothing"
                qa.append({"question": f"what is {relation} the {noun(target)}?", "answer": answer,
                           "kind": "relation"})
    return qa


def motion_question(mover: dict, direction: str) -> dict:
    """The question of a clip: which way does the moving shape go."""
    return {"question": f"which way does the {noun(mover)} move?", "answer": direction, "kind": "motion"}


def motion_caption(mover: dict, direction: str) -> str:
    way = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}[direction]
    return f"a {full_noun(mover)} moves {way}."


# ---------------------------------------------------------------------------------------------
# text-only documents and questions (stage A corpus and text chats)

FACTS = [
    *(f"{c} is a colour." for c in COLOURS),
    *(f"a {s} is a shape." for s in SHAPES),
    "a triangle has three corners.", "a square has four corners.", "a circle has no corners.",
    "a star has five points.", "a big shape is larger than a small shape.",
    "one and one make two.", "one and two make three.", "two and two make four.", "two and three make five.",
    "two is more than one.", "three is more than two.", "four is more than three.", "five is more than four.",
    "left is the opposite of right.", "up is the opposite of down.", "top is the opposite of bottom.",
    "big is the opposite of small.", "the middle is between the left and the right.",
]

TEXT_QA = [
    *({"question": f"is {c} a colour or a shape?", "answer": "colour", "kind": "fact"} for c in COLOURS),
    *({"question": f"is a {s} a colour or a shape?", "answer": "shape", "kind": "fact"} for s in SHAPES),
    {"question": "how many corners does a triangle have?", "answer": "three", "kind": "fact"},
    {"question": "how many corners does a square have?", "answer": "four", "kind": "fact"},
    {"question": "how many corners does a circle have?", "answer": "zero", "kind": "fact"},
    {"question": "how many points does a star have?", "answer": "five", "kind": "fact"},
    {"question": "which shape has three corners?", "answer": "triangle", "kind": "fact"},
    {"question": "which shape has four corners?", "answer": "square", "kind": "fact"},
    {"question": "which shape has no corners?", "answer": "circle", "kind": "fact"},
    {"question": "what is one and one?", "answer": "two", "kind": "fact"},
    {"question": "what is one and two?", "answer": "three", "kind": "fact"},
    {"question": "what is two and two?", "answer": "four", "kind": "fact"},
    {"question": "what is two and three?", "answer": "five", "kind": "fact"},
    {"question": "what is the opposite of left?", "answer": "right", "kind": "fact"},
    {"question": "what is the opposite of right?", "answer": "left", "kind": "fact"},
    {"question": "what is the opposite of up?", "answer": "down", "kind": "fact"},
    {"question": "what is the opposite of down?", "answer": "up", "kind": "fact"},
    {"question": "what is the opposite of big?", "answer": "small", "kind": "fact"},
    {"question": "what is the opposite of small?", "answer": "big", "kind": "fact"},
]


def scene_document(objects: list[dict], rng: random.Random, pairs: Sequence[tuple[str, str]] = ALL_PAIRS) -> str:
    """A scene told in text: a caption followed by a few questions, each answered."""
    caption = rng.choice(captions(objects, rng))
    qa = scene_questions(objects, rng, pairs)
    picked = rng.sample(qa, k=min(len(qa), rng.randint(2, 4)))
    return " ".join([caption, *(f"{q['question']} {q['answer']}." for q in picked)])


def motion_story(mover: dict, direction: str, start: tuple[int, int], rng: random.Random) -> str:
    """A short story of a moving shape, told with the same words as the clips."""
    row, col = start
    drow, dcol = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}[direction]
    end = (min(2, max(0, row + 2 * drow)), min(2, max(0, col + 2 * dcol)))
    name = noun(mover)
    lines = [
        f"there is a {full_noun(mover)} {PLACE_PHRASES[start]}.",
        motion_caption(mover, direction).replace(f"a {full_noun(mover)}", f"the {name}"),
        f"now the {name} is {PLACE_PHRASES[end]}.",
    ]
    if rng.random() < 0.5:
        lines.append(f"which way did the {name} move? {direction}.")
    return " ".join(lines)


def facts_document(rng: random.Random) -> str:
    return " ".join(rng.sample(FACTS, k=rng.randint(3, 6)))


def text_scene_question(objects: list[dict], rng: random.Random, pairs: Sequence[tuple[str, str]] = ALL_PAIRS
                        ) -> dict:
    """A scene given in words plus a question about it: a text-only reasoning exercise."""
    qa = rng.choice(scene_questions(objects, rng, pairs))
    return {"question": f"{captions(objects, rng)[0]} {qa['question']}", "answer": qa["answer"], "kind": qa["kind"]}
