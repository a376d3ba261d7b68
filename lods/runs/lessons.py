"""Lessons: Compare presets that teach one thing in a couple of minutes on a laptop CPU.

Each :class:`Lesson` is a set of :class:`~lods.runs.compare.Slot` s (a method at a CFG weight) run side by
side on one prompt and seed, with the run length, the backbone, a sentence saying what to look for and
the metric (a key of the trainer's logged history) that shows the lesson in numbers. The Compare tab
offers them as presets (:meth:`Lesson.configs` gives the runs' validated settings); ``python -m lods bench
lessons`` measures each lesson's :class:`Check` s over prompts and seeds fixed in :data:`LESSON_PROMPTS` /
:data:`LESSON_SEEDS` (chosen by the rule of :func:`lesson_prompts`, before any result was seen).

Why the weights and the run length are what they are on the embedded toy prior: a caption of the toy world
fixes its object's colour and shape, so the conditional prediction eps(y) is far from the unconditional one
(on the world's renders of the 8 lesson prompts, |eps(y) - eps(null)| is 0.36 to 0.68 of |eps(null) - eps|
for t from 0.2 to 0.8 of T: ``lods.bench.lessons.guidance_balance``). The scene's optimiser (Adam) ignores
the size of the update, only its direction counts, so already at CFG 7.5 the classifier term sets the
direction (cosine 0.953 with the direction at 1000; 100: 1.000) and 7.5, 100 and 1000 push almost the same
way; the low-guidance end of this prior lies near CFG 1 (the plain conditional score). And colours only reach
where the guidance takes them after about 300 steps: at 150 steps every weight gives the same dull brown blob.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Any

from lods.config import RunConfig
from lods.runs.compare import Slot, comparison_configs


@dataclass(frozen=True)
class Check:
    """One paired measurement of a lesson: slot ``b`` against slot ``a`` (indices into the lesson's slots) on
    ``measure`` (a key of the benchmark's rows: ``saturation``, ``clipped``, ``floater_hard``, ...), the
    lesson expecting b ``claimed`` ("less" or "greater") than a; ``absolute`` compares |value|."""

    a: int
    b: int
    measure: str
    claimed: str
    what: str = ""
    absolute: bool = False


@dataclass(frozen=True)
class Lesson:
    name: str
    title: str
    look_for: str
    slots: tuple[Slot, ...]
    metric: str  # a key of the trainer's history: the number that shows the lesson
    backbone: str = "gs"
    steps: int = 150
    batch: int = 1  # views per step (one: twice the steps of the page's default two in the same time)
    checks: tuple[Check, ...] = ()

    def configs(self, prompt: str, seed: int = 0, prior: str = "toy", **overrides: Any) -> list[RunConfig]:
        """The lesson's runs on ``prompt`` and ``seed``: one validated config per slot (``overrides`` are any
        other :class:`~lods.config.RunConfig` fields, e.g. ``snapshot_every``)."""
        base = RunConfig.from_dict({"prompt": prompt, "seed": seed, "prior": prior, "backbone": self.backbone,
                                    "steps": self.steps, "batch": self.batch, **overrides})
        return comparison_configs(base, list(self.slots))

    def config(self, slot: Slot, prompt: str, seed: int = 0, prior: str = "toy", **overrides: Any) -> RunConfig:
        """One slot's run (the same settings as in :meth:`configs`)."""
        base = self.configs(prompt, seed, prior, **overrides)[0]
        config = replace(base, method=slot.method, cfg=slot.cfg, learned_lr=None)
        config.validate()
        return config


SATURATION = "saturation of the object's pixels"
CLIPPED = "share of clipped object pixels"
LESSON_STEPS = 300  # colours are still climbing at 150 steps (every weight the same dull blob); see above

LESSONS: dict[str, Lesson] = {lesson.name: lesson for lesson in (
    Lesson(
        name="cfg-weight",
        title="What the CFG weight does (SDS at 1, 7.5, 100 and 1000)",
        look_for="Without guidance (CFG 1) the colours stay dull, below the world's; guidance saturates them. "
                 "On this small prior 7.5 already guides nearly as hard as 100: 100 adds a few clipped, blown-out "
                 "pixels, and 1000 looks like 100.",
        slots=(Slot("sds", 1.0), Slot("sds", 7.5), Slot("sds", 100.0), Slot("sds", 1000.0)),
        metric="saturation",
        steps=LESSON_STEPS,
        checks=(
            Check(0, 1, "saturation", "greater", SATURATION),
            Check(1, 2, "saturation", "greater", SATURATION),
            Check(2, 3, "saturation", "greater", SATURATION),
            Check(1, 2, "clipped", "greater", CLIPPED),
            Check(2, 3, "clipped", "greater", CLIPPED),
        ),
    ),
    Lesson(
        name="sds-vs-lods",
        title="SDS against LODS-embed at the same high weight (CFG 1000)",
        look_for="At the same weight SDS over-saturates; LODS-embed learns its null embedding and keeps "
                 "colours nearer the world's.",
        slots=(Slot("sds", 1000.0), Slot("lods-embed", 1000.0)),
        metric="saturation",
        steps=LESSON_STEPS,
        checks=(
            Check(0, 1, "saturation", "less", SATURATION),
            Check(0, 1, "saturation_error", "less", "distance of the saturation from the world's", absolute=True),
            Check(0, 1, "clipped", "less", CLIPPED),
        ),
    ),
    Lesson(
        name="cfg-sweep",
        title="The paper's Fig. 5: LODS-embed from CFG 30 to infinity",
        look_for="In the paper higher weights give crisper objects and at infinity floaters appear around the "
                 "object. On this prior the four stay close: over 24 prompts x 3 seeds the infinite weight left "
                 "slightly more opaque floaters than 100 on single objects and pairs, too few to see "
                 "(docs/bench/quality-shipped).",
        slots=(Slot("lods-embed", 30.0), Slot("lods-embed", 100.0), Slot("lods-embed", 1000.0),
               Slot("lods-embed", math.inf)),
        metric="floater_score",
        steps=200,  # four LODS-embed runs: 800 steps, about as long as the 1,200 SDS steps of cfg-weight
    ),
)}

# The prompts a lesson is demonstrated on in the page (its default) and was looked at while its steps and
# weights were set; never among the prompts it is judged on.
TUNING_PROMPTS = ("a red cube",)
LESSON_SEEDS = (0, 1)
PROMPT_RULE_SEED = 15


def lesson_prompts(per_category: tuple[int, int, int] = (3, 3, 2), seed: int = PROMPT_RULE_SEED) -> list[str]:
    """The prompts the lessons are judged on, by a rule fixed before any lesson ran: ``random.Random(seed)``
    draws 3 one-object, 3 on-a-ground and 2 two-object captions of the toy world's training combinations (the
    prior saw each colour-shape pair), leaving out the tuning prompts and the quality benchmark's 24 prompts
    (on which the prior's default rates were chosen)."""
    from lods.bench.quality import QUALITY_PROMPTS
    from lods.priors.toy.world import CATEGORIES, all_captions

    used = set(TUNING_PROMPTS) | {p for ps in QUALITY_PROMPTS.values() for p in ps}
    rng = random.Random(seed)
    out = []
    for category, n in zip(CATEGORIES, per_category):
        pool = [c for c in all_captions(category, held_out=False) if c not in used]
        out += rng.sample(pool, n)
    return out


LESSON_PROMPTS = tuple(lesson_prompts())
