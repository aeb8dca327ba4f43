"""The leak check (tools/exercises.py ``leaks``) finds a solution line wherever a student notebook quotes it:
in code, and in markdown prose, backticks, hints and code blocks, whatever the spacing."""
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import exercises  # noqa: E402

SECRET = "total = sum(x ** 2 for x in values)"
INSTRUCTOR = nbformat.v4.new_notebook(cells=[
    nbformat.v4.new_code_cell("# Exercise 99.sumsq (1 point)\ndef sumsq(values):\n    ### BEGIN SOLUTION\n"
                              f"    {SECRET}\n    return total\n    ### END SOLUTION\n\nassert sumsq([3]) == 9\n"
                              "### BEGIN HIDDEN TESTS\nassert sumsq([]) == 0\n### END HIDDEN TESTS"),
    nbformat.v4.new_markdown_cell("Why?\n<!-- BEGIN SOLUTION -->\nBecause a square is never negative.\n"
                                  "<!-- END SOLUTION -->"),
])
SOLUTIONS = {"notebooks/99_test.ipynb": exercises.solution_lines(INSTRUCTOR, "99")}


def found_in(*cells, allow=frozenset()):
    student = nbformat.v4.new_notebook(cells=list(cells))
    return exercises.leaks(SOLUTIONS, {"student/99_test.ipynb": student}, allow)


QUOTED = {
    "sentence": "Start from the sum: total = sum(x ** 2 for x in values) and return it.",
    "backticks": "Hint: write `total = sum(x ** 2 for x in values)` in one line.",
    "details hint": "<details><summary>Hint 2</summary>\n\nNearly: `total = sum(x ** 2 for x in values)`\n</details>",
    "code block": "Like this:\n```python\ndef sumsq(values):\n    total = sum(x ** 2 for x in values)\n```",
    "other spacing": "Try total  =  sum(x **  2 for x in\nvalues), wrapped over two lines.",
    "details inline": "<details><summary>Hint</summary>total = sum(x ** 2 for x in values)</details>",
    "markdown escapes": "Almost: total = sum(x \\*\\* 2 for x in values)",
    "html entities": "<details>total = sum(x &#42;&#42; 2 for x in values)</details>",
    "written answer": "In short. Because a square is never negative. So the sum is too.",
}


@pytest.mark.parametrize("where", QUOTED, ids=list(QUOTED))
def test_solution_quoted_in_markdown_is_a_leak(where):
    found = found_in(nbformat.v4.new_markdown_cell(QUOTED[where]))
    assert len(found) == 1 and "cell 0" in found[0] and "notebooks/99_test.ipynb" in found[0], found


def test_solution_in_a_code_comment_or_longer_line_is_a_leak():
    assert found_in(nbformat.v4.new_code_cell(f"# the answer: {SECRET}\nprint(1)"))
    assert found_in(nbformat.v4.new_code_cell(f"if True: {SECRET}"))


def test_a_longer_name_that_contains_the_line_is_not_a_leak():
    """Matches stop at word edges: `subtotal = ...` or `...values2` is another line."""
    assert found_in(nbformat.v4.new_code_cell("sub" + SECRET)) == []
    assert found_in(nbformat.v4.new_markdown_cell(f"`{SECRET[:-1]}2)`")) == []


def test_short_lines_and_allowed_lines_are_not_leaks():
    assert found_in(nbformat.v4.new_markdown_cell("Then `return total` and you are done.")) == []  # trivial
    assert found_in(nbformat.v4.new_markdown_cell(QUOTED["backticks"]), allow={SECRET}) == []


def test_one_finding_per_line_and_cell():
    found = found_in(nbformat.v4.new_markdown_cell(QUOTED["sentence"] + "\n" + QUOTED["backticks"]),
                     nbformat.v4.new_code_cell(SECRET))
    assert len(found) == 2 and "cell 0" in found[0] and "cell 1" in found[1]


def test_stray_markers_still_found():
    assert "marker" in found_in(nbformat.v4.new_code_cell("### BEGIN SOLUTION"))[0]
