"""The grader on planted submissions, as a teacher would run it over a class (two at a time, --jobs 2).

- alice hands in the instructor versions of every lesson: full marks everywhere;
- bob hands in the untouched student versions of BOB_LESSONS: 0 everywhere, "not attempted";
(carol, who gets one exercise wrong, and dave, whose answer loops forever, are in test_grade_planted.py:
a file of its own, so that the test workers share the grading runs.)
"""
import csv
import importlib
import json
import re
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import course  # noqa: E402
import exercises  # noqa: E402
import grade  # noqa: E402
from test_checks import learner_functions  # noqa: E402

LESSONS = [l["file"] for l in course.load_course()["lesson"] if l["status"] == "ready"]
PLANTED = "01_bigram.ipynb"
WRONG, LOOPING = "01.smoothing", "01.trigram"
CELL_TIMEOUT = 20  # for carol and dave: lesson 01's longest FAST cell takes a few seconds
# An untouched student version runs the whole lesson as alice's does (its exercises come last), so
# bob hands in three lessons whose runs are short (14 of the course's 58 exercises); for every
# exercise, test_every_untouched_exercise_is_not_attempted checks what makes his rows "not attempted".
BOB_LESSONS = ["00_start_here.ipynb", "03_backprop_tensors.ipynb", "04_tokenizer.ipynb"]


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


def grade_class(root, submissions, *options):
    """grade.main on {file name: notebook}; returns (grades.json, {student: grades.csv row}, {student: seconds})."""
    paths = []
    for name, nb in submissions.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, root / name)
        paths.append(root / name)
    out = root / "grades"
    assert grade.main([str(p) for p in paths] + ["--out", str(out), "--jobs", "2", *options]) == 0
    with open(out / "grades.csv", newline="") as f:
        rows = {r["student"]: r for r in csv.DictReader(f)}
    seconds = {r["student"]: r["seconds"] for r in (json.loads(p.read_text()) for p in (out / "rows").glob("*.json"))}
    return json.loads((out / "grades.json").read_text()), rows, seconds


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """alice and bob, with the default time limits."""
    submissions = {f"alice/{lesson}": instructor(lesson) for lesson in LESSONS}
    submissions.update({f"bob/{lesson}": student(lesson) for lesson in BOB_LESSONS})
    data, rows, _ = grade_class(tmp_path_factory.mktemp("class"), submissions)
    return data, rows


def student_exercises():
    """(lesson, id, the student version's exercise cell) for every exercise of the course."""
    found = []
    for lesson in LESSONS:
        cells = [c.source for c in student(lesson).cells if c.cell_type == "code"]
        for ex in exercises.exercises(instructor(lesson), lesson):
            found.append((lesson, ex.id, next(c for c in cells if c.startswith(f"# Exercise {ex.id} "))))
    return found


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
    ids = [ex.id for lesson in BOB_LESSONS for ex in exercises.exercises(instructor(lesson), lesson)]
    assert sorted(bob["exercises"]) == sorted(ids) and len(ids) >= 10
    assert bob["total"] == 0
    assert {r["reason"] for r in bob["exercises"].values()} == {"not attempted"}
    assert rows["bob"][f"{ids[-1]} reason"] == "not attempted"


@pytest.mark.parametrize("lesson, ex_id, cell", student_exercises(), ids=[e[1] for e in student_exercises()])
def test_every_untouched_exercise_is_not_attempted(lesson, ex_id, cell):
    """What makes bob's rows "not attempted", for every exercise, also those of lessons he does not hand in:
    the stub raises NotImplementedError, and the check under it lets that through (not "wrong")."""
    assert "    raise NotImplementedError(" in cell
    ((alias, name),) = re.findall(r"^(\w+)\.(check_\w+)\(", cell, re.MULTILINE)
    module = grade.check_modules(instructor(lesson))[alias]
    check = getattr(importlib.import_module(f"nblib.checks.{module}"), name)
    if name == "check_average_gradients":
        return  # runs the stub in two processes: tests/test_pretrain_checks.py checks that its error comes back

    def stub(*args, **kwargs):
        raise NotImplementedError(f"Exercise {ex_id}: your code goes here")

    with pytest.raises(NotImplementedError, match=ex_id):
        check(*learner_functions(check, stub))


def test_the_grader_stops_an_exercise_at_its_first_failure_and_the_notebook_at_its_last_exercise():
    nb = instructor(PLANTED)
    exs = exercises.exercises(nb, PLANTED)
    cells, roles, _ = grade.graded_notebook(nb, exs)
    assert max(roles) == len(cells) - 1 and roles[max(roles)] == (exs[-1].id, "hidden")  # nothing after it
    assert cells[-1].startswith(f"# grader: hidden of exercise {exs[-1].id}")
    for ex in exs:
        answer, check, hidden = sorted(i for i, (ex_id, _) in roles.items() if ex_id == ex.id)
        assert grade.needs(roles)[check] == [answer] and grade.needs(roles)[hidden] == [answer, check]
        assert answer not in grade.needs(roles)


def test_an_exercise_that_fails_after_a_failed_cell_of_the_student_names_that_cell():
    """A plot that timed out leaves P undefined; the exercise's NameError alone would puzzle a teacher."""
    nb = instructor(PLANTED)
    cells, roles, _ = grade.graded_notebook(nb, exercises.exercises(nb, PLANTED))
    defines_p = next(i for i, c in enumerate(cells) if c.startswith("P = (N + 1)"))
    hidden = next(i for i, r in roles.items() if r == (WRONG, "hidden"))
    errors = {defines_p: (grade.TIMEOUT_ENAME, "over 20 s"), hidden: ("NameError", "name 'P' is not defined")}
    number = [c.source for c in nb.cells if c.cell_type == "code"].index(cells[defines_p]) + 1
    assert grade.earlier_failure(cells, roles, errors, hidden) == (
        f" (after the notebook's code cell {number}, `P = (N + 1).float()`, failed: timed out: over 20 s)")
    assert grade.earlier_failure(cells, roles, {hidden: errors[hidden]}, hidden) == ""
    assert grade.earlier_failure(cells, roles, errors, defines_p) == ""  # only cells before the exercise's


def test_jobs_must_be_a_positive_whole_number(capsys):
    for bad in ("0", "two", "-1"):
        with pytest.raises(SystemExit):
            grade.main(["x.ipynb", "--jobs", bad])
        assert "at least 1" in capsys.readouterr().err


def test_a_lesson_is_recognised_by_its_title_when_renamed(tmp_path):
    path = tmp_path / "homework.ipynb"
    nbformat.write(student(PLANTED), path)
    assert grade.lesson_of(path, student(PLANTED), LESSONS) == PLANTED
    assert grade.student_of(tmp_path / "erin_01_bigram.ipynb", PLANTED) == "erin"


def test_every_check_module_a_lesson_names_is_imported_fresh_for_the_grader():
    # lesson 09 imports its checks under two names (checks, ppo_checks): a submission that replaced a check
    # under either name must still be checked by the course's own
    lesson = next(name for name in LESSONS if name.startswith("09_"))
    modules = grade.check_modules(instructor(lesson))
    assert modules["checks"] == "rl" and modules["ppo_checks"] == "ppo"
    import types
    tampered = types.SimpleNamespace(check_whiten=lambda fn: None)

    def whiten(x, mask):   # no centring: the course's check names it
        return x.masked_fill(~mask, 0)

    cell = grade.grader_cell("check", "09.whiten", "ppo_checks.check_whiten(whiten)", modules, "token-1")
    namespace = {"__grader_restore__": lambda: {}, "ppo_checks": tampered, "whiten": whiten}
    saved = {name: module for name, module in sys.modules.items() if name.startswith("nblib.checks")}
    try:  # the grader's cell imports the check modules afresh: its CheckFailed is another class than ours
        with pytest.raises(AssertionError, match=r"whiten \(float32 advantages"):
            exec(cell, namespace)  # noqa: S102
    finally:
        sys.modules.update(saved)
