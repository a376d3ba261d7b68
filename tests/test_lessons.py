"""The Compare tab's lessons: their data, the benchmark's resume and its verdicts."""

import csv
import math

import pytest

from lods.bench import lessons as bench
from lods.bench.quality import QUALITY_PROMPTS
from lods.bench.stats import FAILS, HOLDS, NOT_SHOWN
from lods.errors import UserError
from lods.priors.toy.world import parse_caption
from lods.runs.compare import Slot
from lods.runs.lessons import LESSON_PROMPTS, LESSON_SEEDS, LESSONS, TUNING_PROMPTS, Check, Lesson, lesson_prompts


@pytest.mark.parametrize("name", list(LESSONS))
def test_every_lesson_validates_as_a_comparison(name):
    lesson = LESSONS[name]
    configs = lesson.configs("a blue sphere", seed=3)
    assert [(c.method, c.cfg) for c in configs] == [(s.method, s.cfg) for s in lesson.slots]
    assert all(c.steps == lesson.steps and c.backbone == lesson.backbone and c.batch == lesson.batch
               and c.seed == 3 and c.prompt == "a blue sphere" for c in configs)
    assert lesson.look_for and lesson.title and lesson.metric in ("saturation", "clipped", "floater_score")
    for check in lesson.checks:
        assert 0 <= check.a < len(lesson.slots) and 0 <= check.b < len(lesson.slots) and check.a != check.b
        assert check.claimed in ("less", "greater")
        assert check.measure in bench.COLUMNS
    one = lesson.config(lesson.slots[-1], "a blue sphere", seed=3)
    assert (one.method, one.cfg, one.steps) == (lesson.slots[-1].method, lesson.slots[-1].cfg, lesson.steps)


def test_the_benchmarked_lessons_have_checks_and_a_bad_slot_is_refused():
    assert all(LESSONS[name].checks for name in bench.BENCH_LESSONS)
    bad = Lesson("x", "x", "x", (Slot("sds", 100.0), Slot("sds", math.inf)), "saturation")
    with pytest.raises(UserError, match="diverges"):
        bad.configs("a red cube")


def test_lesson_prompts_follow_their_rule_and_avoid_the_tuning_and_quality_prompts():
    assert tuple(lesson_prompts()) == LESSON_PROMPTS and len(set(LESSON_PROMPTS)) == 8 and len(LESSON_SEEDS) == 2
    used = set(TUNING_PROMPTS) | {p for ps in QUALITY_PROMPTS.values() for p in ps}
    assert not used & set(LESSON_PROMPTS)
    scenes = [parse_caption(p) for p in LESSON_PROMPTS]
    assert [s.category for s in scenes] == ["single"] * 3 + ["surroundings"] * 3 + ["multi"] * 2
    assert not any(s.held_out for s in scenes)
    assert lesson_prompts(seed=16) != list(LESSON_PROMPTS)  # the draw depends on the rule's seed


def test_the_plan_runs_a_shared_slot_once():
    runs = bench.plan(prompts=("a red cube",), seeds=(0,))
    keys = [r.key() for r in runs]
    assert len(keys) == len(set(keys))
    slots = {s for name in bench.BENCH_LESSONS for s in LESSONS[name].slots}
    assert len(runs) == len(slots)


def _tiny_runs():
    lesson = Lesson("tiny", "tiny", "look", (Slot("sds", 7.5), Slot("sds", 100.0)), "saturation", steps=2,
                    checks=(Check(0, 1, "saturation", "greater"),))
    return [bench.LessonRun(lesson, s, "a red cube", 0) for s in lesson.slots]


def test_the_benchmark_appends_a_row_per_run_and_resumes(tmp_path, monkeypatch):
    runs = _tiny_runs()
    lines = []
    rows = bench.run_lessons(tmp_path, runs=runs, log=lines.append, with_balance=False)
    assert len(rows) == 2 and sum(line.startswith("[") for line in lines) == 2
    assert {(r["method"], r["cfg"]) for r in rows} == {("sds", 7.5), ("sds", 100.0)}
    assert all(0 <= r["saturation"] <= 1 and r["steps"] == 2 for r in rows)
    assert (tmp_path / "report.md").exists() and (tmp_path / "lessons.png").exists()

    def must_not_run(*a, **k):
        raise AssertionError("a finished run ran again")

    monkeypatch.setattr(bench, "run_one", must_not_run)
    assert len(bench.run_lessons(tmp_path, runs=runs, log=lines.append, with_balance=False)) == 2
    # one row lost: only that run goes again
    with (tmp_path / "results.csv").open() as f:
        kept = list(csv.DictReader(f))[:1]
    with (tmp_path / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=bench.COLUMNS)
        w.writeheader()
        w.writerows(kept)
    ran = []
    monkeypatch.setattr(bench, "run_one", lambda run, prior, out: ran.append(run.slot) or {
        **{k: 0.5 for k in bench.COLUMNS}, "method": run.slot.method, "cfg": run.slot.cfg, "prompt": run.prompt,
        "seed": run.seed, "steps": run.lesson.steps, "batch": run.lesson.batch})
    assert len(bench.run_lessons(tmp_path, runs=runs, prior=object(), log=lines.append, with_balance=False)) == 2
    assert ran == [s for s in (r.slot for r in runs) if s != Slot(kept[0]["method"], float(kept[0]["cfg"]))]


def _rows(lesson, values_a, values_b, measure="saturation"):
    rows = []
    for i, (va, vb) in enumerate(zip(values_a, values_b)):
        for slot, v in ((lesson.slots[0], va), (lesson.slots[1], vb)):
            for seed in (0, 1):
                rows.append({"method": slot.method, "cfg": slot.cfg, "prompt": f"p{i}", "seed": seed,
                             "steps": lesson.steps, "batch": lesson.batch, measure: v + 0.001 * seed})
    return rows


def test_verdicts_on_a_synthetic_table():
    lesson = Lesson("t", "t", "t", (Slot("sds", 1000.0), Slot("lods-embed", 1000.0)), "saturation", steps=5,
                    checks=(Check(0, 1, "saturation", "less"),
                            Check(0, 1, "saturation_error", "less", absolute=True)))
    a = [0.70, 0.72, 0.68, 0.75, 0.71, 0.69, 0.74, 0.73]
    lower = [v - 0.1 - 0.01 * i for i, v in enumerate(a)]
    (check, res), _ = bench.lesson_results(_rows(lesson, a, lower), lesson)
    assert res.verdict == HOLDS and res.n == 8 and res.better == 8 and res.hi < 0
    assert math.isclose(res.diff, -0.135, abs_tol=1e-9)
    higher = [v + 0.1 + 0.01 * i for i, v in enumerate(a)]
    assert bench.lesson_results(_rows(lesson, a, higher), lesson)[0][1].verdict == FAILS
    mixed = [v + (0.05 if i % 2 else -0.05) for i, v in enumerate(a)]
    assert bench.lesson_results(_rows(lesson, a, mixed), lesson)[0][1].verdict == NOT_SHOWN
    # errors compared as absolute values: -0.2 is a larger error than +0.1
    err = bench.lesson_results(_rows(lesson, [0.1] * 8, [-0.2 - 0.01 * i for i in range(8)], "saturation_error"),
                               lesson)[1][1]
    assert err.verdict == FAILS
    # runs of other settings (another step count) are left out
    other = [{**r, "steps": 99} for r in _rows(lesson, a, lower)]
    assert bench.lesson_results(other, lesson)[0][1].n == 0
    real = LESSONS["sds-vs-lods"]
    lines = bench.report_lines(_rows(real, [x + 0.2 for x in a], [x + 0.2 for x in lower]), ("sds-vs-lods",))
    assert any(line.startswith(f"| {real.slots[1].label} vs {real.slots[0].label} | ") and "**holds**" in line
               for line in lines)


def test_bench_lessons_needs_a_folder_and_the_toy_prior(capsys):
    from lods.__main__ import main

    assert main(["bench", "lessons"]) == 2
    assert "needs --out" in capsys.readouterr().err
    assert main(["bench", "lessons", "--prior", "sd21", "--out", "x"]) == 2
    assert "--prior toy only" in capsys.readouterr().err


def test_guidance_balance_turns_the_direction_towards_the_classifier_term_as_the_weight_grows():
    b = bench.guidance_balance(["a blue sphere"], fractions=(0.5,), weights=(1.0, 7.5, 100.0), views=1)
    cos = list(b["cosine_to_largest"].values())
    assert cos[0] < cos[1] < cos[2] and math.isclose(cos[2], 1.0, abs_tol=1e-5)
    assert b["ratio"][0.5] > 0
    assert "|eps(y) - eps(null)|" in bench.balance_lines(b)[0]
