"""Lessons: Compare presets that teach one thing in a couple of minutes on a laptop CPU.

Each :class:`Lesson` is a set of :class:`~lods.runs.compare.Slot` s (a method at a CFG weight) run side by
side on one prompt and seed, with the run length, the backbone, a sentence saying what to look for and
the metric (a key of the trainer's logged history) that shows the lesson in numbers. The Compare tab
offers them as presets; ``python -m lods bench lessons`` measures each one's metric over prompts and
seeds fixed in :data:`LESSON_PROMPTS` / :data:`LESSON_SEEDS` (chosen before any result was seen).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lods.runs.compare import Slot


@dataclass(frozen=True)
class Lesson:
    name: str
    title: str
    look_for: str
    slots: tuple[Slot, ...]
    metric: str  # a key of the trainer's history: the number that shows the lesson
    backbone: str = "gs"
    steps: int = 150


LESSONS: dict[str, Lesson] = {lesson.name: lesson for lesson in (
    Lesson(
        name="cfg-weight",
        title="What the CFG weight does (SDS at 7.5, 100 and 1000)",
        look_for="Low weight stays dull and blurry; high weight saturates the colours and clips them.",
        slots=(Slot("sds", 7.5), Slot("sds", 100.0), Slot("sds", 1000.0)),
        metric="saturation",
    ),
    Lesson(
        name="sds-vs-lods",
        title="SDS against LODS-embed at the same high weight (CFG 1000)",
        look_for="At the same weight SDS over-saturates; LODS-embed learns its null embedding and keeps "
                 "colours near the world's.",
        slots=(Slot("sds", 1000.0), Slot("lods-embed", 1000.0)),
        metric="saturation",
    ),
    Lesson(
        name="cfg-sweep",
        title="The paper's Fig. 5: LODS-embed from CFG 30 to infinity",
        look_for="Higher weights give crisper objects; at infinity floaters appear around the object.",
        slots=(Slot("lods-embed", 30.0), Slot("lods-embed", 100.0), Slot("lods-embed", 1000.0),
               Slot("lods-embed", math.inf)),
        metric="floater_score",
    ),
)}
