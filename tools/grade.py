"""Grade student notebooks: run each in FAST mode, score every exercise, write one table.

    python tools/course.py grade SUBMISSIONS... [--out DIR] [--cell-timeout S] [--timeout S]

A submission is a student notebook (e.g. ``alice/01_bigram.ipynb`` or
``alice-01_bigram.ipynb``): the lesson comes from the file name (or its title cell), the
student from the folder (or what the file name has besides the lesson). Each is run top to
bottom in a fresh kernel, in FAST mode, in a scratch folder. After each exercise cell the
grader runs, in cells of its own, the instructor's copy of that exercise's check and then
its hidden tests. An exercise earns its points when all three ran without an error;
otherwise it earns 0 with the reason: not attempted, timed out, raised, or wrong with the
check's message. Results go to ``grades.csv`` and ``grades.json`` in ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

import course
import exercises

TIMEOUT_ENAME = "CellTimeout"
KERNEL_ENV = {"NBLIB_FAST": "1", "NBLIB_PROGRESS": "0", "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1",
              "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def lesson_of(path: Path, nb, lessons: list[str]) -> str:
    """The lesson file a submission belongs to: by its name, else by its title cell."""
    by_length = sorted(lessons, key=len, reverse=True)
    for lesson in by_length:
        if Path(lesson).stem in path.stem:
            return lesson
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            m = re.match(r"#\s*(\d\d[a-z]?)\s*·", cell.source)
            if m:
                matches = [l for l in lessons if l.startswith(m[1] + "_")]
                if len(matches) == 1:
                    return matches[0]
            break
    raise ValueError(f"{path}: cannot tell which lesson this is; name it like the lesson (e.g. 01_bigram.ipynb)")


def student_of(path: Path, lesson: str) -> str:
    rest = path.stem.replace(Path(lesson).stem, "").strip(" _-.")
    return rest or path.resolve().parent.name


def graded_notebook(submission, exs: list[exercises.Exercise]):
    """The submission with the grader's cells inserted; returns (notebook, {cell index: (id, role)})."""
    by_id = {ex.id: ex for ex in exs}
    nb = nbformat.v4.new_notebook()
    nb.metadata = submission.metadata
    roles: dict[int, tuple[str, str]] = {}
    for cell in submission.cells:
        if cell.cell_type != "code":
            continue  # markdown changes nothing the grader runs
        nb.cells.append(nbformat.v4.new_code_cell(cell.source))
        first = next((ln.strip() for ln in cell.source.split("\n") if ln.strip()), "")
        m = exercises.HEADER.match(first)
        if not m or m["id"] not in by_id or any(r == (m["id"], "answer") for r in roles.values()):
            continue
        ex = by_id[m["id"]]
        roles[len(nb.cells) - 1] = (ex.id, "answer")
        for role, code in (("check", ex.check), ("hidden", ex.hidden)):
            nb.cells.append(nbformat.v4.new_code_cell(f"# grader: {role} of exercise {ex.id}\n{code}"))
            roles[len(nb.cells) - 1] = (ex.id, role)
    return nb, roles


def execute(nb, workdir: Path, cell_timeout: float, timeout: float) -> dict[int, tuple[str, str]]:
    """Run every cell in a fresh kernel; return {cell index: (error name, message)} for failed cells."""
    errors: dict[int, tuple[str, str]] = {}
    # On a timeout the kernel is interrupted and the grader waits for the interrupted cell's
    # reply (a KeyboardInterrupt) before the next cell, so the interrupt cannot land in it.
    client = NotebookClient(nb, timeout=int(cell_timeout), kernel_name="python3", allow_errors=False,
                            interrupt_on_timeout=True, resources={"metadata": {"path": str(workdir)}})
    started = time.monotonic()
    with course.environment(KERNEL_ENV), client.setup_kernel():
        for i, cell in enumerate(nb.cells):
            left = timeout - (time.monotonic() - started)
            if left <= 0:
                errors[i] = (TIMEOUT_ENAME, f"not run: the notebook's {timeout:g} s limit was used up")
                continue
            client.timeout = int(max(1, min(cell_timeout, left)))
            try:
                client.execute_cell(cell, i)
            except CellExecutionError as err:
                if err.ename == "KeyboardInterrupt":  # only the grader interrupts, on a timeout
                    errors[i] = (TIMEOUT_ENAME, f"over {client.timeout} s")
                else:
                    errors[i] = (err.ename, err.evalue)
    return errors


def reason(ename: str, evalue: str, role: str) -> tuple[str, str]:
    """(status, reason) for a failed cell of an exercise."""
    evalue = " ".join(evalue.split())[:300]
    if ename == "NotImplementedError":
        return "not attempted", "not attempted" if role == "answer" else f"not attempted: {evalue}"
    if ename == TIMEOUT_ENAME:
        return "timed out", f"timed out: {evalue}"
    where = {"answer": "", "check": " (check)", "hidden": " (hidden test)"}[role]
    if ename in ("CheckFailed", "AssertionError"):
        return "wrong", f"wrong{where}: {evalue}" if evalue else f"wrong{where}"
    return "raised", f"raised {ename}{where}: {evalue}"


def grade_one(path: Path, lesson: str, cell_timeout: float, timeout: float) -> dict:
    instructor = nbformat.read(course.NOTEBOOKS / lesson, as_version=4)
    exs = exercises.exercises(instructor, f"notebooks/{lesson}")
    submission = nbformat.read(path, as_version=4)
    nb, roles = graded_notebook(submission, exs)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="grade-") as workdir:
        errors = execute(nb, Path(workdir), cell_timeout, timeout)
    results = {}
    for ex in exs:
        cells = sorted(i for i, (ex_id, _) in roles.items() if ex_id == ex.id)
        result = {"points": 0, "max": ex.points, "status": "missing",
                  "reason": f"no cell starts with '# Exercise {ex.id} ({ex.points} points)'"}
        if cells:
            result.update(points=ex.points, status="passed", reason="")
            for i in cells:
                if i in errors:
                    status, why = reason(*errors[i], roles[i][1])
                    result.update(points=0, status=status, reason=why)
                    break
        results[ex.id] = result
    return {"file": str(path), "lesson": lesson, "seconds": round(time.monotonic() - started, 1),
            "exercises": results}


def write_tables(rows: dict[str, dict], columns: list[str], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / "grades.csv", out / "grades.json"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["student", "total", "max"] + [c for ex in columns for c in (ex, f"{ex} reason")])
        for student, row in sorted(rows.items()):
            cells = []
            for ex in columns:
                r = row["exercises"].get(ex, {"points": 0, "reason": "not submitted"})
                cells += [r["points"], r["reason"]]
            w.writerow([student, row["total"], row["max"]] + cells)
    json_path.write_text(json.dumps({"columns": columns, "students": rows}, indent=1) + "\n", encoding="utf-8")
    return csv_path, json_path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="course.py grade", description=__doc__.split("\n\n")[0])
    parser.add_argument("submissions", nargs="+", type=Path, help="student notebooks (.ipynb)")
    parser.add_argument("--out", type=Path, default=Path("grades"), help="folder for grades.csv and grades.json")
    parser.add_argument("--cell-timeout", type=float, default=120, help="seconds one cell may run (default 120)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one notebook may run (default 900)")
    args = parser.parse_args(argv)

    lessons = [l["file"] for l in course.load_course()["lesson"] if (course.NOTEBOOKS / l["file"]).exists()]
    columns: list[str] = []
    rows: dict[str, dict] = {}
    for path in args.submissions:
        nb = nbformat.read(path, as_version=4)
        lesson = lesson_of(path, nb, lessons)
        student = student_of(path, lesson)
        print(f"grading {path} ({student}, lesson {lesson}) ...", flush=True)
        result = grade_one(path, lesson, args.cell_timeout, args.timeout)
        row = rows.setdefault(student, {"files": [], "exercises": {}})
        row["files"].append(result["file"])
        row["exercises"].update(result["exercises"])
        columns += [ex for ex in result["exercises"] if ex not in columns]
    for row in rows.values():
        row["total"] = sum(r["points"] for r in row["exercises"].values())
        row["max"] = sum(r["max"] for r in row["exercises"].values())
    csv_path, json_path = write_tables(rows, columns, args.out)
    width = max(len(s) for s in rows)
    for student, row in sorted(rows.items()):
        print(f"{student:{width}s}  {row['total']:>3}/{row['max']:<3} " +
              "  ".join(f"{ex}={r['points']}" + (f" ({r['reason'][:60]})" if r["reason"] else "")
                        for ex, r in row["exercises"].items()))
    print(f"wrote {csv_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main(sys.argv[1:]))
