"""Run lessons in full mode and keep what they showed: executed/NN_name.ipynb and a report.

    python tools/course.py record            # every ready lesson, one after the other
    python tools/course.py record 05 07      # just these (the report keeps the others' rows)
    python tools/course.py record --tidy 08     # one line per progress bar in a copy recorded before

Each lesson runs top to bottom in a fresh kernel in full mode (``NBLIB_FAST=0``) with
plain-text progress bars, on whatever device this machine has. The executed copy keeps
every output (plots as PNG), so the lesson can be read on GitHub before it is run. The
lesson's ``nblib.headline(...)`` values go into ``executed/REPORT.md`` beside the public
reference numbers from course.toml, with the machine and the wall time. A lesson whose
full mode wants more than this machine has runs in the largest mode it can, and its row
says which (the device line the lesson printed).

The test suite checks that every executed copy's code equals its lesson's code, so a
lesson changed after it was recorded fails CI until it is recorded again.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from course_files import NOTEBOOKS, ROOT, environment, load_course, with_colab_setup

EXECUTED = ROOT / "executed"
REPORT_JSON = EXECUTED / "report.json"
REPORT_MD = EXECUTED / "REPORT.md"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    import torch

    where = f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} cores"
    where = f"{torch.cuda.get_device_name(0)}; {where}" if torch.cuda.is_available() else f"{where}, no GPU"
    return f"{where}; torch {torch.__version__}, Python {platform.python_version()}"


class LoadMeter:
    """The machine's mean load while a lesson runs (1-minute load average, sampled every 5 s).

    The lesson itself keeps about one core busy; a mean well above the cores it uses says
    other work shared the machine, and the wall time is then an upper bound.
    """

    def __enter__(self):
        self.samples, self._stop = [], threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(5.0):
            self.samples.append(os.getloadavg()[0])

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def mean(self) -> float:
        return round(sum(self.samples) / len(self.samples), 2) if self.samples else round(os.getloadavg()[0], 2)


def code_cells(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


def stale(lesson: str) -> str | None:
    """Why ``executed/<lesson>`` does not match the lesson's current code, or None if it does."""
    path = EXECUTED / lesson
    if not path.exists():
        return f"executed/{lesson} is missing"
    current = with_colab_setup(nbformat.read(NOTEBOOKS / lesson, as_version=4), load_course(), f"notebooks/{lesson}")
    if code_cells(nbformat.read(path, as_version=4)) != code_cells(current):
        return f"executed/{lesson} was recorded from older code than notebooks/{lesson}"
    return None


def terminal_view(text: str) -> str:
    """What a terminal shows of ``text``: each line only from its last carriage return on, so a
    progress bar redrawn in place leaves its final state, not every redraw."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def tidy_outputs(nb) -> int:
    """Merge each cell's neighbouring outputs of one stream and keep their terminal view (one line per
    progress bar instead of one per redraw); return how many outputs were merged away."""
    merged = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        outputs = []
        for out in cell.outputs:
            last = outputs[-1] if outputs else None
            if (out.get("output_type") == "stream" and last is not None and last.get("output_type") == "stream"
                    and last.get("name") == out.get("name")):
                last["text"] += out["text"]
                merged += 1
            else:
                outputs.append(out)
        for out in outputs:
            if out.get("output_type") == "stream":
                out["text"] = terminal_view(out["text"])
        cell.outputs = outputs
    return merged


def run_lesson(lesson: str, crs: dict) -> dict:
    """Execute one lesson in full mode; write its executed copy; return its report row."""
    nb = with_colab_setup(nbformat.read(NOTEBOOKS / lesson, as_version=4), crs, f"notebooks/{lesson}")
    with tempfile.TemporaryDirectory(prefix="record-") as workdir:
        headlines_file = Path(workdir) / "headlines.jsonl"
        env = {"NBLIB_FAST": "0", "NBLIB_PROGRESS": "text", "NBLIB_RECORD": str(headlines_file),
               "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
        with environment(env), LoadMeter() as load:
            started = time.monotonic()
            NotebookClient(nb, timeout=None, kernel_name="python3",
                           resources={"metadata": {"path": workdir}}).execute()
            seconds = time.monotonic() - started
        headlines = [json.loads(line) for line in headlines_file.read_text().splitlines()] if headlines_file.exists() else []
    EXECUTED.mkdir(exist_ok=True)
    tidy_outputs(nb)
    nbformat.write(nb, EXECUTED / lesson)
    device = next((o.get("text", "").strip() for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.get("output_type") == "stream" and "| torch " in o.get("text", "")), "")
    return {"lesson": lesson, "seconds": round(seconds, 1), "load": load.mean(), "headlines": headlines, "device": device,
            "machine": machine(), "date": datetime.date.today().isoformat()}


def minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def write_report(rows: dict[str, dict], crs: dict) -> None:
    REPORT_JSON.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    refs = {l["file"]: l for l in crs["lesson"]}
    lines = ["# Executed lessons: what full mode printed",
             "",
             "Written by `python tools/course.py record`, which runs each lesson top to bottom in full",
             "mode and keeps the executed copy beside this file. Headline numbers are the values the",
             "lesson passed to `nblib.headline`; the reference column is the public number each is held",
             "against (SYLLABUS.md). Wall time is the whole notebook on the machine named in its row;",
             "load is the machine's mean 1-minute load average meanwhile (a lesson keeps one or two",
             "cores busy: a load well above the machine's cores means other work shared it).",
             "",
             "| lesson | headline numbers (full mode) | public reference | wall time | load | machine, date |",
             "|---|---|---|---|---|---|"]
    for lesson in sorted(rows):
        r = rows[lesson]
        values = "<br>".join(f"{h['name']} = {h['shown']}" for h in r["headlines"]).replace("|", "\\|") or "(none)"
        title = refs.get(lesson, {}).get("title", lesson)
        ref = refs.get(lesson, {}).get("reference", "")
        mode = "" if "full mode" in r["device"] else f" ({r['device'] or 'mode unknown'})"
        lines.append(f"| [{lesson[:2]} · {title}]({lesson}){mode} | {values} | {ref} | {minutes(r['seconds'])} | "
                     f"{r.get('load', '?')} | {r['machine']}; {r['date']} |")
    REPORT_MD.write_text("\n".join(lines) + "\n")


def tidy(names: list[str]) -> int:
    """Tidy executed copies recorded before ``tidy_outputs`` existed (their outputs are otherwise kept as they are)."""
    copies = sorted(p.name for p in EXECUTED.glob("*.ipynb"))
    wanted = [c for c in copies if any(c.startswith(n) for n in names)]
    if not wanted:
        print(f"name the executed copies to tidy, e.g. `record --tidy 08` (executed/ has: {', '.join(copies)})")
        return 2
    for lesson in wanted:
        nb = nbformat.read(EXECUTED / lesson, as_version=4)
        print(f"executed/{lesson}: {tidy_outputs(nb)} outputs merged")
        nbformat.write(nb, EXECUTED / lesson)
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--tidy"]:
        return tidy(argv[1:])
    crs = load_course()
    ready = [l["file"] for l in crs["lesson"] if l["status"] == "ready"]
    wanted = [l for l in ready if not argv or any(l.startswith(a) or l == a for a in argv)]
    if argv and not wanted:
        print(f"no ready lesson matches {argv}; ready: {ready}")
        return 2
    rows = json.loads(REPORT_JSON.read_text()) if REPORT_JSON.exists() else {}
    rows = {k: v for k, v in rows.items() if k in ready}
    for lesson in wanted:
        print(f"recording {lesson} in full mode ...", flush=True)
        rows[lesson] = run_lesson(lesson, crs)
        print(f"  {minutes(rows[lesson]['seconds'])} (load {rows[lesson]['load']}); " +
              "; ".join(f"{h['name']} = {h['shown']}" for h in rows[lesson]["headlines"]), flush=True)
        write_report(rows, crs)  # after every lesson, so a long run keeps what it finished
    print(f"wrote {REPORT_MD.relative_to(ROOT)} and {len(wanted)} executed lesson(s)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main(sys.argv[1:]))
