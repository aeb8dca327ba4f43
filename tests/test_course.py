"""The course's own machinery: notebooks clean and in sync, student versions without leaks."""
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import course  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def notebook(*cells):
    nb = nbformat.v4.new_notebook()
    for kind, src in cells:
        nb.cells.append(nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src))
    return nb


EXERCISE = notebook(
    ("md", "# 99 · Test lesson\n\nGoals."),
    ("code", "import nblib\nFAST, device = nblib.setup(seed=1)"),
    ("code", "def square(x):\n    ### BEGIN SOLUTION hint: multiply x by itself\n    secret_answer_line = x * x\n"
             "    return secret_answer_line\n    ### END SOLUTION\n\nassert square(3) == 9"),
    ("code", "### BEGIN HIDDEN TESTS\nassert square(-4) == 16  # hidden_check_line\n### END HIDDEN TESTS\nprint('visible')"),
    ("md", "Why?\n\n<!-- BEGIN SOLUTION -->\nBecause squares are never negative at all.\n<!-- END SOLUTION -->"),
)
COURSE = {"repository": "https://github.com/example/course", "branch": "main", "lesson": []}


def test_student_version_stubs_solutions_with_the_hint():
    student = course.student_version(EXERCISE, COURSE, "notebooks/99_test.ipynb")
    code = student.cells[3].source
    assert "raise NotImplementedError('multiply x by itself')" in code
    assert "secret_answer_line" not in code
    assert "assert square(3) == 9" in code           # the visible check stays
    assert code.split("\n")[1].startswith("    ")    # the stub keeps the solution's indentation


def test_student_version_drops_hidden_tests_and_written_answers():
    student = course.student_version(EXERCISE, COURSE, "notebooks/99_test.ipynb")
    text = "\n".join(c.source for c in student.cells)
    assert "hidden_check_line" not in text and "print('visible')" in text
    assert "never negative" not in text and "*Your answer here.*" in text
    assert course.leaks(EXERCISE, student) == []


def test_stub_raises_not_implemented_when_run():
    student = course.student_version(EXERCISE, COURSE, "notebooks/99_test.ipynb")
    namespace = {}
    with pytest.raises(NotImplementedError, match="multiply x by itself"):
        exec(student.cells[3].source, namespace)


def test_leak_detector_catches_a_copied_solution_line():
    student = course.student_version(EXERCISE, COURSE, "notebooks/99_test.ipynb")
    student.cells[-1].source += "\nsecret_answer_line = x * x"
    assert "secret_answer_line = x * x" in course.leaks(EXERCISE, student)


def test_unclosed_solution_block_is_an_error():
    broken = notebook(("md", "# 98 · Broken"), ("code", "### BEGIN SOLUTION\nx = 1"))
    with pytest.raises(ValueError, match="never closed"):
        course.student_version(broken, COURSE, "notebooks/98_broken.ipynb")


def test_colab_cell_and_badge_come_from_the_repository_url():
    nb = course.with_colab_setup(EXERCISE, COURSE, "notebooks/99_test.ipynb")
    assert "colab-setup" in nb.cells[0].metadata["tags"]
    assert "git+https://github.com/example/course@main" in nb.cells[0].source
    assert "colab.research.google.com/github/example/course/blob/main/notebooks/99_test.ipynb" in nb.cells[1].source
    again = course.with_colab_setup(nb, COURSE, "notebooks/99_test.ipynb")
    assert nbformat.writes(again) == nbformat.writes(nb)  # idempotent: one cell, one badge


def test_generated_files_are_in_sync():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "course.py"), "check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; run `python tools/course.py sync`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_follows_the_conventions(path):
    nb = nbformat.read(path, as_version=4)
    assert "colab-setup" in nb.cells[0].metadata.get("tags", []), "first cell must be the Colab cell"
    assert nb.cells[1].cell_type == "markdown" and nb.cells[1].source.startswith(f"# {path.name[:2]} · ")
    assert "Open In Colab" in nb.cells[1].source
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "FAST, device = nblib.setup(" in code, "the config cell is missing"
    assert "assert" in code, "a notebook that asserts nothing tests nothing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_student_version_exists_without_solutions(path):
    student = ROOT / "student" / path.name
    assert student.exists(), f"run `python tools/course.py sync` to create {student}"
    text = student.read_text()
    for marker in ("BEGIN SOLUTION", "END SOLUTION", "HIDDEN TESTS"):
        assert marker not in text


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line.strip() for line in ci.splitlines() if "pytest" in line and not line.startswith("#"))
    assert command in readme, f"README's test command and .ci/run differ: {command}"
