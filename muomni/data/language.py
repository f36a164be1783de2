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


# ---------------------------------------------------------------------------------------------
# wording: each question kind can be asked many ways. `family` "train" draws from the training
# templates, "wild" from templates held out of training (the `wild` split), None gives the one
# canonical wording. Slots: {shape} {colour} {noun} (colour + shape) {plural} {place} (a place
# phrase) {relation}. Answers never change with the wording.

QUESTION_TEMPLATES = {
    "colour": {
        "train": ("what colour is the {shape}?", "which colour is the {shape}?", "what's the colour of the {shape}?",
                  "name the colour of the {shape}.", "tell me the colour of the {shape}.",
                  "what colour does the {shape} have?", "the {shape} is what colour?",
                  "can you tell me what colour the {shape} is?", "colour of the {shape}?",
                  "what is the {shape}'s colour?"),
        "wild": ("which colour has the {shape}?", "say the colour of the {shape}.",
                 "what is the colour of the {shape} in the picture?", "i wonder what colour the {shape} is?"),
    },
    "shape": {
        "train": ("what shape is the {colour} one?", "which shape is {colour}?", "what is the {colour} shape?",
                  "name the {colour} shape.", "what's the {colour} thing?", "the {colour} object is which shape?",
                  "tell me the shape of the {colour} object.", "what shape has the colour {colour}?"),
        "wild": ("what kind of shape is the {colour} one?", "which object is coloured {colour}?",
                 "say which shape is {colour}."),
    },
    "size": {
        "train": ("is the {noun} big or small?", "is the {noun} small or big?", "how big is the {noun}?",
                  "what size is the {noun}?", "is the {noun} large or small?", "tell me the size of the {noun}.",
                  "the {noun} is big or small?"),
        "wild": ("would you say the {noun} is big or small?", "is the {noun} a big one or a small one?",
                 "what is the size of the {noun}?"),
    },
    "count_all": {
        "train": ("how many shapes are there?", "how many things are in this picture?", "how many objects do you see?",
                  "count the shapes.", "how many shapes can you see?", "what is the number of shapes?"),
        "wild": ("how many shapes are in the image?", "count all the objects.", "tell me how many things there are."),
    },
    "count": {
        "train": ("how many {plural} are there?", "how many {plural} can you see?", "count the {plural}.",
                  "how many {plural} are in the picture?", "what is the number of {plural}?"),
        "wild": ("how many {plural} do you see?", "tell me how many {plural} there are.", "count every {shape}."),
    },
    "where": {
        "train": ("where is the {noun}?", "where's the {noun}?", "in which part of the picture is the {noun}?",
                  "where can you see the {noun}?", "tell me where the {noun} is.", "the {noun} is where?"),
        "wild": ("where is the {noun} placed?", "in what place is the {noun}?", "say where the {noun} is."),
    },
    "what_at": {
        "train": ("what is {place}?", "which shape is {place}?", "what do you see {place}?",
                  "name the shape {place}.", "what object is {place}?"),
        "wild": ("which object can you see {place}?", "tell me what is {place}.", "what shape do you see {place}?"),
    },
    "exist": {
        "train": ("is there a {noun}?", "do you see a {noun}?", "can you find a {noun}?",
                  "is a {noun} in the picture?", "does the picture have a {noun}?", "is there any {noun}?"),
        "wild": ("can you see a {noun} here?", "is a {noun} anywhere in the image?", "is there a {noun} or not?"),
    },
    "relation": {
        "train": ("what is {relation} the {noun}?", "which shape is {relation} the {noun}?",
                  "what do you see {relation} the {noun}?", "name the shape {relation} the {noun}.",
                  "what is there {relation} the {noun}?"),
        "wild": ("which object is {relation} the {noun}?", "tell me what is {relation} the {noun}."),
    },
    "motion": {
        "train": ("which way does the {noun} move?", "which way is the {noun} going?",
                  "in which direction does the {noun} move?", "where does the {noun} go?",
                  "which way does the {noun} go?", "what direction is the {noun} moving in?"),
        "wild": ("tell me which way the {noun} moves.", "where is the {noun} moving?", "which way did the {noun} go?"),
    },
}
FAMILIES = ("train", "wild")


def ask(template: str, rng: random.Random | None, family: str | None, **slots: str) -> str:
    """A question of ``template`` kind (a `QUESTION_TEMPLATES` key) with its slots filled.

    ``family`` None: the canonical (first training) wording, no random draw. Otherwise a random
    wording of that family, and half the time American spelling ("color"), since people write both.
    """
    if family is None:
        return QUESTION_TEMPLATES[template]["train"][0].format(**slots)
    if family not in FAMILIES:
        raise ValueError(f"unknown wording family '{family}'; expected one of {', '.join(FAMILIES)}")
    text = rng.choice(QUESTION_TEMPLATES[template][family]).format(**slots)
    return american(text) if rng.random() < 0.5 else text


def american(text: str) -> str:
    """American spelling of the world's words: colour -> color, coloured -> colored."""
    return re.sub(r"colou?r", "color", text)


def _related(objects: list[dict], target: dict, relation: str) -> list[dict]:
    return [o for o in objects if o is not target and RELATIONS[relation](o, target)]


def scene_questions(objects: list[dict], rng: random.Random, pairs: Sequence[tuple[str, str]] = ALL_PAIRS,
                    family: str | None = None) -> list[dict]:
    """Question-answer pairs about one scene: ``[{"question", "answer", "kind"}, ...]``.

    `pairs` are the colour-shape pairs an existence question may name (so held-out pairs stay out of
    training text). ``family`` picks the wording (see `ask`): None, "train" or "wild".

    Objects in a scene have distinct (colour, shape) pairs and cells, so "the red circle" is always
    unambiguous; questions that would be ambiguous ("what colour is the circle?" with two circles)
    are not asked.
    """
    qa: list[dict] = []
    shape_count = {s: sum(o["shape"] == s for o in objects) for s in SHAPES}
    colour_count = {c: sum(o["colour"] == c for o in objects) for c in COLOURS}

    def add(template: str, answer: str, kind: str, **slots: str) -> None:
        qa.append({"question": ask(template, rng, family, **slots), "answer": answer, "kind": kind})

    add("count_all", NUMBERS[len(objects)], "count")
    shape = rng.choice(SHAPES)
    add("count", NUMBERS[shape_count[shape]], "count", plural=PLURALS[shape], shape=shape)
    for obj in objects:
        if shape_count[obj["shape"]] == 1:
            add("colour", obj["colour"], "colour", shape=obj["shape"])
        if colour_count[obj["colour"]] == 1:
            add("shape", obj["shape"], "shape", colour=obj["colour"])
        add("size", obj["size"], "size", noun=noun(obj))
        if rng.random() < 0.5:  # one position question per object, in either direction
            add("where", PLACE_NAMES[(obj["row"], obj["col"])], "position", noun=noun(obj))
        else:
            add("what_at", noun(obj), "position", place=PLACE_PHRASES[(obj["row"], obj["col"])])
    # existence: half the time ask about an object that is there, half about one that is not
    present = {(o["colour"], o["shape"]) for o in objects}
    if rng.random() < 0.5:
        colour, shape = rng.choice(sorted(present))
    else:
        colour, shape = rng.choice(pairs)
    add("exist", "yes" if (colour, shape) in present else "no", "exist", noun=f"{colour} {shape}")
    # relations: ask when the answer is a single object; "nothing" now and then so it stays rare
    if len(objects) > 1:
        target = rng.choice(objects)
        for relation in RELATIONS:
            others = _related(objects, target, relation)
            if len(others) == 1 or (not others and rng.random() < 0.25):
                add("relation", noun(others[0]) if others else "nothing", "relation", relation=relation,
                    noun=noun(target))
    return qa


def motion_question(mover: dict, direction: str, rng: random.Random | None = None, family: str | None = None) -> dict:
    """The question of a clip: which way does the moving shape go (worded by ``family``, see `ask`)."""
    return {"question": ask("motion", rng, family, noun=noun(mover)), "answer": direction, "kind": "motion"}


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


def scene_document(objects: list[dict], rng: random.Random, pairs: Sequence[tuple[str, str]] = ALL_PAIRS,
                   family: str | None = None) -> str:
    """A scene told in text: a caption followed by a few questions (worded by ``family``), each answered."""
    caption = rng.choice(captions(objects, rng))
    qa = scene_questions(objects, rng, pairs, family)
    picked = rng.sample(qa, k=min(len(qa), rng.randint(2, 4)))
    return " ".join([caption, *(f"{q['question']} {q['answer']}." for q in picked)])


def motion_story(mover: dict, direction: str, lane: int, rng: random.Random) -> str:
    """A short story of a moving shape, told with the same words as the clips.

    As in the clips, the shape crosses the picture along ``lane`` (its row or column, 0-2): it starts
    on the side it moves away from and ends two cells further on, so the story's places always agree
    with its direction.
    """
    leaving = 2 if direction in ("left", "up") else 0  # the side it starts on
    horizontal = direction in ("left", "right")
    start, end = ((lane, leaving), (lane, 2 - leaving)) if horizontal else ((leaving, lane), (2 - leaving, lane))
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


def text_scene_question(objects: list[dict], rng: random.Random, pairs: Sequence[tuple[str, str]] = ALL_PAIRS,
                        family: str | None = None) -> dict:
    """A scene given in words plus a question about it (worded by ``family``): a text-only reasoning exercise."""
    qa = rng.choice(scene_questions(objects, rng, pairs, family))
    return {"question": f"{captions(objects, rng)[0]} {qa['question']}", "answer": qa["answer"], "kind": qa["kind"]}


# ---------------------------------------------------------------------------------------------
# free sentences: speech for transcription that the caption grammar never produces, so a model
# must hear every word instead of completing a sentence it has memorised

FUNCTION_WORDS = ("the", "a", "and", "is", "it", "i", "you", "we", "this", "that", "my", "your", "with", "on",
                  "in", "of", "to", "not", "very", "see", "can", "have", "look", "here", "there", "now", "then",
                  "put", "draw", "make", "like", "one", "next", "near", "over", "under", "please", "today")
WORLD_WORDS = (*COLOURS, *SHAPES, *SIZES, *NUMBERS[1:], *DIRECTIONS, "top", "bottom", "middle", "left", "right",
               "shape", "shapes", "colour", "picture", "move", "moves", "corner", "corners")
FREE_TEMPLATES = (
    "i can see {number} {colour} {plural}.", "please draw a {size} {colour} {shape}.",
    "my {shape} is {colour} and {size}.", "put the {colour} {shape} in the {place}.",
    "we like the {size} {shape} very much.", "look at that {colour} {shape} over there.",
    "the {shape} moves {direction} and then {direction2}.", "is your {shape} {colour} or {colour2}?",
    "there is no {colour} {shape} here today.", "make {number} {size} {plural} next to the {shape2}.",
)


def free_sentence(rng: random.Random, pairs: Sequence[tuple[str, str]] = ALL_PAIRS) -> str:
    """A short sentence over the world's words and common function words: half from loose templates,
    half a random string of words (which no language model can complete from memory). A colour
    followed by a shape is always one of ``pairs`` (so held-out pairs stay out of training speech)."""
    while True:
        if rng.random() < 0.5:
            (colour, shape), (colour2, shape2) = rng.sample(list(pairs), 2)
            direction, direction2 = rng.sample(DIRECTIONS, 2)
            text = rng.choice(FREE_TEMPLATES).format(
                number=rng.choice(NUMBERS[2:]), colour=colour, colour2=colour2, shape=shape, shape2=shape2,
                plural=PLURALS[shape], size=rng.choice(SIZES), place=rng.choice(("top", "bottom", "middle")),
                direction=direction, direction2=direction2)
        else:
            words = [rng.choice(WORLD_WORDS if rng.random() < 0.6 else FUNCTION_WORDS) for _ in range(rng.randint(3, 8))]
            text = " ".join(words) + "."
        words = text[:-1].split()
        named = {(a, b.removesuffix("s")) for a, b in zip(words, words[1:]) if a in COLOURS and b.rstrip("s") in SHAPES}
        if named <= set(pairs):
            return text


def story_chats(text: str) -> list[list[dict[str, str]]]:
    """A world story as chats, one per scene: the statements before a question and the question are
    a user turn, the sentence after it the assistant's answer, and further questions about the same
    scene further turns. A statement after an answer starts the next chat (a new scene); statements
    after the last answer are dropped.

    >>> story_chats("a red star. what colour is the star? red. two and two make four.")
    [[{'role': 'user', 'content': 'a red star. what colour is the star?'}, {'role': 'assistant', 'content': 'red.'}]]
    """
    chats: list[list[dict[str, str]]] = []
    said: list[str] = []
    sentences = [s.strip() for s in re.findall(r"[^.?]+[.?]", text)]
    for previous, sentence in zip([""] + sentences, sentences):
        if previous.endswith("?"):
            chats[-1].append({"role": "assistant", "content": sentence})
        elif sentence.endswith("?"):
            if said or not chats:
                chats.append([])
            chats[-1].append({"role": "user", "content": " ".join(said + [sentence])})
            said = []
        else:
            said.append(sentence)
    return chats
