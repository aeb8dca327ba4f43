"""Grade student notebooks: run each in a box, in FAST mode, score every exercise, write one table.

    python tools/course.py grade SUBMISSIONS_OR_FOLDERS... [--out DIR] [--cell-timeout S] [--timeout S] [--jobs N]

A submission is a student notebook (e.g. ``alice/01_bigram.ipynb`` or ``alice-01_bigram.ipynb``);
a folder is searched for notebooks. The lesson comes from the file name (or its title cell), the
student from what the file name has besides the lesson (or its folder). Two files of one student
and lesson are refused before anything runs. Each submission runs top to bottom in a fresh kernel
inside a worker process with limits (tools/sandbox.py; GRADING.md has the threat model). After each
exercise cell the grader runs, in cells of its own, the instructor's copy of that exercise's check
and then its hidden tests, each in a fresh copy of the course's check module, and each must print
a one-time token at its end to count. An exercise earns its points when all three ran without an
error; otherwise 0 with the reason (the first of the three that failed: the ones after it are not run,
nor are the cells after the last exercise's hidden tests, as nothing there can change a grade). A
submission that crashes, hangs or floods gets its row with the reason, and the others are still graded.
``--jobs`` submissions run at once, each in its own box. Each result is written to ``--out``/rows/ as
soon as it is known and ``grades.csv`` and ``grades.json`` are rebuilt from those; a submission graded
before and unchanged since is not run again.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tokenize
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import nbformat

import exercises
import sandbox
from course_files import NOTEBOOKS, ROOT, STUDENT, load_course

TIMEOUT_ENAME = "CellTimeout"
KERNEL_ENV = {"NBLIB_FAST": "1", "NBLIB_PROGRESS": "0", "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1",
              "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
INTERRUPT_GRACE = 5          # seconds a timed-out cell has to stop after the interrupt before its kernel is killed
STARTUP_ALLOWANCE = 60       # seconds on top of --timeout for starting and stopping the kernel
MAX_SUBMISSION_MB = 50       # a bigger "notebook" is refused unread
MAX_JOBS = 4                 # --jobs default: one submission per CPU core, at most this many (each may take GBs)
# Strings (and, from Python 3.12, the parts of f-strings) and comments: what a reason may quote.
NOT_CODE = {tokenize.STRING, tokenize.COMMENT} | {getattr(tokenize, name) for name in
                                                   ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END") if hasattr(tokenize, name)}
SECRET_WINDOW = 20           # characters of hidden-test code (no strings, no spaces) that a reason may not contain
KEPT_TEXT = 64 * 1024        # what the worker keeps of a grader cell's printed text (it looks for the token)
# the check modules a lesson imports under a name of its own: "from nblib.checks import ppo as ppo_checks"
CHECKS_IMPORT = re.compile(r"from\s+nblib\.checks\s+import\s+(\w+)\s+as\s+(\w+)\b")


def check_modules(instructor) -> dict[str, str]:
    """{name in the notebook: module of nblib.checks} for every check module the instructor's notebook imports."""
    return {alias: module for cell in instructor.cells for module, alias in CHECKS_IMPORT.findall(cell.source)}
# Cell 0, before any of the notebook's code: remember the libraries the checks and hidden tests use,
# so that each grader cell can put back what the notebook replaced (torch.allclose = ..., print = ...).
SNAPSHOT = """# grader: remember the libraries as they are
def __grader_restore__(_saved=None):
    import builtins, math, sys, torch, torch.nn.functional
    if _saved is None:
        objects = (builtins, math, torch, torch.Tensor, torch.nn.functional)
        _saved = [(o, dict(vars(o))) for o in objects], dict(sys.modules)
        __grader_restore__.__defaults__ = (_saved,)
    attributes, modules = _saved
    for obj, names in attributes:
        for name, value in names.items():
            if vars(obj).get(name, names) is not value:
                try:
                    setattr(obj, name, value)
                except (AttributeError, TypeError):
                    pass
    for name in ("builtins", "math", "torch", "torch.nn.functional"):
        sys.modules[name] = modules[name]
    return {"torch": modules["torch"], "math": modules["math"], "F": modules["torch.nn.functional"]}
__grader_restore__()"""
RESET = """# grader: undo what changes how cells run
import sys as _grader_sys
_grader_sys.settrace(None)
_grader_sys.setprofile(None)
_grader_ip = get_ipython()
_grader_ip.ast_transformers.clear()
_grader_ip.input_transformers_post.clear()
_grader_ip.input_transformers_cleanup[:] = [
    t for t in _grader_ip.input_transformers_cleanup if getattr(t, "__module__", "").startswith("IPython.")]"""
# Static flags: code a teacher should look at (the submission's own cells only, not the course's).
SUSPICIOUS = [
    (r"notebooks[/\\]|executed[/\\]|\.ipynb|\bgrades?\b|\.git\b", "reads course or class files"),
    (r"/proc\b|psutil", "looks at other processes"),
    (r"input_transformers|ast_transformers|register_magic|events\.register|\bsettrace|\bsetprofile", "changes how cells run"),
    (r"\bast\.|NodeTransformer|(?<![\w.])(exec|eval|compile)\(", "generates or rewrites code"),
    (r"nblib\.checks(?!\s+import\s+(call_learner|CheckFailed|\w+\s+as\s+checks)\b)|checks\.(?!check_)\w+"
     r"|\bimport\s+nblib\b|from\s+nblib(?!\.checks)\b", "uses the course's checks or reference code"),
    (r"os\._exit|\bctypes\b|subprocess|os\.system|os\.fork|setsid|multiprocessing|os\.kill|\bsignal\.", "processes, signals or ctypes"),
    (r"os\.environ|getenv", "reads the environment"),
    (r"sys\.modules|importlib|meta_path|sys\.path|builtins|__import__", "changes imports or builtins"),
    (r"\bopen\(|shutil|Path\(|os\.(remove|unlink|rename|replace|chmod|listdir|walk)", "reads or writes files"),
]


def lesson_of(path: Path, nb, lessons: list[str]) -> str:
    """The lesson file a submission belongs to: by its name, else by its title cell."""
    by_length = sorted(lessons, key=len, reverse=True)
    for lesson in by_length:
        if Path(lesson).stem in path.stem:
            return lesson
    for cell in nb.cells if nb is not None else []:
        if cell.cell_type == "markdown":
            m = re.match(r"#\s*(\d\d[a-z]?)\s*·", cell.source)
            if m:
                matches = [l for l in lessons if l.startswith(m[1] + "_")]
                if len(matches) == 1:
                    return matches[0]
            break
    raise ValueError(f"{path}: cannot tell which lesson this is; name it like the lesson (e.g. 01_bigram.ipynb)")


def student_of(path: Path, lesson: str | None) -> str:
    """What the file name has besides the lesson, else the folder's name (``alice/homework.ipynb``)."""
    stem = Path(lesson).stem if lesson else None
    if stem and stem in path.stem:
        rest = path.stem.replace(stem, "").strip(" _-.")
        if rest:
            return rest
    return path.resolve().parent.name


def find_submissions(paths: list[Path], out: Path) -> list[Path]:
    """The notebooks named, and those inside the folders named (not checkpoints, not the grades)."""
    found = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts
                            and out.resolve() not in p.resolve().parents)
        elif path.exists():
            found.append(path)
        else:
            raise SystemExit(f"grade: {path} does not exist")
    return found


def read_submission(path: Path):
    """(notebook, None) or (None, why it cannot be graded)."""
    try:
        if path.stat().st_size > MAX_SUBMISSION_MB * 1024 * 1024:
            return None, f"not graded: the file is over {MAX_SUBMISSION_MB} MB"
        return nbformat.read(path, as_version=4), None
    except Exception as err:  # noqa: BLE001 (any unreadable file is the student's row, not the grader's end)
        return None, f"not graded: not a readable notebook ({type(err).__name__}: {' '.join(str(err).split())[:150]})"


def flags(submission, official) -> list[str]:
    """Suspicious things in the cells the student wrote or changed (the course's own cells are skipped)."""
    course_cells = {c.source for c in official.cells} if official is not None else set()
    found = []
    for cell in submission.cells:
        if cell.cell_type != "code" or cell.source in course_cells:
            continue
        code = "\n".join(ln for ln in cell.source.split("\n") if not ln.lstrip().startswith(("#", "checks.check_")))
        found += [what for pattern, what in SUSPICIOUS if re.search(pattern, code) and what not in found]
    return found


def grader_cell(role: str, ex_id: str, code: str, checks_modules: dict[str, str] | None, token: str) -> str:
    """The instructor's check or hidden tests, run by ``exec`` so that a rewrite of the cell (an AST
    transformer, try/except around each statement) cannot skip an assert and still print ``token``,
    with fresh imports of the check modules (under each name the lesson gives one) that the student's
    code never touched."""
    fresh = "globals().update(__grader_restore__())\n"
    if checks_modules:
        fresh += ("import sys, importlib\n"
                 "for _m in [m for m in sys.modules if m == 'nblib.checks' or m.startswith('nblib.checks.')]:\n"
                 "    del sys.modules[_m]\n")
        fresh += "".join(f"{alias} = importlib.import_module('nblib.checks.{module}')\n"
                         for alias, module in sorted(checks_modules.items()))
    source = f"{fresh}{code}\nprint({token!r})\n"
    return f"# grader: {role} of exercise {ex_id}\nexec(compile({source!r}, '<grader>', 'exec'), dict(globals()))"


def graded_notebook(submission, exs: list[exercises.Exercise], checks_modules: dict[str, str] | None = None):
    """The submission's code cells with the grader's inserted, up to the last exercise's hidden tests
    (what follows cannot change a grade); returns (cells, {index: (id, role)}, {index: token})."""
    by_id = {ex.id: ex for ex in exs}
    cells: list[str] = [SNAPSHOT]
    roles: dict[int, tuple[str, str]] = {}
    tokens: dict[int, str] = {}
    for cell in submission.cells:
        if cell.cell_type != "code":
            continue  # markdown changes nothing the grader runs
        cells.append(cell.source)
        first = next((ln.strip() for ln in cell.source.split("\n") if ln.strip()), "")
        m = exercises.HEADER.match(first)
        if not m or m["id"] not in by_id or any(r == (m["id"], "answer") for r in roles.values()):
            continue
        ex = by_id[m["id"]]
        roles[len(cells) - 1] = (ex.id, "answer")
        cells.append(RESET)
        for role, code in (("check", ex.check), ("hidden", ex.hidden)):
            tokens[len(cells)] = secrets.token_hex(16)
            cells.append(grader_cell(role, ex.id, code, checks_modules, tokens[len(cells)]))
            roles[len(cells) - 1] = (ex.id, role)
    return (cells[:max(roles) + 1] if roles else cells), roles, tokens


def needs(roles: dict[int, tuple[str, str]]) -> dict[int, list[int]]:
    """{grader cell: the cells of its exercise before it}: once one of those failed, the exercise has
    its grade (the first failure), so the cell is not run (an answer that loops would loop again)."""
    return {i: [j for j in roles if j < i and roles[j][0] == ex_id] for i, (ex_id, role) in roles.items()
            if role != "answer"}


# ---------------------------------------------------------------- the worker (runs the student's code)

def worker() -> int:
    """Read a job on stdin, box this process, run the cells, report one JSON line per cell on stdout."""
    job = json.loads(sys.stdin.read())
    sandbox.set_limits(sandbox.Limits(**job["limits"]))  # before anything of the submission's runs
    report = os.fdopen(os.dup(1), "w", buffering=1)  # a dup is not inherited: the kernel cannot write here
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    scratch = Path(job["scratch"])
    try:
        sandbox.become_subreaper()
        if job["lock"]:
            sandbox.lock_down(scratch, [Path(p) for p in job["hide"]])
        if job["root"]:
            sandbox.drop_privileges(scratch, job["other_user"])
        os.chdir(scratch)
        for line in run_cells(job, scratch):
            report.write(json.dumps(line) + "\n")
    except Exception as err:  # noqa: BLE001 (the teacher reads it in the reason column)
        why = f"not run: the grader's worker failed: {type(err).__name__}: {err}"[:500]
        report.write(json.dumps({"stopped": why}) + "\n")
        raise
    finally:
        for pid in sandbox.descendants(os.getpid()):
            try:
                os.kill(pid, 9)
            except OSError:
                pass
    return 0


def run_cells(job: dict, scratch: Path):
    """Yield {"cell": i, "error": None or [name, message]} per cell, then {"stopped": why} if it stopped early."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, DeadKernelError
    from nbclient.util import ensure_async

    class IgnoredInterrupt(Exception):
        pass

    class Client(NotebookClient):
        """Keeps only what the grader needs of the output (a flood costs nothing) and kills a kernel
        that does not stop after the interrupt."""
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.kept: dict[int, str] = {}  # printed text of the grader's cells, where the token must be

        def output(self, outs, msg, display_id, cell_index):
            if str(cell_index) in job["tokens"] and msg["msg_type"] == "stream":
                text = self.kept.get(cell_index, "")
                if len(text) < KEPT_TEXT:
                    self.kept[cell_index] = text + msg["content"].get("text", "")[:KEPT_TEXT]
            return None

        async def _async_handle_timeout(self, timeout, cell=None):
            await ensure_async(self.km.interrupt_kernel())
            deadline = time.monotonic() + min(INTERRUPT_GRACE, timeout)
            while time.monotonic() < deadline:
                if await ensure_async(self.kc.shell_channel.msg_ready()):
                    return None  # the interrupted cell's reply is there: the loop reads it
                await asyncio.sleep(0.1)
            raise IgnoredInterrupt()

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in job["cells"]]
    client = Client(nb, timeout=1, kernel_name="python3", allow_errors=False, interrupt_on_timeout=True,
                    shutdown_kernel="immediate", resources={"metadata": {"path": str(scratch)}})
    started, cell_timeout, timeout = time.monotonic(), job["cell_timeout"], job["timeout"]
    failed = set()
    with client.setup_kernel():
        for i, cell in enumerate(nb.cells):
            if failed.intersection(job["needs"].get(str(i), [])):
                yield {"cell": i, "error": ["Skipped", "not run: an earlier part of this exercise failed"]}
                continue
            left = timeout - (time.monotonic() - started)
            if left <= 0:
                yield {"stopped": f"not run: the notebook's {timeout:g} s limit was used up"}
                return
            client.timeout = int(max(1, min(cell_timeout, left)))
            error = None
            try:
                client.execute_cell(cell, i)
                token = job["tokens"].get(str(i))
                if token and token not in client.kept.get(i, ""):
                    error = ["NotConfirmed", "the grader's cell did not run to its end "
                             "(does the notebook change how cells run or what they print?)"]
            except CellExecutionError as err:
                if err.ename == "KeyboardInterrupt":  # only the grader interrupts, on a timeout
                    error = [TIMEOUT_ENAME, f"over {client.timeout} s"]
                else:
                    error = [err.ename, err.evalue[:1000]]
            except IgnoredInterrupt:
                yield {"cell": i, "error": [TIMEOUT_ENAME, f"over {client.timeout} s and it ignored the interrupt"]}
                yield {"stopped": "not run: an earlier cell ignored the interrupt and its kernel was killed"}
                return
            except DeadKernelError:
                yield {"cell": i, "error": ["KernelDied", "the kernel died (os._exit, a crash, or out of memory)"]}
                yield {"stopped": "not run: the kernel died in an earlier cell"}
                return
            if error:
                failed.add(i)
            yield {"cell": i, "error": error}


# ---------------------------------------------------------------- the grader (never runs student code)

def secret_code(code: str) -> list[str]:
    """The hidden tests' code without its strings and comments, whitespace removed, in runs: a reason
    that contains a piece of it quotes the tests (their assert messages are strings: those may show)."""
    runs, run, row = [], "", None
    try:
        for tok in tokenize.generate_tokens(io.StringIO(code).readline):
            if tok.type in NOT_CODE or tok.start[0] != row:
                runs.append(run)
                run = ""
            row = tok.end[0]
            if tok.type not in NOT_CODE:
                run += "".join(tok.string.split())
    except (tokenize.TokenError, SyntaxError):
        runs = ["".join(line.split()) for line in code.split("\n")]
    runs.append(run)
    return [r for r in runs if len(r) >= SECRET_WINDOW]


def scrub(text: str, hidden_code: list[str]) -> str:
    """A reason without the hidden tests' code or the teacher's environment values."""
    squeezed = "".join(text.split())
    for run in hidden_code:
        starts = range(0, len(run) - SECRET_WINDOW + 1, SECRET_WINDOW // 2)
        if any(run[k:k + SECRET_WINDOW] in squeezed for k in starts):
            return "its message quoted the hidden tests, so it is not shown"
    flat = " ".join(text.split())
    for name, value in os.environ.items():
        if len(value) >= 8 and name not in sandbox.PASS_THROUGH and value in flat:
            flat = flat.replace(value, f"[{name}]")
    return flat


def reason(ename: str, evalue: str, role: str) -> tuple[str, str]:
    """(status, reason) for a failed cell of an exercise."""
    evalue = " ".join(evalue.split())[:300]
    if ename == "NotImplementedError":
        return "not attempted", "not attempted" if role == "answer" else f"not attempted: {evalue}"
    if ename == TIMEOUT_ENAME:
        return "timed out", f"timed out: {evalue}"
    if ename in ("KernelDied", "NotRun", "NotConfirmed"):
        return "not run", evalue
    where = {"answer": "", "check": " (check)", "hidden": " (hidden test)"}[role]
    if ename in ("CheckFailed", "AssertionError"):
        return "wrong", f"wrong{where}: {evalue}" if evalue else f"wrong{where}"
    return "raised", f"raised {ename}{where}: {evalue}"


def box_settings(paths: list[Path], out: Path, protections: dict[str, bool]) -> dict:
    """How the worker boxes itself: the folders it hides (solutions, tests, history, submissions,
    grades), whether it locks the file system down, drops root, and to which user."""
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    needed = [ROOT, Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(),
              Path(tempfile.gettempdir()).resolve()]
    folders = {NOTEBOOKS, ROOT / "executed", ROOT / "tests", ROOT / ".git",
               out.resolve()} | {p.resolve().parent for p in paths}
    # Never cover what the kernel needs (the course package, Python, the scratch folders).
    hide = [str(f) for f in sorted(folders) if not any(n == f or f in n.parents for n in needed)]
    lock = protections["hidden folders"]
    return {"hide": hide if lock else [], "lock": lock, "root": root, "other_user": protections["another user"]}


class Workers:
    """The workers running now (``--jobs``): a worker's clean-up kills its leftovers and spares the others."""
    def __init__(self):
        self.lock, self.running = threading.Lock(), set()
        self.keep = sandbox.descendants(os.getpid())  # what we had started before grading (pytest's, say)

    def start(self, env) -> subprocess.Popen:
        with self.lock:  # no clean-up runs while a new worker exists but is not yet registered
            proc = sandbox.start([sys.executable, str(Path(__file__).resolve()), "--worker"], env)
            self.running.add(proc.pid)
        return proc

    def kill(self, proc: subprocess.Popen) -> None:
        with self.lock:  # a second or so at most; the other workers' submissions keep running meanwhile
            self.running.discard(proc.pid)
            sandbox.kill_tree(proc, self.keep, spare=lambda: self.running)


def run_submission(cells, roles, tokens, cell_timeout, timeout, limits, box, workers) -> tuple[dict, str, set]:
    """Run the cells in a boxed worker: ({cell index: (error name, message)}, why the others did not run,
    the cells that ran)."""
    scratch = Path(tempfile.mkdtemp(prefix="grade-"))
    job = {"cells": cells, "tokens": {str(i): t for i, t in tokens.items()}, "cell_timeout": cell_timeout,
           "needs": {str(i): before for i, before in needs(roles).items()},
           "timeout": timeout, "scratch": str(scratch), "limits": dataclasses.asdict(limits), **box}
    env = sandbox.kernel_env(scratch, KERNEL_ENV)
    proc = workers.start(env)
    why = None
    try:
        out, _ = proc.communicate(json.dumps(job).encode(), timeout=limits.wall_s)
    except subprocess.TimeoutExpired:
        why = f"not run: the submission ran past {limits.wall_s:g} s and was killed"
        workers.kill(proc)
        out, _ = proc.communicate()
    finally:
        workers.kill(proc)
        shutil.rmtree(scratch, ignore_errors=True)
    errors = {}
    for line in out.decode(errors="replace").splitlines():
        msg = json.loads(line)
        if "stopped" in msg:
            why = msg["stopped"]
        elif msg["error"]:
            errors[msg["cell"]] = tuple(msg["error"])
        else:
            errors[msg["cell"]] = None
    why = why or f"not run: the grader's worker stopped (exit code {proc.returncode})"
    return {i: e for i, e in errors.items() if e}, (why if len(errors) < len(cells) else ""), set(errors)


def earlier_failure(cells: list[str], roles: dict, errors: dict, before: int) -> str:
    """What the teacher needs beside an exercise's error when one of the student's own cells failed first
    (a plot that timed out leaves its names undefined: the exercise then raises NameError)."""
    first = next((i for i in sorted(errors) if 0 < i < before and i not in roles and cells[i] != RESET), None)
    if first is None:
        return ""
    number = sum(1 for i in range(1, first + 1) if roles.get(i, ("", "answer"))[1] == "answer" and cells[i] != RESET)
    line = next((ln.strip() for ln in cells[first].splitlines() if ln.strip()), "")[:60]
    _, text = reason(errors[first][0], " ".join(errors[first][1].split())[:120], "answer")
    return f" (after the notebook's code cell {number}, `{line}`, failed: {text})"


def grade_one(nb, lesson: str, options, box, workers) -> dict:
    instructor = nbformat.read(NOTEBOOKS / lesson, as_version=4)
    exs = exercises.exercises(instructor, f"notebooks/{lesson}")
    cells, roles, tokens = graded_notebook(nb, exs, check_modules(instructor))
    started = time.monotonic()
    # CPU seconds count every thread: the limit is a backstop for the wall clock, not a second budget
    limits = sandbox.Limits(cpu_s=(options.timeout + 30) * (os.cpu_count() or 1), memory_mb=options.memory_mb,
                            file_mb=options.file_mb,
                            wall_s=options.timeout + STARTUP_ALLOWANCE)
    errors, why, ran = run_submission(cells, roles, tokens, options.cell_timeout, options.timeout, limits, box, workers)
    results = {}
    for ex in exs:
        mine = sorted(i for i, (ex_id, _) in roles.items() if ex_id == ex.id)
        result = {"points": 0, "max": ex.points, "status": "missing",
                  "reason": f"no cell starts with '# Exercise {ex.id} ({ex.points} points)'"}
        if mine:
            result.update(points=ex.points, status="passed", reason="")
            for i in mine:
                error = errors.get(i) or (None if i in ran else ("NotRun", why))
                if error:
                    status, text = reason(error[0], scrub(error[1], secret_code(ex.hidden)), roles[i][1])
                    result.update(points=0, status=status, reason=text + earlier_failure(cells, roles, errors, i))
                    break
        results[ex.id] = result
    return {"seconds": round(time.monotonic() - started, 1), "exercises": results}


# ---------------------------------------------------------------- the tables

def row_path(out: Path, student: str, lesson: str) -> Path:
    safe = re.sub(r"[^\w.-]", "_", f"{student}--{Path(lesson).stem}")
    return out / "rows" / f"{safe}.json"


def write_tables(out: Path) -> tuple[Path, Path]:
    """grades.csv and grades.json from every row in ``out``/rows (each written by an earlier step)."""
    rows: dict[str, dict] = {}
    columns: list[str] = []
    for path in sorted((out / "rows").glob("*.json")):
        r = json.loads(path.read_text(encoding="utf-8"))
        row = rows.setdefault(r["student"], {"files": [], "exercises": {}, "flags": [], "problems": []})
        row["files"].append(r["file"])
        row["exercises"].update(r["exercises"])
        row["flags"] += [f"{Path(r['file']).name}: {f}" for f in r["flags"]]
        row["problems"] += r["problems"]
        columns += [ex for ex in r["exercises"] if ex not in columns]
    order = list(columns)
    columns.sort(key=lambda ex: (ex.split(".")[0], order.index(ex)))
    for row in rows.values():
        row["total"] = sum(r["points"] for r in row["exercises"].values())
        row["max"] = sum(r["max"] for r in row["exercises"].values())
    csv_path, json_path = out / "grades.csv", out / "grades.json"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["student", "total", "max", "flags", "problems"] + [c for ex in columns for c in (ex, f"{ex} reason")])
        for student, row in sorted(rows.items()):
            cells = []
            for ex in columns:
                r = row["exercises"].get(ex, {"points": 0, "reason": "not submitted"})
                cells += [r["points"], r["reason"]]
            w.writerow([student, row["total"], row["max"], "; ".join(row["flags"]), "; ".join(row["problems"])] + cells)
    json_path.write_text(json.dumps({"columns": columns, "students": rows}, indent=1) + "\n", encoding="utf-8")
    return csv_path, json_path


def identify(paths: list[Path], lessons: list[str]) -> list[dict]:
    """One entry per file: its student, lesson, notebook (or the problem); exits on a collision."""
    found, owner = [], {}
    for path in paths:
        nb, problem = read_submission(path)
        try:
            lesson = lesson_of(path, nb, lessons)
        except ValueError as err:
            lesson, problem = None, problem or f"not graded: {err}"
        student = student_of(path, lesson)
        key = (student, lesson or path.name)
        if key in owner:
            raise SystemExit(f"grade: {owner[key]} and {path} are both {student}'s {key[1]}: grade one of them, "
                             "or rename one (the student comes from the file name, else its folder)")
        owner[key] = path
        found.append({"path": path, "student": student, "lesson": lesson, "nb": nb, "problem": problem})
    return found


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def peak_memory_mb() -> int:
    """This process's peak resident memory. Linux's VmHWM counts from this program's start;
    ru_maxrss would also keep the peak of the process that started us (it survives exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # kB on Linux (bytes on macOS)


def graded_row(e: dict, row: dict, options, box: dict, workers: Workers) -> dict:
    """``row`` with the submission's flags and exercises (run in a thread of its own under ``--jobs``)."""
    path, lesson = e["path"], e["lesson"]
    print(f"grading {path} ({e['student']}, lesson {lesson}) ...", flush=True)
    if e["problem"]:
        row["problems"].append(f"{path.name}: {e['problem']}")
        exs = exercises.exercises(nbformat.read(NOTEBOOKS / lesson, as_version=4), lesson) if lesson else []
        row["exercises"] = {ex.id: {"points": 0, "max": ex.points, "status": "error", "reason": e["problem"]}
                            for ex in exs}
    else:
        official = STUDENT / lesson
        row["flags"] = flags(e["nb"], nbformat.read(official, as_version=4) if official.exists() else None)
        row.update(grade_one(e["nb"], lesson, options, box, workers))
    return row


def default_jobs() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, MAX_JOBS))


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def main(argv: list[str]) -> int:
    if argv == ["--worker"]:
        return worker()
    parser = argparse.ArgumentParser(prog="course.py grade", description=__doc__.split("\n\n")[0])
    parser.add_argument("submissions", nargs="+", type=Path, help="student notebooks (.ipynb) or folders of them")
    parser.add_argument("--out", type=Path, default=Path("grades"), help="folder for grades.csv and grades.json")
    parser.add_argument("--cell-timeout", type=float, default=120, help="seconds one cell may run (default 120)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one notebook may run (default 900)")
    parser.add_argument("--memory-mb", type=int, default=8192, help="address space per process, MB (default 8192)")
    parser.add_argument("--file-mb", type=int, default=1024, help="largest file a submission may write, MB (default 1024)")
    parser.add_argument("--jobs", type=positive_int, default=default_jobs(),
                        help=f"submissions graded at once, each in its own box (default: the CPU cores, at most {MAX_JOBS})")
    args = parser.parse_args(argv)

    lessons = [l["file"] for l in load_course()["lesson"] if (NOTEBOOKS / l["file"]).exists()]
    entries = identify(find_submissions(args.submissions, args.out), lessons)
    if not args.out.exists():
        args.out.mkdir(parents=True)
        args.out.chmod(0o700)  # the grades are the teacher's alone (a folder of the teacher's own keeps its mode)
    (args.out / "rows").mkdir(exist_ok=True)
    (args.out / "rows").chmod(0o700)
    protections = sandbox.available()
    off = [name for name, on in protections.items() if not on]
    print(f"grader protections: {', '.join(n for n, on in protections.items() if on) or 'none'}"
          + (f"; OFF here: {', '.join(off)} (GRADING.md says what that allows)" if off else ""), flush=True)
    if shutil.which("docker") or shutil.which("podman"):
        print("a container runtime is on PATH: GRADING.md shows how to grade inside a container, the strongest box")
    box = box_settings([e["path"] for e in entries], args.out, protections)
    sandbox.become_subreaper()  # a detached child of a submission re-parents to us, and is killed
    workers, todo = Workers(), []
    for e in entries:
        path, lesson = e["path"], e["lesson"]
        target = row_path(args.out, e["student"], lesson or path.name)
        row = {"file": str(path), "student": e["student"], "lesson": lesson, "sha256": sha256(path),
               "instructor": sha256(NOTEBOOKS / lesson) if lesson else None, "flags": [], "problems": []}
        if target.exists():
            before = json.loads(target.read_text(encoding="utf-8"))
            if (before["sha256"], before["instructor"]) == (row["sha256"], row["instructor"]):
                print(f"unchanged since last graded: {path}", flush=True)
                continue
        todo.append((e, row, target))
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        running = [pool.submit(graded_row, e, row, args, box, workers) for e, row, _ in todo]
        targets = dict(zip(running, [target for _, _, target in todo]))
        for done in as_completed(running):  # in this thread only: one writer of the rows and tables
            targets[done].write_text(json.dumps(done.result(), indent=1) + "\n", encoding="utf-8")
            write_tables(args.out)  # after every submission: a crash of the grader loses nothing done
    csv_path, json_path = write_tables(args.out)
    data = json.loads(json_path.read_text(encoding="utf-8"))
    width = max([len(s) for s in data["students"]] + [1])
    for student, row in sorted(data["students"].items()):
        print(f"{student:{width}s}  {row['total']:>3}/{row['max']:<3} " +
              "  ".join(f"{ex}={r['points']}" + (f" ({r['reason'][:60]})" if r["reason"] else "")
                        for ex, r in row["exercises"].items())
              + (f"  FLAGS: {'; '.join(row['flags'])}" if row["flags"] else ""))
    print(f"wrote {csv_path} and {json_path}")
    print(f"grader peak memory: {peak_memory_mb()} MB (the submissions ran in their own processes)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main(sys.argv[1:]))
