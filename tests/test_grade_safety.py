"""The grader on a class that fights back: a teacher runs it on a folder of untrusted notebooks.

One grading run (``course.py grade <folder>``, as a teacher would type it) over honest
submissions beside a crashing, a segfaulting, a hanging, a flooding, a malformed, a detaching
one and planted cheats. Honest rows must be exactly right; every other row gets 0 (or a flag
for the teacher) with a reason; nothing a submission does reaches the grades, the checkout, a
classmate's file, the teacher's environment or the hidden tests' text. Lesson 00 (one short
exercise) keeps it fast; lesson 01 is used where a cheat needs its reference code.
"""
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import exercises  # noqa: E402
import grade  # noqa: E402
import sandbox  # noqa: E402

L00, L01 = "00_start_here.ipynb", "01_bigram.ipynb"
SECRET = "teacher-secret-4f1c9a"  # in the grader's environment: must never reach the grades
PLANTED_FILE = ROOT / "nblib" / "checks" / "_planted_by_a_submission.py"
CELL_TIMEOUT = 20  # lesson 01's longest FAST cell takes a few seconds (10 s failed it twice on a busy CI machine)
PROTECTIONS = sandbox.available()
LOCKED = PROTECTIONS["hidden folders"]  # root with mount namespaces: solutions, classmates, checkout out of reach

WRONG = "def softmax(x):\n    return x"  # what every cheat hands in: it fails the check and the hidden tests
FIND_CLASS = '''import pathlib
def _class_files():  # the folders on any command line (the grader's: its argument is the class folder)
    for _p in pathlib.Path("/proc").glob("[0-9]*/cmdline"):
        try:
            _args = _p.read_bytes().split(b"\\0")
        except OSError:
            continue
        for _a in _args:
            _d = pathlib.Path(_a.decode(errors="ignore"))
            try:
                if _d.is_absolute() and _d.is_dir() and _d != pathlib.Path("/"):
                    yield from _d.rglob("*.ipynb")
            except OSError:
                pass
'''
EXEC_SOLUTION = '''import json
def _solution_from(path):
    cells = json.loads(pathlib.Path(path).read_text())["cells"]
    src = next("".join(c["source"]) for c in cells if "".join(c["source"]).startswith("# Exercise 00.softmax"))
    return src.split("checks.check_softmax")[0]
'''
CHEATS = {
    # reads the instructor notebook in the checkout and runs its solution
    "read_solutions": WRONG + '''
import pathlib, nblib
exec(_solution_from(pathlib.Path(nblib.__file__).parents[1] / "notebooks" / "00_start_here.ipynb"))''',
    # blanks every cell the grader inserts
    "input_transformer": WRONG + '''
get_ipython().input_transformers_post.append(lambda lines: [] if any("grader" in l for l in lines) else lines)''',
    # wraps every statement in try/except: pass, so no assert can fail
    "ast_try_except": WRONG + '''
import ast
class _Swallow(ast.NodeTransformer):
    def visit_Module(self, node):
        node.body = [ast.Try(body=[s], handlers=[ast.ExceptHandler(type=None, name=None, body=[ast.Pass()])],
                             orelse=[], finalbody=[]) for s in node.body]
        return ast.fix_missing_locations(node)
get_ipython().ast_transformers.append(_Swallow())''',
    # replaces the checks and the comparisons they and the hidden tests use
    "monkeypatch_checks": WRONG + '''
import nblib.checks, nblib.checks.start, torch
nblib.checks.start.check_softmax = lambda f: None
nblib.checks.expect_close = lambda *a, **k: None
checks.check_softmax = lambda f: None
torch.allclose = lambda *a, **k: True
torch.equal = lambda *a, **k: True''',
    # silences the tracer-free way too: sys.settrace that skips every line of the grader's cells
    "settrace": WRONG + '''
import sys
def _skip(frame, event, arg):
    if "<grader>" in frame.f_code.co_filename:
        raise SystemExit
    return _skip
sys.settrace(_skip)''',
    # finds the class folder on the grader's command line and copies a classmate's answer
    "copy_classmate": WRONG + '''
for _f in _class_files():
    if "alice" in str(_f) and _f.name == "00_start_here.ipynb":
        exec(_solution_from(_f))''',
    # overwrites a classmate graded later (zoe) with an empty notebook
    "overwrite_classmate": WRONG + '''
for _f in _class_files():
    if "zoe" in str(_f):
        _f.write_text("{}")''',
    # plants a file in the checkout for later submissions
    "edit_checkout": WRONG + f'''
import pathlib
pathlib.Path({str(PLANTED_FILE)!r}).write_text("check_softmax = lambda f: None\\n")''',
    # prints the teacher's environment (the grader is two parents up) in its error
    "leak_environment": '''import os
def _environ(pid):
    try:
        return open(f"/proc/{pid}/environ").read()
    except OSError as err:
        return str(err)
_grader = int(open(f"/proc/{os.getppid()}/stat").read().split(") ")[1].split()[1])
raise RuntimeError(repr(dict(os.environ)) + _environ(os.getppid()) + _environ(_grader))''',
    # a transformer that passes the grader's reset (it claims to be IPython's) and turns the hidden
    # tests' cell into an error that quotes it
    "leak_hidden_tests": None,  # filled below: needs the correct answer, so that the hidden tests run
}
SOLVED = "def softmax(x):\n    e = (x - x.max(dim=-1, keepdim=True).values).exp()\n    return e / e.sum(dim=-1, keepdim=True)"
CHEATS["leak_hidden_tests"] = SOLVED + '''
def _quote(lines):
    src = "".join(lines)
    return [f"raise AssertionError({src!r})\\n"] if "grader: hidden" in src else lines
_quote.__module__ = "IPython.core.inputtransformer2"
get_ipython().input_transformers_cleanup.append(_quote)'''
NEEDS_HELPERS = {"read_solutions", "copy_classmate", "overwrite_classmate"}  # the others are flagged on their own code
CHEAT_REF = ("return checks._reference_ngram_nll(train_words, eval_words, 3, alpha)")  # lesson 01's reference code


def notebook(lesson):
    return nbformat.read(ROOT / "student" / lesson, as_version=4)


def with_cells(answer: str, before: str = "", helpers: bool = False) -> nbformat.NotebookNode:
    """Lesson 00's student version with the exercise cell replaced (no check call: a cheater
    deletes it), after a cell of the student's own (``before``, and a cheat's helpers)."""
    nb = notebook(L00)
    # only the imports and the exercise: the lesson's other cells would only make the test slower
    imports = next(i for i, c in enumerate(nb.cells) if "as checks" in c.source)
    nb.cells = [c for i, c in enumerate(nb.cells) if i <= imports or c.cell_type == "markdown"
                or c.source.startswith("# Exercise 00.softmax")]
    at = next(i for i, c in enumerate(nb.cells) if c.source.startswith("# Exercise 00.softmax"))
    nb.cells[at].source = f"# Exercise 00.softmax (1 point)\n{answer}\n"
    own = (FIND_CLASS + EXEC_SOLUTION if helpers else "") + before
    if own:
        nb.cells.insert(at, nbformat.v4.new_code_cell(own))
    return nb


def reference_cheat() -> nbformat.NotebookNode:
    nb = nbformat.read(ROOT / "notebooks" / L01, as_version=4)
    ex = next(e for e in exercises.exercises(nb, L01) if e.id == "01.trigram")
    head = nb.cells[ex.cell].source.split("    ### BEGIN SOLUTION")[0]
    nb.cells[ex.cell].source = f"{head}    {CHEAT_REF}\n"
    return nb


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    root = tmp_path_factory.mktemp("class")
    klass, out = root / "class", root / "grades"
    plants = {
        "alice/00_start_here.ipynb": nbformat.read(ROOT / "notebooks" / L00, as_version=4),
        "alice/01_bigram.ipynb": nbformat.read(ROOT / "notebooks" / L01, as_version=4),
        "bob/homework.ipynb": with_cells(SOLVED),  # recognised by its title, named by its folder
        "zoe/00_start_here.ipynb": with_cells(SOLVED),
        "crash_exit/00_start_here.ipynb": with_cells(SOLVED, "import os\nos._exit(1)"),
        "crash_segfault/00_start_here.ipynb": with_cells(SOLVED, "import ctypes\nctypes.string_at(0)"),
        "hang/00_start_here.ipynb": with_cells(SOLVED, "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass"),
        "flood/00_start_here.ipynb": with_cells(SOLVED, "for _ in range(300):\n    print('x' * 1_000_000)"),
        "detach/00_start_here.ipynb": with_cells(SOLVED, f'''import os, subprocess, time
subprocess.Popen(["sleep", "4242"], start_new_session=True)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(3)
        try:
            open({str(out / "grades.csv")!r}, "a").write("FORGED,99,1\\n")
        finally:
            os._exit(0)
    os._exit(0)'''),
        "cheat_reference/01_bigram.ipynb": reference_cheat(),
    }
    plants.update({f"cheat_{name}/00_start_here.ipynb": with_cells(code, helpers=name in NEEDS_HELPERS)
                   for name, code in CHEATS.items()})
    for rel, nb in plants.items():
        (klass / rel).parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, klass / rel)
    (klass / "eve").mkdir()
    (klass / "eve" / "00_start_here.ipynb").write_text("{ this is not json")
    zoe_before = sha(klass / "zoe" / "00_start_here.ipynb")
    PLANTED_FILE.unlink(missing_ok=True)
    env = dict(os.environ, GRADER_TEST_SECRET=SECRET)
    started = time.monotonic()
    try:
        run = subprocess.run([sys.executable, str(ROOT / "tools" / "course.py"), "grade", str(klass), "--out", str(out),
                              "--cell-timeout", str(CELL_TIMEOUT), "--timeout", "120", "--jobs", "2"],
                             env=env, capture_output=True, text=True, timeout=900)
        seconds = time.monotonic() - started
        planted = PLANTED_FILE.exists()
    finally:
        PLANTED_FILE.unlink(missing_ok=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    csv_text = (out / "grades.csv").read_text()
    time.sleep(4)  # the detached child would write by now
    data = json.loads((out / "grades.json").read_text())
    return {"data": data["students"], "csv": csv_text, "csv_after": (out / "grades.csv").read_text(),
            "json_text": (out / "grades.json").read_text(), "stdout": run.stdout, "planted": planted,
            "zoe_same": sha(klass / "zoe" / "00_start_here.ipynb") == zoe_before, "seconds": seconds, "out": out}


def softmax_of(graded, who):
    return graded["data"][who]["exercises"]["00.softmax"]


@pytest.mark.slow
def test_honest_rows_are_exactly_right(graded):
    alice = graded["data"]["alice"]
    lost = {ex: r for ex, r in alice["exercises"].items() if r["points"] != r["max"]}
    assert alice["total"] == alice["max"] > 1 and not lost, lost
    for who in ("bob", "zoe", "flood", "detach"):  # the flood and the detached child do not cost the answer
        assert softmax_of(graded, who)["points"] == 1, (who, softmax_of(graded, who))
    assert graded["zoe_same"] or not LOCKED, "a cheat overwrote a classmate's file"
    assert "FLAGS" not in "".join(ln for ln in graded["stdout"].splitlines() if ln.startswith(("alice ", "zoe ")))


@pytest.mark.slow
def test_crashes_and_hangs_get_a_row_with_the_reason(graded):
    for who in ("crash_exit", "crash_segfault"):
        r = softmax_of(graded, who)
        assert r["points"] == 0 and "kernel died" in r["reason"], r
    hang = softmax_of(graded, "hang")
    assert hang["points"] == 0 and "ignored the interrupt" in hang["reason"], hang


@pytest.mark.slow
def test_a_malformed_file_gets_a_row_and_does_not_stop_the_class(graded):
    eve = graded["data"]["eve"]
    assert eve["total"] == 0 and "not a readable notebook" in " ".join(eve["problems"]), eve


@pytest.mark.slow
def test_the_flood_does_not_reach_the_grader(graded):
    peak = int(graded["stdout"].split("grader peak memory: ")[1].split()[0])
    assert peak < 250, f"the grader grew to {peak} MB with a 300 MB flood"


@pytest.mark.slow
def test_nothing_outlives_grading(graded):
    assert graded["csv_after"] == graded["csv"] and "FORGED" not in graded["csv_after"]
    leftovers = [p for p in Path("/proc").glob("[0-9]*/cmdline") if b"4242" in p.read_bytes()]
    assert not leftovers, leftovers


@pytest.mark.slow
def test_every_cheat_scores_zero_or_is_flagged(graded):
    """The note in GRADING.md counts these: which cheats still score, and why."""
    scored = {}
    for name in [*CHEATS, "reference"]:
        row = graded["data"][f"cheat_{name}"]
        scored[name] = (row["total"] == row["max"], row["flags"])
        assert row["total"] == 0 or row["flags"], (name, row)
    print("cheats that still score:", {n: f for n, (s, f) in scored.items() if s})
    must_fail = ["input_transformer", "ast_try_except", "monkeypatch_checks", "settrace", "leak_environment",
                 "leak_hidden_tests"] + (["read_solutions", "copy_classmate", "overwrite_classmate", "edit_checkout"]
                                         if LOCKED else [])
    assert not [n for n in must_fail if scored[n][0]], scored
    assert not graded["planted"] or not LOCKED, "a submission wrote into the checkout"


@pytest.mark.slow
def test_no_secret_or_hidden_test_reaches_the_grades(graded):
    hidden = exercises.exercises(nbformat.read(ROOT / "notebooks" / L00, as_version=4), L00)[0].hidden
    for text in (graded["csv"], graded["json_text"]):
        assert SECRET not in text
        assert "torch.Generator().manual_seed(0)" not in text and "_x_before" not in text
        assert all(line.strip() not in text for line in hidden.split("\n") if len(line.strip()) > 30
                   and not line.strip().startswith(("f\"", "\"")))
    assert "hidden tests" in softmax_of(graded, "cheat_leak_hidden_tests")["reason"]


@pytest.mark.slow
def test_the_grader_says_which_protections_are_off(graded):
    line = next(ln for ln in graded["stdout"].splitlines() if ln.startswith("grader protections:"))
    off = [name for name, on in PROTECTIONS.items() if not on]
    assert all(name in line.split("OFF here:")[1] for name in off) if off else "OFF" not in line


def test_a_collision_is_refused_before_anything_runs(tmp_path):
    for rel in ("alice/00_start_here.ipynb", "mallory/alice-00_start_here.ipynb"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook(L00), tmp_path / rel)
    with pytest.raises(SystemExit) as err:
        grade.main([str(tmp_path), "--out", str(tmp_path / "grades")])
    message = str(err.value)
    assert "alice/00_start_here.ipynb" in message and "mallory/alice-00_start_here.ipynb" in message, message
    assert not (tmp_path / "grades" / "grades.csv").exists()


@pytest.mark.slow
def test_a_resubmitted_unchanged_class_is_not_run_again(graded):
    started = time.monotonic()
    rows = sorted((graded["out"] / "rows").glob("*.json"))
    assert len(rows) >= len(graded["data"])
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "grade.py"), str(graded["out"].parent / "class" / "alice"),
                          "--out", str(graded["out"])], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.count("unchanged since last graded") == 2, run.stdout + run.stderr
    assert time.monotonic() - started < 30
