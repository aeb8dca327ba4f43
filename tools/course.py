#!/usr/bin/env python3
"""Course maintenance: one source (course.toml) for links, student versions and the README table.

    python tools/course.py start                 # learners: copy the lessons into work/, never overwriting
    python tools/course.py open [OPTIONS]        # learners: start, then JupyterLab (with OPTIONS) in work/
    python tools/course.py sync [--force]        # rewrite Colab cells, badges, student/, README table
    python tools/course.py check                 # exit 1 if any of those is stale, or a solution leaks
    python tools/course.py grade SUBMISSIONS...  # grade notebooks or folders of them, each boxed (GRADING.md)
    python tools/course.py record [NN ...]       # run lessons in full mode into executed/, with a report

A learner's work lives in work/, which git ignores: `start` copies each lesson's student
version there once, and after a course update (`git pull`) refreshes only the copies the
learner has not touched; a changed copy stays as it is and the new version is written beside
it. No command overwrites or deletes a notebook a learner changed or made: `sync` leaves a
student/ notebook alone unless it is a version the course itself produced (the committed one
or the one sync last wrote; --force overrides), and deletes nothing it did not make.
Notebooks are compared without what Jupyter writes on opening or running one (kernel and
language metadata, widget state, cell ids, execution counts; outputs, for `check`).

Exercises are marked up as CONTRIBUTING.md describes (``tools/exercises.py`` parses them):
the student version (student/) replaces each solution with a stub that raises
NotImplementedError naming the exercise, drops hidden tests and written answers, and
clears all outputs. Every line of a solution (ignoring trivial ones) is then searched for
in every student notebook: a line found there is a leak, unless course.toml allows it.
"""
from __future__ import annotations

import datetime
import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent))
import exercises  # noqa: E402  (sibling modules of this script)
# What grade.py and record.py share with this script; tests also reach colab_cell_source as course.colab_cell_source.
from course_files import (NOTEBOOKS, ROOT, STUDENT, colab_cell_source, colab_url, load_course,  # noqa: E402, F401
                     with_colab_setup)

README = ROOT / "README.md"
WORK = ROOT / "work"                        # the learner's copies of the lessons (git-ignored)
COPIES = ".course.json"                     # in WORK: which course version each copy came from
SYNC_RECORD = ROOT / ".course-sync.json"    # git-ignored: what sync last wrote into student/

TABLE_START, TABLE_END = "<!-- lessons:start -->", "<!-- lessons:end -->"


def student_version(nb, course: dict, relpath: str):
    """The learner's copy: solutions stubbed, hidden tests gone, badge pointing at itself."""
    student_rel = "student/" + Path(relpath).name
    nb = with_colab_setup(nb, course, student_rel)
    for i, cell in enumerate(nb.cells):
        where = f"{relpath} cell {i}"
        if cell.cell_type == "code":
            cell.source = "\n".join(exercises.parse_code(cell.source, where)["student"])
        elif cell.cell_type == "markdown":
            cell.source = "\n".join(exercises.parse_markdown(cell.source, where)["student"])
    header = next(c for c in nb.cells if c.cell_type == "markdown")
    note = ("> **Student version.** The exercises are yours to solve: each says its points, has a check to run "
            "and hints under it that open one at a time. "
            f"The worked solutions are in [`notebooks/{Path(relpath).name}`](../notebooks/{Path(relpath).name}).")
    if note not in header.source:
        header.source += "\n\n" + note
    return nb


def check_exercises(nb, relpath: str) -> list[exercises.Exercise]:
    """The notebook's exercises, each with hidden tests and at least two hint levels."""
    found = exercises.exercises(nb, relpath)
    for ex in found:
        if not ex.hidden.strip():
            raise exercises.MarkerError(f"{relpath}: exercise {ex.id} has no hidden tests (### BEGIN HIDDEN TESTS)")
        if ex.hints < 2:
            raise exercises.MarkerError(f"{relpath}: exercise {ex.id} needs a markdown cell right after it with at "
                                        "least two hints (<details><summary>Hint 1</summary> ...)")
        if not ex.check.strip():
            raise exercises.MarkerError(f"{relpath}: exercise {ex.id} has no check after its last END SOLUTION")
    return found


def lesson_table(course: dict) -> str:
    rows = ["| # | lesson | you build | status | open | FAST (CI) | full |", "|---|---|---|---|---|---|---|"]
    for lesson in course["lesson"]:
        number, name = lesson["file"][:2], lesson["file"]
        if lesson["status"] == "ready":
            link = f"[{lesson['title']}](notebooks/{name})"
            opens = f"[student]({colab_url(course, 'student/' + name)}) · [solutions]({colab_url(course, 'notebooks/' + name)})"
        else:
            link, opens = lesson["title"], ""
        rows.append(f"| {number} | {link} | {lesson['builds']} | {lesson['status']} | {opens} | "
                    f"{lesson.get('fast_time', '')} | {lesson.get('full_time', '')} |")
    return "\n".join(rows)


def readme_with_table(text: str, course: dict) -> str:
    start, end = text.index(TABLE_START), text.index(TABLE_END)
    return text[: start + len(TABLE_START)] + "\n" + lesson_table(course) + "\n" + text[end:]


def expected_files(course: dict, strict: bool = True) -> dict[Path, str]:
    """Every generated file, as it should be. Not strict: skip notebooks not yet in course.toml."""
    files = {}
    ready = [l["file"] for l in course["lesson"] if l["status"] == "ready"]
    unlisted = [p.name for p in NOTEBOOKS.glob("*.ipynb") if p.name not in ready]
    if unlisted and strict:
        raise ValueError(f"notebooks missing from course.toml (or not status = \"ready\"): {sorted(unlisted)}")
    solutions, students = {}, {}
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        if path.name in unlisted:
            print(f"skipped {path.name}: not in course.toml yet")
            continue
        nb = nbformat.read(path, as_version=4)
        rel = f"notebooks/{path.name}"
        check_exercises(nb, rel)
        files[path] = nbformat.writes(with_colab_setup(nb, course, rel)) + "\n"
        student = student_version(nb, course, rel)
        solutions[rel] = exercises.solution_lines(nb, rel)
        students[f"student/{path.name}"] = student
        files[STUDENT / path.name] = nbformat.writes(student) + "\n"
    bad = exercises.leaks(solutions, students, allowed_lines(course))
    if bad:
        raise ValueError("solution text leaks into the student versions (allow a line on purpose in course.toml's "
                         "[leaks] allow list):\n  " + "\n  ".join(bad[:20]))
    missing = [f for f in ready if not (NOTEBOOKS / f).exists()]
    if missing:
        raise ValueError(f"course.toml lists lessons with no notebook: {missing}")
    files[README] = readme_with_table(README.read_text(), course)
    return files


def allowed_lines(course: dict) -> set[str]:
    return {exercises.normalized(line) for line in course.get("leaks", {}).get("allow", [])}


WHERE_WORK_LIVES = ("Learners: keep your work in work/ (`python tools/course.py start` copies the lessons there; git "
                    "ignores it, so course updates never touch it). To keep a notebook you changed in student/, copy "
                    "it into work/ under a name of your own.")


def notebook_content(text: str, outputs: bool = True) -> str | None:
    """What a notebook holds for its reader, as one string: each cell's kind, source, tags,
    attachments and (if asked) outputs. Left out is what Jupyter rewrites by merely opening or
    running a notebook: kernel and language metadata, widget state, cell ids, execution counts.
    None if the text is not a notebook."""
    try:
        kept = []
        for cell in json.loads(text)["cells"]:
            source = cell.get("source", "")
            item = {"kind": cell["cell_type"], "source": "".join(source) if isinstance(source, list) else source,
                    "tags": cell.get("metadata", {}).get("tags", []), "attachments": cell.get("attachments", {})}
            if outputs and cell.get("outputs"):
                item["outputs"] = [{k: v for k, v in out.items() if k != "execution_count"} for out in cell["outputs"]]
            kept.append(item)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return json.dumps(kept, sort_keys=True)


def fingerprint(text: str, outputs: bool = True) -> str | None:
    """sha256 of notebook_content: equal for two notebooks that differ only in what Jupyter rewrites."""
    content = notebook_content(text, outputs)
    return None if content is None else hashlib.sha256(content.encode()).hexdigest()


def difference(actual: str, expected: str) -> str:
    """Where a notebook first differs from what it should be, in words (outputs not counted)."""
    if notebook_content(actual, outputs=False) is None:
        return "not a readable notebook"
    have, want = (json.loads(notebook_content(t, outputs=False)) for t in (actual, expected))
    changed = next((i for i, (a, b) in enumerate(zip(have, want)) if a != b), None)
    return f"cell {changed} differs" if changed is not None else f"{len(have)} cells where {len(want)} belong"


def relpath(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")  # a broken file is a learner's, never an error


def read_json(path: Path, what_to_do: str) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise SystemExit(f"{path} is not valid JSON ({err}). {what_to_do}")


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def write_new(path: Path, text: str) -> None:
    """Create a file; fails rather than overwrite one that appeared meanwhile."""
    with open(path, "x", encoding="utf-8") as f:
        f.write(text)


def git(*args: str) -> subprocess.CompletedProcess | None:
    """Run git in the course's folder; None where there is no git."""
    try:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, encoding="utf-8",
                              errors="replace")
    except OSError:
        return None


def git_knows_head() -> bool:
    result = git("rev-parse", "--verify", "--quiet", "HEAD")
    return result is not None and result.returncode == 0


def committed(path: Path) -> str | None:
    """The file as the last commit holds it; None if it is not committed (or there is no git repository)."""
    result = git("show", f"HEAD:./{relpath(path)}")  # ./ : relative to ROOT, even inside a larger repository
    return result.stdout if result is not None and result.returncode == 0 else None


def course_versions(path: Path) -> set[str]:
    """Fingerprints of the versions of a student/ file the course produced: the committed one and
    the one sync last wrote."""
    head = committed(path)
    versions = {read_json(SYNC_RECORD, "Delete it and run sync again.").get(relpath(path)),
                fingerprint(head) if head is not None else None}
    return versions - {None}


def made_by_course(path: Path, outputs: bool) -> bool:
    """Whether a student/ file is, unchanged, a version the course produced (outputs count as a
    change only if asked). Anything else is someone's own: edited, run or made by them."""
    return fingerprint(read(path), outputs) in course_versions(path)


def overwritable(path: Path, text: str) -> bool:
    """Whether sync may replace a student/ file with ``text``: it is a version the course made, or
    differs from ``text`` only in what Jupyter rewrites, so nobody's work is lost."""
    return fingerprint(read(path)) == fingerprint(text) or made_by_course(path, outputs=True)


def sync(files: dict[Path, str], force: bool) -> int:
    """Write every stale generated file, except a student/ notebook someone changed (unless forced);
    remove from student/ only notebooks the course made that no lesson generates any more."""
    STUDENT.mkdir(exist_ok=True)
    record = read_json(SYNC_RECORD, "Delete it and run sync again.")
    kept, yours, strangers = [], [], []  # out of date but changed by someone; changed by someone; not made here
    for path, text in files.items():
        current = read(path) if path.exists() else None
        if current != text:
            if current is not None and path.parent == STUDENT and not (force or overwritable(path, text)):
                if notebook_content(current, outputs=False) == notebook_content(text, outputs=False):
                    continue  # up to date, only run: its outputs are someone's
                (kept if fingerprint(text) not in course_versions(path) else yours).append(path)
                continue
            path.write_text(text, encoding="utf-8")
            print(f"wrote {relpath(path)}")
        if path.parent == STUDENT:
            record[relpath(path)] = fingerprint(text)
    for path in sorted(STUDENT.glob("*.ipynb")):
        if path in files:
            continue
        if made_by_course(path, outputs=True):
            path.unlink()  # unchanged since the course made it: nobody's work
            record.pop(relpath(path), None)
            print(f"removed {relpath(path)} (no lesson generates it any more)")
        else:
            strangers.append(path)
    write_json(SYNC_RECORD, record)
    for path in kept:
        print(f"kept {relpath(path)}: the course has a new version of it, but someone changed this one (edited "
              "or ran it); sync overwrites it only with --force, and then those changes are lost")
    for path in yours:
        print(f"left {relpath(path)} alone: someone changed it, and the course has nothing newer for it")
    for path in strangers:
        print(f"left {relpath(path)} alone: the course did not make it, so sync never deletes it")
    if kept or yours or strangers:
        print(WHERE_WORK_LIVES)
    return 1 if kept else 0


def check(files: dict[Path, str]) -> int:
    """Exit status 1 if a generated file is stale. A student/ notebook that git shows the course never
    made (a learner edited or created it) is reported and left alone, not counted as stale."""
    stale, yours = [], []
    knows = git_knows_head()
    for path, text in files.items():
        current = read(path) if path.exists() else None
        if current is None:
            stale.append((path, "missing"))
        elif path.suffix != ".ipynb":
            if current != text:
                stale.append((path, "differs from what course.toml gives"))
        elif notebook_content(current, outputs=False) != notebook_content(text, outputs=False):
            if path.parent == STUDENT and knows and not made_by_course(path, outputs=False):
                yours.append(path)
            else:
                stale.append((path, f"{difference(current, text)} from what notebooks/{path.name} gives"))
    for path in sorted(STUDENT.glob("*.ipynb")):
        if path not in files:
            if knows and not made_by_course(path, outputs=False):
                yours.append(path)
            else:
                stale.append((path, "no lesson in course.toml generates it"))
    for path in yours:
        print(f"not the course's: {relpath(path)} (someone changed or made it; sync leaves it alone unless forced)")
    for path, why in stale:
        print(f"out of sync: {relpath(path)}: {why}")
    if yours:
        print(WHERE_WORK_LIVES)
    if stale:
        print("Maintainers: run `python tools/course.py sync` (it rewrites only what the course made, and says "
              "what it leaves alone).")
        return 1
    print(f"in sync: {len(files)} generated files" + (f"; {len(yours)} of someone's own left alone" if yours else ""))
    return 0


def update_name(path: Path) -> Path:
    """A name beside ``path`` for the course's newer version of it: dated, and never one that exists."""
    stem = f"{path.stem}.update-{datetime.date.today().isoformat()}"
    n = 1
    while (candidate := path.with_name(stem + (f"-{n}" if n > 1 else "") + ".ipynb")).exists():
        n += 1
    return candidate


def start(course: dict) -> int:
    """Copy each lesson's student version into work/ once. After a course update, refresh a copy the
    learner has not touched, and write the new version beside one they have. Deletes nothing."""
    if WORK.exists() and not WORK.is_dir():
        raise SystemExit(f"{WORK} is a file, and the course keeps your notebooks in a folder of that name: "
                         "rename the file, then run this again.")
    WORK.mkdir(exist_ok=True)
    manifest = WORK / COPIES
    copies = read_json(manifest, "Delete it and run this again: your notebooks stay as they are, and the "
                                 "course's version of each one you changed is then written beside it.")
    done = {"copied": 0, "updated": 0, "up to date": 0, "yours, update beside": 0}
    for lesson in [entry["file"] for entry in course["lesson"] if entry["status"] == "ready"]:
        student, mine = STUDENT / lesson, WORK / lesson
        if not student.exists():
            print(f"skipped {lesson}: student/{lesson} is missing (`git checkout -- student/{lesson}` restores it)")
            continue
        text = read(student)
        latest, seen = fingerprint(text), copies.get(lesson, {})
        have = fingerprint(read(mine)) if mine.exists() else None
        if not mine.exists():
            write_new(mine, text)
            seen, what = {"copied": latest, "course": latest}, "copied"
            print(f"copied student/{lesson} -> {relpath(mine)}")
        elif latest in (seen.get("course"), have):
            seen, what = {"copied": seen.get("copied", latest), "course": latest}, "up to date"
        elif have is not None and have == seen.get("copied"):
            mine.write_text(text, encoding="utf-8")  # the learner never changed it: nothing of theirs to lose
            seen, what = {"copied": latest, "course": latest}, "updated"
            print(f"updated {relpath(mine)} to the course's new version (you had not changed it)")
        else:
            beside = update_name(mine)
            write_new(beside, text)
            print(f"{relpath(mine)} has your changes and stays as it is; the course's {'new' if seen else 'current'} "
                  f"version is {relpath(beside)}: compare the two and carry over what you want")
            seen, what = {**seen, "course": latest}, "yours, update beside"
        copies[lesson] = seen
        done[what] += 1
        write_json(manifest, copies)  # after each lesson, so that an interrupted run loses nothing
    print("work/: " + ", ".join(f"{n} {what}" for what, n in done.items() if n))
    print("Your work lives in work/: git ignores it, so `git pull` never touches it; after a pull, run this "
          "again to get new and updated lessons. Open it with `python tools/course.py open`.")
    return 0


def open_lab(course: dict, options: list[str]) -> int:
    """start, then JupyterLab in work/ (``options`` are JupyterLab's), so that what a learner opens
    and saves is their own copy."""
    if importlib.util.find_spec("jupyterlab") is None:
        print(f"JupyterLab is not installed in this Python ({sys.executable}). From the top of the course run "
              f'`{sys.executable} -m pip install -e ".[lab]"`, then this command again.')
        return 1
    start(course)
    command = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={WORK}", *options]
    print("running:", " ".join(command))
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 0


def main(argv: list[str]) -> int:
    command = argv[1] if len(argv) > 1 else "check"
    if command == "grade":
        import grade
        return grade.main(argv[2:])
    if command == "record":
        import record
        return record.main(argv[2:])
    options = argv[2:]
    if command == "start" and not options:
        return start(load_course(ROOT))
    if command == "open":
        return open_lab(load_course(ROOT), options)
    if command not in ("sync", "check") or set(options) - ({"--force"} if command == "sync" else set()):
        print(__doc__)
        return 2
    course = load_course(ROOT)  # ROOT of this module: tests point it at a scratch course
    try:
        files = expected_files(course, strict=command != "sync")
    except ValueError as err:  # a marker, a leak, a lesson missing: the message says what to fix
        print(f"{command} stopped before writing anything: {err}")
        return 1
    return sync(files, force="--force" in options) if command == "sync" else check(files)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
