"""The grader on two planted lesson-01 submissions (the helpers are test_grade.py's):

- carol gets one exercise of lesson 01 wrong: she loses exactly its points, with the check's message;
- dave's lesson-01 exercise loops forever: the time limit stops it once, and the rest is still graded.
"""
import pytest

from nblib.checks import CheckFailed
from nblib.checks.bigram import check_smoothed_probs
from test_grade import CELL_TIMEOUT, LOOPING, PLANTED, WRONG, exercises, grade_class, instructor, solved_except


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """carol's and dave's lesson 01, with a short per-cell limit (dave's loop never ends)."""
    return grade_class(tmp_path_factory.mktemp("planted"), {
        # ignores alpha: a plausible mistake that the check catches
        f"carol-{PLANTED}": solved_except(PLANTED, WRONG, "return counts.float() / counts.float().sum(dim=1, keepdim=True)"),
        f"dave-{PLANTED}": solved_except(PLANTED, LOOPING, "while True:\n    pass"),
    }, "--cell-timeout", str(CELL_TIMEOUT))



@pytest.mark.slow
def test_one_wrong_exercise_loses_exactly_its_points_with_the_checks_message(planted):
    data, rows, _ = planted
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
def test_an_infinite_loop_is_stopped_by_the_time_limit(planted):
    data, _, seconds = planted
    dave = data["students"]["dave"]["exercises"]
    assert dave[LOOPING]["status"] == "timed out" and str(CELL_TIMEOUT) in dave[LOOPING]["reason"]
    assert all(r["points"] == r["max"] for ex, r in dave.items() if ex != LOOPING), dave
    # stopped once: its check and hidden tests (which would call the loop again) are not run
    assert seconds["dave"] < seconds["carol"] + 2 * CELL_TIMEOUT, seconds
