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
