"""Exercises in an instructor notebook: markers, the student's stub, the grader's view, leaks.

An exercise is one code cell (CONTRIBUTING.md has the full convention)::

    # Exercise 01.trigram (3 points)
    def trigram_nll(...):
        ### BEGIN SOLUTION
        ...
        ### END SOLUTION

    checks.check_trigram_nll(trigram_nll)      # the check: after the last END SOLUTION
    ### BEGIN HIDDEN TESTS
    assert ...                                  # run by CI and the grader, not shown to students
    ### END HIDDEN TESTS

followed by a markdown cell of levelled hints (``<details><summary>Hint 1</summary>``...).
Markers are matched case-insensitively and with any spacing. A line that looks like a
marker but is not a valid one is an error: a typo must never leave a solution in place.
"""
from __future__ import annotations

import html
import re
from dataclasses import dataclass

CODE_MARKER = re.compile(r"^(?P<indent>\s*)###\s*(?P<edge>begin|end)\s+(?P<what>solution|hidden\s+tests)(?P<rest>.*)$", re.I)
MD_MARKER = re.compile(r"^\s*<!--\s*(?P<edge>begin|end)\s+solution\s*-->\s*$", re.I)
# Anything that mentions a marker's words: if it is not a valid marker, it is a typo.
MARKER_LIKE = re.compile(r"\b(begin|end)[\s_-]*(sol|hid)", re.I)
HEADER = re.compile(r"^#\s*Exercise\s+(?P<id>\d\d[a-z]?\.[A-Za-z_][\w-]*)\s*\(\s*(?P<points>\d+)\s*points?\s*\)\s*$")
HEADER_LIKE = re.compile(r"^#\s*exercise\b", re.I)
HINT = re.compile(r"<details>\s*<summary>\s*Hint\s+(\d+)", re.I)
STUB_COMMENT = "# YOUR CODE HERE"
MD_STUB = "*Your answer here.*"
TRIVIAL_CHARS = 12  # shorter solution lines (`return out`, `else:`) are not counted as leaks


class MarkerError(ValueError):
    """A marker is malformed, unmatched or misplaced; the message names the cell and line."""


@dataclass
class Exercise:
    id: str
    points: int
    cell: int            # index of the exercise cell in the notebook
    check: str           # the code after the last END SOLUTION, without hidden tests
    hidden: str          # the hidden tests' code
    hints: int           # number of hint levels in the markdown cell after it


def stub(exercise_id: str | None, indent: str) -> list[str]:
    what = f"Exercise {exercise_id}" if exercise_id else "This exercise"
    message = f"{what}: your code goes here (replace this line). Stuck? Open the hints under this cell, one at a time."
    return [f"{indent}{STUB_COMMENT}", f"{indent}raise NotImplementedError({message!r})"]


def parse_code(source: str, where: str) -> dict:
    """Split a code cell into its parts; raise MarkerError on any malformed marker.

    Returns ``{"header": (id, points) or None, "student": [lines], "check": [lines],
    "hidden": [lines], "solution": [lines], "n_solutions": int}``.
    """
    lines = source.split("\n")
    header = None
    first = next((ln for ln in lines if ln.strip()), "")
    if HEADER.match(first.strip()):
        m = HEADER.match(first.strip())
        header = (m["id"], int(m["points"]))
    elif HEADER_LIKE.match(first.strip()):
        raise MarkerError(f"{where}: malformed exercise header {first.strip()!r}; write `# Exercise NN.name (P points)`")
    student, check, hidden, solution = [], [], [], []
    mode, n_solutions = None, 0
    for number, line in enumerate(lines, 1):
        m = CODE_MARKER.match(line)
        if not m:
            if MARKER_LIKE.search(line):
                raise MarkerError(f"{where} line {number}: looks like a marker but is not one: {line.strip()!r}; "
                                  "markers are `### BEGIN SOLUTION`, `### END SOLUTION`, `### BEGIN HIDDEN TESTS`, "
                                  "`### END HIDDEN TESTS`, alone on their line")
            if mode == "solution":
                solution.append(line)
            elif mode == "hidden":
                hidden.append(line)
            else:
                student.append(line)
                if n_solutions:
                    check.append(line)
            continue
        edge, what, rest = m["edge"].lower(), "solution" if m["what"].lower() == "solution" else "hidden", m["rest"].strip()
        if rest:
            raise MarkerError(f"{where} line {number}: nothing may follow the marker: {line.strip()!r} "
                              "(hints go in the markdown cell under the exercise)")
        if edge == "begin":
            if mode is not None:
                raise MarkerError(f"{where} line {number}: {line.strip()!r} inside an open {mode} block")
            mode = what
            if what == "solution":
                n_solutions += 1
                check.clear()  # the check is what follows the LAST solution block
                student.extend(stub(header[0] if header else None, m["indent"]))
        else:
            if mode != what:
                raise MarkerError(f"{where} line {number}: {line.strip()!r} closes a block that is not open")
            mode = None
    if mode is not None:
        raise MarkerError(f"{where}: a {mode} block is never closed")
    # The check starts at the first top-level line after the last solution: indented lines
    # right after it are the rest of the function the learner completes (e.g. `return out`).
    start = next((k for k, ln in enumerate(check) if ln.strip() and not ln[0].isspace()), len(check))
    check = check[start:]
    if n_solutions and header is None:
        raise MarkerError(f"{where}: a cell with a solution must start with `# Exercise NN.name (P points)`")
    if header and not n_solutions:
        raise MarkerError(f"{where}: exercise {header[0]} has no `### BEGIN SOLUTION` block")
    return {"header": header, "student": student, "check": check, "hidden": hidden,
            "solution": solution, "n_solutions": n_solutions}


def parse_markdown(source: str, where: str) -> dict:
    """Split a markdown cell into what students see and the written answer."""
    student, solution, inside = [], [], False
    for number, line in enumerate(source.split("\n"), 1):
        m = MD_MARKER.match(line)
        if not m:
            if MARKER_LIKE.search(line):
                raise MarkerError(f"{where} line {number}: looks like a marker but is not one: {line.strip()!r}; "
                                  "written answers go between `<!-- BEGIN SOLUTION -->` and `<!-- END SOLUTION -->`, "
                                  "each alone on its line")
            (solution if inside else student).append(line)
            continue
        begin = m["edge"].lower() == "begin"
        if begin == inside:
            raise MarkerError(f"{where} line {number}: unmatched {line.strip()!r}")
        inside = begin
        if begin:
            student.append(MD_STUB)
    if inside:
        raise MarkerError(f"{where}: a written answer is never closed")
    return {"student": student, "solution": solution}


def exercises(nb, where: str) -> list[Exercise]:
    """The exercises of an instructor notebook, in order, each with its check, hidden tests and hints."""
    found, seen = [], set()
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        parts = parse_code(cell.source, f"{where} cell {i}")
        if not parts["header"]:
            continue
        ex_id, points = parts["header"]
        if ex_id in seen:
            raise MarkerError(f"{where} cell {i}: exercise id {ex_id} is used twice")
        seen.add(ex_id)
        after = nb.cells[i + 1] if i + 1 < len(nb.cells) else None
        levels = [int(n) for n in HINT.findall(after.source)] if after is not None and after.cell_type == "markdown" else []
        found.append(Exercise(ex_id, points, i, "\n".join(parts["check"]).strip("\n"),
                              "\n".join(parts["hidden"]).strip("\n"), len(levels)))
    return found


TRAILING_COMMENT = re.compile(r"\s+#[^'\"]*$")
SPACES = re.compile(r"\s+")


def flattened(text: str) -> str:
    """Text with every run of whitespace made one space: a line quoted in a sentence, wrapped
    over two lines or spaced differently is still the same line."""
    return SPACES.sub(" ", text).strip()


def normalized(line: str) -> str:
    """A line as the leak check compares it: whitespace flattened, without a trailing comment
    (a comment added to a solution line does not make it another line)."""
    return flattened(TRAILING_COMMENT.sub("", line.strip()))


def is_trivial(line: str) -> bool:
    """Too short or too generic to give anything away: `return out`, comments, imports."""
    s = normalized(line)
    return (len(s.replace(" ", "")) < TRIVIAL_CHARS or s.startswith("#")
            or re.match(r"(import|from)\s+[\w.]+(\s+import\b.*)?$", s) is not None)


def solution_lines(nb, where: str) -> set[str]:
    """Every substantial line that only the instructor should see: solutions, hidden tests, written answers."""
    lines = set()
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            parts = parse_code(cell.source, f"{where} cell {i}")
            lines.update(parts["solution"] + parts["hidden"])
        elif cell.cell_type == "markdown":
            lines.update(parse_markdown(cell.source, f"{where} cell {i}")["solution"])
    return {normalized(ln) for ln in lines if not is_trivial(ln)}


MD_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")  # markdown's backslash before punctuation: `\*` shows `*`


def as_shown(cell) -> str:
    """A cell's text as the learner reads it, flattened: markdown without its backslash escapes
    and HTML entities (``&lt;``), so a quoted line cannot hide behind them."""
    text = cell.source
    if cell.cell_type == "markdown":
        text = html.unescape(MD_ESCAPE.sub(r"\1", text))
    return flattened(text)


def quoted(line: str, text: str) -> bool:
    """Whether ``line`` appears in ``text`` (both flattened) as a whole: not as part of a longer
    name (``subtotal = ...`` does not quote ``total = ...``)."""
    start = text.find(line)
    while start >= 0:
        end = start + len(line)
        if not (start and _joins(text[start - 1], line[0])) and not (end < len(text) and _joins(line[-1], text[end])):
            return True
        start = text.find(line, start + 1)
    return False


def _joins(a: str, b: str) -> bool:
    """Two characters side by side are one word (so a match between them would cut a name)."""
    return (a.isalnum() or a == "_") and (b.isalnum() or b == "_")


def leaks(solutions: dict[str, set[str]], students: dict[str, object], allow: set[str] = frozenset()) -> list[str]:
    """Solution lines (from any lesson) found anywhere in any student notebook, and stray markers.

    A solution line is found wherever it is quoted: a line of code, a comment, a sentence of
    markdown, backticks, a hint, a code block in markdown, whatever the spacing and line breaks.
    ``solutions`` maps an instructor notebook to its solution lines; ``students`` maps a
    student notebook's name to the notebook. Returns readable findings, empty when clean.
    """
    owner: dict[str, str] = {}
    for name, lines in solutions.items():
        for line in sorted(lines):
            owner.setdefault(line, name)
    wanted = [line for line in owner if line not in allow]
    found = []
    for name, nb in students.items():
        for i, cell in enumerate(nb.cells):
            text = as_shown(cell)
            found += [f"{name} cell {i}: solution line from {owner[s]}: {s!r}" for s in wanted if quoted(s, text)]
            for line in cell.source.split("\n"):
                if CODE_MARKER.match(line) or MD_MARKER.match(line) or MARKER_LIKE.search(line):
                    found.append(f"{name} cell {i}: marker left in a student version: {normalized(line)!r}")
    return found
