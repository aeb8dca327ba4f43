"""The executed copies in executed/ show what each lesson does; they must be of its current code."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import course  # noqa: E402
import record  # noqa: E402

READY = [l["file"] for l in course.load_course()["lesson"] if l["status"] == "ready"]


@pytest.mark.parametrize("lesson", READY)
def test_executed_copy_is_of_the_current_lesson(lesson):
    why = record.stale(lesson)
    assert why is None, f"{why}: run `python tools/course.py record {lesson[:2]}` (full mode) and commit executed/"


@pytest.mark.parametrize("lesson", READY)
def test_report_has_the_lessons_headline_numbers(lesson):
    rows = json.loads(record.REPORT_JSON.read_text())
    assert lesson in rows, f"executed/report.json has no row for {lesson}"
    row = rows[lesson]
    assert row["seconds"] > 0 and row["machine"] and row["date"]
    assert "| device " in row["device"], "the row must say which device and mode the lesson ran on"
    assert lesson in (ROOT / "executed" / "REPORT.md").read_text()


def test_a_progress_bar_redrawn_in_place_keeps_its_final_state():
    import nbformat

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("loop()")
    cell.outputs = [nbformat.v4.new_output("stream", name="stderr", text="run:   0%|  | 0/9\r"),
                    nbformat.v4.new_output("stream", name="stderr", text="run:  50%|# | 4/9\rrun: 100%|##| 9/9\n"),
                    nbformat.v4.new_output("stream", name="stdout", text="done\n"),
                    nbformat.v4.new_output("stream", name="stderr", text="later\n")]
    nb.cells.append(cell)
    assert record.tidy_outputs(nb) == 1
    assert [(o.name, o.text) for o in cell.outputs] == [("stderr", "run: 100%|##| 9/9\n"), ("stdout", "done\n"),
                                                       ("stderr", "later\n")]


@pytest.mark.parametrize("lesson", READY)
def test_executed_copy_shows_one_line_per_progress_bar(lesson):
    import copy

    import nbformat

    nb = nbformat.read(ROOT / "executed" / lesson, as_version=4)
    before = json.dumps([c.get("outputs", []) for c in nb.cells])
    tidy = copy.deepcopy(nb)
    record.tidy_outputs(tidy)
    assert json.dumps([c.get("outputs", []) for c in tidy.cells]) == before, (
        f"executed/{lesson} keeps every redraw of its progress bars: record it again (tools/course.py record "
        f"{lesson[:2]}) or tidy it (python tools/record.py --tidy {lesson})")


def test_tidy_of_no_executed_copy_says_which_there_are(capsys):
    assert record.tidy(["nope"]) == 2
    assert "name the executed copies to tidy" in capsys.readouterr().out
