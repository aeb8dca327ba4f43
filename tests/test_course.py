"""The course's own machinery: notebooks clean and in sync, student versions without leaks."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import course  # noqa: E402
import exercises  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def notebook(*cells):
    nb = nbformat.v4.new_notebook()
    for kind, src in cells:
        nb.cells.append(nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src))
    return nb


HINTS = ("**Hints for 99.square**\n<details><summary>Hint 1</summary>\n\nWhat is a square?\n</details>\n"
         "<details><summary>Hint 2</summary>\n\nA number times itself.\n</details>")
EXERCISE = notebook(
    ("md", "# 99 · Test lesson\n\nGoals."),
    ("code", "import nblib\nFAST, device = nblib.setup(seed=1)"),
    ("code", "# Exercise 99.square (2 points)\ndef square(x):\n    ### BEGIN SOLUTION\n    secret_answer_line = x * x\n"
             "    return secret_answer_line\n    ### END SOLUTION\n\nassert square(3) == 9\n"
             "### BEGIN HIDDEN TESTS\nassert square(-4) == 16  # hidden_check_line\n### END HIDDEN TESTS"),
    ("md", HINTS),
    ("md", "Why?\n\n<!-- BEGIN SOLUTION -->\nBecause squares are never negative at all.\n<!-- END SOLUTION -->"),
)
COURSE = {"repository": "https://github.com/example/course", "branch": "main", "lesson": []}
SECRET = "secret_answer_line = x * x"


def student_of(nb):
    return course.student_version(nb, COURSE, "notebooks/99_test.ipynb")


def leaks_of(instructor, students=None):
    """What the repository-wide leak check finds for one instructor notebook and its student version."""
    students = students or {"student/99_test.ipynb": student_of(instructor)}
    return exercises.leaks({"notebooks/99_test.ipynb": exercises.solution_lines(instructor, "99")}, students)


def test_student_version_stubs_solutions_naming_the_exercise():
    code = student_of(EXERCISE).cells[3].source
    assert "raise NotImplementedError('Exercise 99.square: your code goes here" in code
    assert "hints under this cell" in code
    assert "secret_answer_line" not in code
    assert code.startswith("# Exercise 99.square (2 points)")  # the header (and the points) stay
    assert "assert square(3) == 9" in code                      # the visible check stays
    assert code.split("\n")[3].startswith("    raise")           # the stub keeps the solution's indentation


def test_student_version_drops_hidden_tests_and_written_answers():
    text = "\n".join(c.source for c in student_of(EXERCISE).cells)
    assert "hidden_check_line" not in text
    assert "never negative" not in text and "*Your answer here.*" in text
    assert "Hint 2" in text  # hints are for students
    assert leaks_of(EXERCISE) == []


def test_stub_raises_not_implemented_when_run():
    with pytest.raises(NotImplementedError, match="Exercise 99.square"):
        exec(student_of(EXERCISE).cells[3].source, {})


def test_exercise_parts_for_the_grader():
    [ex] = exercises.exercises(EXERCISE, "99")
    assert (ex.id, ex.points, ex.cell, ex.hints) == ("99.square", 2, 2, 2)
    assert ex.check == "assert square(3) == 9"
    assert ex.hidden == "assert square(-4) == 16  # hidden_check_line"


def test_unclosed_solution_block_is_an_error():
    broken = notebook(("md", "# 98 · Broken"), ("code", "# Exercise 98.x (1 point)\n### BEGIN SOLUTION\nx = 1"))
    with pytest.raises(ValueError, match="never closed"):
        course.student_version(broken, COURSE, "notebooks/98_broken.ipynb")


def test_exercise_without_hidden_tests_or_hints_is_refused():
    no_hidden = copy.deepcopy(EXERCISE)
    no_hidden.cells[2].source = no_hidden.cells[2].source.split("### BEGIN HIDDEN")[0]
    with pytest.raises(ValueError, match="no hidden tests"):
        course.check_exercises(no_hidden, "99")
    no_hints = copy.deepcopy(EXERCISE)
    no_hints.cells[3].source = "Just prose."
    with pytest.raises(ValueError, match="two hints"):
        course.check_exercises(no_hints, "99")
    no_header = copy.deepcopy(EXERCISE)
    no_header.cells[2].source = no_header.cells[2].source.split("\n", 1)[1]
    with pytest.raises(ValueError, match="must start with"):
        course.check_exercises(no_header, "99")


# Realistic ways a solution reaches student/: each must be stripped or refused, never kept.
MARKER_VARIANTS = [
    ("### begin solution", "### end solution"),
    ("###BEGIN SOLUTION", "###END SOLUTION"),
    ("## BEGIN SOLUTION", "## END SOLUTION"),
    ("###  BEGIN SOLUTION", "###  END SOLUTION"),
    ("#### BEGIN SOLUTION", "#### END SOLUTION"),
    ("### BEGIN SOLUTION hint: x * x", "### END SOLUTION"),
    ("### BEGIN SOLUTONS", "### END SOLUTION"),
    ("### Begin Solution", "### END  solution"),
]
MD_VARIANTS = [
    ("<!--BEGIN SOLUTION-->", "<!--END SOLUTION-->"),
    ("<!-- begin solution -->", "<!-- end solution -->"),
    ("<!-- BEGIN  SOLUTION  -->", "<!-- END SOLUTION -->"),
    ("<!-- BEGIN SOLUTION", "END SOLUTION -->"),
]


def kept_or_refused(instructor, secret):
    """'refused' if generating the student version fails loudly, else whether the secret was kept."""
    try:
        student = student_of(instructor)
        found = leaks_of(instructor, {"student/99_test.ipynb": student})
    except exercises.MarkerError:
        return "refused"
    text = "\n".join(c.source for c in student.cells)
    return "leaked" if secret in text and not found else ("caught" if found else "stripped")


@pytest.mark.parametrize("begin,end", MARKER_VARIANTS, ids=[v[0] for v in MARKER_VARIANTS])
def test_code_marker_variants_never_leak(begin, end):
    nb = copy.deepcopy(EXERCISE)
    nb.cells[2].source = nb.cells[2].source.replace("### BEGIN SOLUTION", begin).replace("### END SOLUTION", end)
    assert kept_or_refused(nb, SECRET) in ("stripped", "refused", "caught")


@pytest.mark.parametrize("begin,end", MD_VARIANTS, ids=[v[0] for v in MD_VARIANTS])
def test_markdown_marker_variants_never_leak(begin, end):
    nb = copy.deepcopy(EXERCISE)
    nb.cells[4].source = nb.cells[4].source.replace("<!-- BEGIN SOLUTION -->", begin).replace("<!-- END SOLUTION -->", end)
    assert kept_or_refused(nb, "Because squares are never negative at all.") in ("stripped", "refused", "caught")


def test_valid_marker_spellings_are_understood():
    for begin, end in MARKER_VARIANTS[:2] + MARKER_VARIANTS[3:4]:
        nb = copy.deepcopy(EXERCISE)
        nb.cells[2].source = nb.cells[2].source.replace("### BEGIN SOLUTION", begin).replace("### END SOLUTION", end)
        assert kept_or_refused(nb, SECRET) == "stripped", begin


def test_solution_line_repeated_in_another_cell_is_caught():
    nb = copy.deepcopy(EXERCISE)
    nb.cells.append(nbformat.v4.new_code_cell("x = 2\n" + SECRET + "\nprint(x)"))
    assert any(SECRET in f for f in leaks_of(nb))


def test_solution_line_repeated_in_another_lesson_is_caught():
    other = notebook(("md", "# 97 · Other"), ("code", "y = 3\n    " + SECRET))
    students = {"student/99_test.ipynb": student_of(EXERCISE),
                "student/97_other.ipynb": course.student_version(other, COURSE, "notebooks/97_other.ipynb")}
    found = leaks_of(EXERCISE, students)
    assert any("97_other" in f and SECRET in f for f in found)


def test_allowed_lines_are_not_leaks():
    nb = copy.deepcopy(EXERCISE)
    nb.cells.append(nbformat.v4.new_code_cell(SECRET))
    solutions = {"notebooks/99_test.ipynb": exercises.solution_lines(nb, "99")}
    assert exercises.leaks(solutions, {"s": student_of(nb)}, allow={SECRET}) == []


def test_colab_cell_installs_only_the_package_and_fails_clearly():
    source = course.colab_cell_source(COURSE)
    assert '"nblib @ git+https://github.com/example/course@main"' in source
    assert "torch" not in source.lower()          # never reinstall what Colab has
    assert "jupyterlab" not in source and "[lab]" not in source and "[dev]" not in source
    assert "google.colab" in source
    namespace = {}
    exec(source, namespace)                       # outside Colab it does nothing (and does not fail)
    assert "What to do" in source and "raise RuntimeError" in source


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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_exercise_has_points_hidden_tests_and_hints(path):
    nb = nbformat.read(path, as_version=4)
    for ex in course.check_exercises(nb, path.name):  # raises if hidden tests, hints or check are missing
        assert ex.points >= 1 and ex.id.startswith(path.name[:2] + ".")
