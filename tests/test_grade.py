"""The grader on planted submissions, as a teacher would run it over a class.

- alice hands in the instructor versions of every lesson: full marks everywhere;
- bob hands in the untouched student versions: 0 everywhere, "not attempted";
- carol gets one exercise of lesson 01 wrong: she loses exactly its points, with the check's message;
- dave's lesson-01 exercise loops forever: the time limit stops it, and the rest is still graded.
"""
import csv
import json
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import course  # noqa: E402
from nblib.checks import CheckFailed  # noqa: E402
from nblib.checks.bigram import check_smoothed_probs  # noqa: E402
import exercises  # noqa: E402
import grade  # noqa: E402

LESSONS = [l["file"] for l in course.load_course()["lesson"] if l["status"] == "ready"]
PLANTED = "01_bigram.ipynb"
WRONG, LOOPING = "01.smoothing", "01.trigram"
CELL_TIMEOUT = 20  # for dave only: lesson 01's longest FAST cell takes a few seconds


def instructor(lesson):
    return nbformat.read(ROOT / "notebooks" / lesson, as_version=4)


def student(lesson):
    return nbformat.read(ROOT / "student" / lesson, as_version=4)


def with_answer(lesson, exercise_id, body):
    """The student version with one exercise's stub replaced by ``body`` (same indentation)."""
    nb = student(lesson)
    for cell in nb.cells:
        if cell.cell_type == "code" and cell.source.startswith(f"# Exercise {exercise_id} "):
            lines = cell.source.split("\n")
            at = next(i for i, ln in enumerate(lines) if "raise NotImplementedError" in ln)
            indent = lines[at][: len(lines[at]) - len(lines[at].lstrip())]
            lines[at] = "\n".join(indent + b for b in body.split("\n"))
            cell.source = "\n".join(lines)
            return nb
    raise AssertionError(f"{lesson} has no exercise {exercise_id}")


def solved_except(lesson, exercise_id, body):
    """The instructor version with one exercise's whole cell replaced by a student's attempt."""
    nb = instructor(lesson)
    attempt = with_answer(lesson, exercise_id, body)
    ex = next(e for e in exercises.exercises(nb, lesson) if e.id == exercise_id)
    nb.cells[ex.cell].source = next(c.source for c in attempt.cells if c.source.startswith(f"# Exercise {exercise_id} "))
    return nb


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    root = tmp_path_factory.mktemp("class")
    subs = []
    for lesson in LESSONS:
        for who, nb in (("alice", instructor(lesson)), ("bob", student(lesson))):
            (root / who).mkdir(exist_ok=True)
            nbformat.write(nb, root / who / lesson)
            subs.append(root / who / lesson)
    # ignores alpha: a plausible mistake that the check catches
    carol = solved_except(PLANTED, WRONG, "return counts.float() / counts.float().sum(dim=1, keepdim=True)")
    nbformat.write(carol, root / f"carol-{PLANTED}")
    subs.append(root / f"carol-{PLANTED}")
    out = root / "grades"
    assert grade.main([str(s) for s in subs] + ["--out", str(out)]) == 0  # the default time limits
    with open(out / "grades.csv", newline="") as f:
        rows = {r["student"]: r for r in csv.DictReader(f)}
    return json.loads((out / "grades.json").read_text()), rows


@pytest.fixture(scope="module")
def looping(tmp_path_factory):
    """dave's lesson 01, graded alone with a short per-cell limit (his loop never ends)."""
    root = tmp_path_factory.mktemp("dave")
    nbformat.write(solved_except(PLANTED, LOOPING, "while True:\n    pass"), root / f"dave-{PLANTED}")
    out = root / "grades"
    assert grade.main([str(root / f"dave-{PLANTED}"), "--out", str(out), "--cell-timeout", str(CELL_TIMEOUT)]) == 0
    return json.loads((out / "grades.json").read_text())


def all_exercises():
    return {ex.id: ex.points for lesson in LESSONS for ex in exercises.exercises(instructor(lesson), lesson)}


@pytest.mark.slow
def test_every_lesson_with_exercises_is_graded(table):
    data, _ = table
    assert set(data["columns"]) == set(all_exercises())
    assert len(all_exercises()) >= len(LESSONS)


@pytest.mark.slow
def test_instructor_versions_get_full_marks(table):
    data, rows = table
    alice = data["students"]["alice"]
    failed = {ex: r["reason"] for ex, r in alice["exercises"].items() if r["points"] != r["max"]}
    assert not failed, failed
    assert alice["total"] == sum(all_exercises().values())
    assert int(rows["alice"]["total"]) == alice["total"]


@pytest.mark.slow
def test_untouched_student_versions_get_zero_not_attempted(table):
    data, rows = table
    bob = data["students"]["bob"]
    assert bob["total"] == 0
    assert {r["reason"] for r in bob["exercises"].values()} == {"not attempted"}
    assert rows["bob"][f"{WRONG} reason"] == "not attempted"


@pytest.mark.slow
def test_one_wrong_exercise_loses_exactly_its_points_with_the_checks_message(table):
    data, rows = table
    carol = data["students"]["carol"]["exercises"]
    points = {ex.id: ex.points for ex in exercises.exercises(instructor(PLANTED), PLANTED)}
    assert carol[WRONG]["points"] == 0 and carol[WRONG]["status"] == "wrong"
    # the reason is the check's own message, as the learner would have seen it
    with pytest.raises(CheckFailed) as err:
        check_smoothed_probs(lambda counts, alpha: counts.float() / counts.float().sum(dim=1, keepdim=True))
    assert " ".join(str(err.value).split())[:80] in carol[WRONG]["reason"], carol[WRONG]["reason"]
    assert all(carol[ex]["points"] == points[ex] for ex in points if ex != WRONG), carol
    assert int(rows["carol"]["total"]) == sum(points.values()) - points[WRONG]


@pytest.mark.slow
def test_an_infinite_loop_is_stopped_by_the_time_limit(looping):
    dave = looping["students"]["dave"]["exercises"]
    assert dave[LOOPING]["status"] == "timed out" and str(CELL_TIMEOUT) in dave[LOOPING]["reason"]
    assert all(r["points"] == r["max"] for ex, r in dave.items() if ex != LOOPING), dave


def test_a_lesson_is_recognised_by_its_title_when_renamed(tmp_path):
    path = tmp_path / "homework.ipynb"
    nbformat.write(student(PLANTED), path)
    assert grade.lesson_of(path, student(PLANTED), LESSONS) == PLANTED
    assert grade.student_of(tmp_path / "erin_01_bigram.ipynb", PLANTED) == "erin"
