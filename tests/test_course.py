"""The course's own machinery: notebooks clean and in sync, student versions without leaks, and
a learner's work never lost."""
import copy
import json
import shutil
import subprocess
import sys
import tomllib
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
    assert not dirty, (f"{path.name}: cells {dirty} carry outputs. Maintainers: `python tools/course.py sync` clears "
                       "them. Learners: your work belongs in work/ (`python tools/course.py start`).")


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


# A learner's work is never lost: sync, check and start on a small course of two lessons in a
# git repository of its own (tiny_course), and once on a copy of the real course.
OTHER = notebook(("md", "# 98 · Other lesson\n\nGoals."), ("code", "import nblib\nFAST, device = nblib.setup(seed=1)"))


def course_toml(*lessons):
    entries = "".join(f'[[lesson]]\nfile = "{name}"\ntitle = "{name[3:-6]}"\nbuilds = "-"\nstatus = "ready"\n'
                      for name in lessons)
    return 'repository = "https://github.com/example/course"\nbranch = "main"\n' + entries


def git(root, *args):
    subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@example.com",
                    "-c", "commit.gpgsign=false", *args], check=True, capture_output=True)


def commit_all(root):
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "course")


def point_course_at(root, monkeypatch):
    for name, path in {"ROOT": root, "NOTEBOOKS": root / "notebooks", "STUDENT": root / "student",
                       "README": root / "README.md", "WORK": root / "work",
                       "SYNC_RECORD": root / ".course-sync.json"}.items():
        monkeypatch.setattr(course, name, path)


@pytest.fixture
def tiny_course(tmp_path, monkeypatch):
    """A course of two lessons, synced and committed, that course's commands work on."""
    root = tmp_path / "course"
    (root / "notebooks").mkdir(parents=True)
    (root / "course.toml").write_text(course_toml("98_other.ipynb", "99_test.ipynb"))
    (root / "README.md").write_text(f"# Course\n{course.TABLE_START}\n{course.TABLE_END}\n")
    (root / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    nbformat.write(EXERCISE, root / "notebooks" / "99_test.ipynb")
    nbformat.write(OTHER, root / "notebooks" / "98_other.ipynb")
    point_course_at(root, monkeypatch)
    assert run("sync") == 0
    git(root, "init", "-q")
    commit_all(root)
    return root


def run(*args):
    return course.main(["course.py", *args])


def edit_cell(path, index, source):
    nb = nbformat.read(path, as_version=4)
    nb.cells[index].source = source
    nbformat.write(nb, path)


def as_jupyterlab_saves_it(path, outputs=True):
    """What opening (and running) a notebook in JupyterLab writes into it: nothing a learner typed."""
    nb = json.loads(path.read_text())
    nb["metadata"]["kernelspec"] = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
    nb["metadata"]["language_info"] = {"name": "python", "version": "3.11.9", "mimetype": "text/x-python",
                                       "file_extension": ".py", "codemirror_mode": {"name": "ipython", "version": 3}}
    nb["metadata"]["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    for n, cell in enumerate(c for c in nb["cells"] if c["cell_type"] == "code"):
        cell["metadata"]["execution"] = {"iopub.status.busy": "2026-01-01T00:00:00Z"}
        if outputs:
            cell["execution_count"] = n + 1
            cell["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["ran\n"]}]
    path.write_text(json.dumps(nb, indent=1))


def files_under(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".git" not in p.parts}


def change_lesson(root, source):
    """The course changes lesson 99 (what a `git pull` brings): new instructor text, student version regenerated."""
    edit_cell(root / "notebooks" / "99_test.ipynb", 5, source)  # the written answer (cell 0 is Colab's)
    assert run("sync") == 0


def test_sync_keeps_a_student_notebook_the_learner_changed(tiny_course, capsys):
    mine = tiny_course / "student" / "99_test.ipynb"
    edit_cell(mine, 3, "# Exercise 99.square (2 points)\ndef square(x):\n    return x * x  # my answer")
    edited = mine.read_bytes()
    edit_cell(tiny_course / "notebooks" / "99_test.ipynb", 5, "A new question?")  # the student version is now stale
    status = run("sync")
    assert mine.read_bytes() == edited
    assert status == 1  # the course is not fully in sync: say so
    out = capsys.readouterr().out
    assert "kept student/99_test.ipynb" in out and "--force" in out and "work/" in out
    assert run("check") == 0 and "not the course's: student/99_test.ipynb" in capsys.readouterr().out
    assert run("sync", "--force") == 0 and "A new question?" in mine.read_text()  # only when asked


def test_sync_and_check_leave_a_notebook_the_learner_made(tiny_course, capsys):
    notes = tiny_course / "student" / "my_notes.ipynb"
    nbformat.write(notebook(("md", "# my notes")), notes)
    before = notes.read_bytes()
    assert run("sync") == 0 and run("check") == 0
    assert notes.read_bytes() == before
    assert "never deletes it" in capsys.readouterr().out


def test_sync_regenerates_and_removes_what_the_course_made(tiny_course):
    change_lesson(tiny_course, "First change?")  # the committed student version is replaced
    change_lesson(tiny_course, "Second change?")  # so is the one sync wrote last (not committed)
    assert "Second change?" in (tiny_course / "student" / "99_test.ipynb").read_text()
    (tiny_course / "notebooks" / "98_other.ipynb").unlink()
    (tiny_course / "course.toml").write_text(course_toml("99_test.ipynb"))
    assert run("sync") == 0
    assert not (tiny_course / "student" / "98_other.ipynb").exists()  # committed, unchanged: the course's own
    assert run("check") == 0


def test_check_ignores_what_jupyterlab_writes_on_open_and_run(tiny_course, capsys):
    for path in (tiny_course / "student" / "99_test.ipynb", tiny_course / "notebooks" / "98_other.ipynb"):
        as_jupyterlab_saves_it(path)
    ran = files_under(tiny_course)
    assert run("check") == 0, capsys.readouterr().out
    assert run("sync") == 0
    assert files_under(tiny_course)["student/99_test.ipynb"] == ran["student/99_test.ipynb"]  # its outputs stay


def test_check_names_a_stale_cell_without_destroying_advice(tiny_course, capsys):
    edit_cell(tiny_course / "notebooks" / "99_test.ipynb", 5, "Changed, not synced.")
    assert run("check") == 1
    out = capsys.readouterr().out
    assert "out of sync: student/99_test.ipynb: cell 5 differs" in out and "rewrites only what the course made" in out


def test_start_copies_each_lesson_once_and_never_overwrites(tiny_course, capsys):
    assert run("start") == 0
    work = tiny_course / "work"
    assert (work / "99_test.ipynb").read_bytes() == (tiny_course / "student" / "99_test.ipynb").read_bytes()
    edit_cell(work / "99_test.ipynb", 3, "my attempt")
    nbformat.write(notebook(("md", "# scratch")), work / "scratch.ipynb")
    before = files_under(work)
    assert run("start") == 0
    assert files_under(work) == before  # idempotent, nothing overwritten
    (work / "98_other.ipynb").unlink()  # a learner who wants a fresh copy
    assert run("start") == 0 and (work / "98_other.ipynb").exists()
    status = subprocess.run(["git", "-C", str(tiny_course), "status", "--porcelain"], capture_output=True, text=True)
    assert status.stdout == ""  # work/ is ignored by git


def test_start_after_a_course_update(tiny_course, capsys):
    assert run("start") == 0
    work = tiny_course / "work"
    as_jupyterlab_saves_it(work / "98_other.ipynb", outputs=False)  # opened, nothing typed
    edit_cell(work / "99_test.ipynb", 3, "my attempt")
    mine = (work / "99_test.ipynb").read_bytes()
    change_lesson(tiny_course, "Updated question?")
    edit_cell(tiny_course / "notebooks" / "98_other.ipynb", 1, "# 98 · Other lesson, updated")
    assert run("sync") == 0
    assert run("start") == 0
    assert "Other lesson, updated" in (work / "98_other.ipynb").read_text()  # untouched copy: refreshed in place
    assert (work / "99_test.ipynb").read_bytes() == mine  # changed copy: kept as it is
    [beside] = work.glob("99_test.update-*.ipynb")
    assert beside.read_bytes() == (tiny_course / "student" / "99_test.ipynb").read_bytes()
    assert "has your changes" in capsys.readouterr().out
    before = files_under(work)
    assert run("start") == 0 and files_under(work) == before  # the update is offered once
    change_lesson(tiny_course, "Updated again?")
    assert run("start") == 0
    assert len(list(work.glob("99_test.update-*.ipynb"))) == 2  # beside the first, never over it
    assert all(files_under(work)[name] == data for name, data in before.items() if name != ".course.json")


def test_start_with_a_broken_record_says_what_to_do(tiny_course):
    assert run("start") == 0
    (tiny_course / "work" / ".course.json").write_text("{not json")
    with pytest.raises(SystemExit, match="Delete it and run this again: your notebooks stay as they are"):
        run("start")


def test_open_without_jupyterlab_says_how_to_install(tiny_course, monkeypatch, capsys):
    monkeypatch.setattr(course.importlib.util, "find_spec", lambda name: None)
    assert run("open") == 1 and 'pip install -e ".[lab]"' in capsys.readouterr().out


def test_real_course_keeps_a_learners_notebooks(tmp_path):
    """On a copy of this course: an edited lesson and a new notebook in student/ survive sync and check
    (which is what the test suite runs on student/: test_generated_files_are_in_sync)."""
    root = tmp_path / "course"
    for name in ("notebooks", "student", "tools"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("course.toml", "README.md", ".gitignore"):
        shutil.copy(ROOT / name, root / name)
    git(root, "init", "-q")
    commit_all(root)
    lesson = root / "student" / "05_attention_gpt.ipynb"
    nb = nbformat.read(lesson, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("my_own_experiment = 1"))
    nbformat.write(nb, lesson)
    as_jupyterlab_saves_it(lesson)
    nbformat.write(notebook(("md", "# my notes")), root / "student" / "notes.ipynb")
    learners = {p: p.read_bytes() for p in (lesson, root / "student" / "notes.ipynb")}
    tool = [sys.executable, str(root / "tools" / "course.py")]
    for command, says in (("sync", "left student/05_attention_gpt.ipynb alone"),
                          ("check", "not the course's: student/05_attention_gpt.ipynb")):
        result = subprocess.run(tool + [command], capture_output=True, text=True)
        assert result.returncode == 0 and says in result.stdout, result.stdout + result.stderr
        assert all(p.read_bytes() == data for p, data in learners.items()), command


def test_the_test_suite_runs_no_learners_notebook():
    """pytest (and nbval in it) collects the instructor notebooks only, never student/ or work/."""
    testpaths = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["testpaths"]
    assert set(testpaths) == {"tests", "notebooks"}
