"""Run untrusted code (a student's notebook) in a box: limits, another user, hidden folders, no leftovers.

The grader starts one worker process per submission with ``start(...)``. The box is built
in layers, each used where the machine allows it (``available()`` says which):

- **limits** (any POSIX): a new session (its own process group), and resource limits on
  CPU time, memory (address space), the size of any file written, and open files;
- **no leftovers** (Linux): the worker is a child subreaper, so a child that detaches
  (double fork, ``setsid``) still re-parents to it; afterwards ``kill_tree`` kills the
  process group, every new descendant of the grader, and every process of the sandbox user;
- **hidden folders, read-only system** (root with mount namespaces): the worker gets a private
  mount table in which the solutions, the hidden tests, the submissions and the grades are empty
  folders and every file but its scratch folder is read-only;
- **another user** (root, and a Python that other users can run): the worker then drops to
  ``SANDBOX_UID``, a user that owns nothing; else root drops every capability instead, so that
  it cannot undo the mounts or raise its limits.

A container (``docker`` / ``podman``) is stronger still: GRADING.md says how to use one.
"""
from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

NPROC = 512  # processes and threads of the sandbox user (torch starts a thread per core)
SANDBOX_UID = 64_999  # owns no file and no process on a normal machine; every process it has is ours to kill
PR_SET_CHILD_SUBREAPER = 36
CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 1 << 14, 1 << 18
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38
# The kernel's environment: these of the teacher's pass through (what the course reads), nothing else.
PASS_THROUGH = ("PATH", "LANG", "LC_ALL", "TZ", "NBLIB_DATA_DIR", "NBLIB_OFFLINE", "NBLIB_DEVICE", "NBLIB_CPU_GHZ",
                "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


@dataclass
class Limits:
    cpu_s: float          # CPU seconds, per process
    memory_mb: int        # address space, per process
    file_mb: int          # largest file a process may write
    wall_s: float         # the whole submission, enforced by the parent with SIGKILL


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _works(code: str, **kwargs) -> bool:
    """Whether ``code`` runs without an error in a throwaway Python (with this module importable)."""
    setup = f"import sys, pathlib; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); import sandbox\n"
    try:
        return subprocess.run([sys.executable, "-c", setup + code], capture_output=True, cwd="/", **kwargs).returncode == 0
    except OSError:  # cannot even start it
        return False


def available() -> dict[str, bool]:
    """Which protections this machine allows: the grader prints the ones that are off. Each is tried
    in a throwaway process: containers forbid some, and a Python installed under /root cannot be
    run by another user."""
    linux = sys.platform.startswith("linux")
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    mounts = user = False
    if linux and root:
        with tempfile.TemporaryDirectory() as scratch:
            mounts = _works(f"d = pathlib.Path({scratch!r}); sandbox.lock_down(d, []); sandbox.drop_privileges(d, False)")
        user = _works("import nbclient, ipykernel",
                      preexec_fn=lambda: (os.setgroups([]), os.setgid(SANDBOX_UID), os.setuid(SANDBOX_UID)))
    return {"limits": hasattr(resource, "RLIMIT_AS"), "no leftovers": linux, "another user": user,
            "hidden folders": mounts, "read-only system": mounts}


def set_limits(limits: Limits) -> None:
    """In the worker before it runs anything (inherited by the kernel and whatever it starts). The
    worker sets them itself: a ``preexec_fn`` is unsafe in a grader running several workers from threads."""
    mb = 1024 * 1024
    for which, value in ((resource.RLIMIT_CPU, int(limits.cpu_s)), (resource.RLIMIT_AS, limits.memory_mb * mb),
                         (resource.RLIMIT_FSIZE, limits.file_mb * mb), (resource.RLIMIT_NOFILE, 1024)):
        soft, hard = resource.getrlimit(which)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value))


def start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start the worker in its own session (it then calls ``set_limits``); its stdin and stdout are pipes."""
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=env, start_new_session=True)


def processes() -> dict[int, tuple[int, int]]:
    """{pid: (parent pid, real uid)} of every process (empty where there is no /proc)."""
    found = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        found[int(entry.name)] = (int(fields["PPid"]), int(fields["Uid"].split()[0]))
    return found


def descendants(pid: int, table: dict[int, tuple[int, int]] | None = None) -> set[int]:
    table, found, todo = processes() if table is None else table, set(), [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, _) in table.items():
            if ppid == parent and child not in found:
                found.add(child)
                todo.append(child)
    return found


def kill_tree(proc: subprocess.Popen, keep: set[int], spare=lambda: set()) -> int:
    """Kill the worker's process group, every descendant of ours not in ``keep``, every process of
    the sandbox user; reap what becomes our zombie. ``spare()`` names the other workers still running
    (``--jobs``): they and their descendants live on. Returns how many processes were killed."""
    killed = set()
    for _ in range(20):  # a process may fork while we kill: repeat until nothing is left
        table = processes()  # one snapshot: a process forked after it is found in the next round
        spared = set(keep)
        for pid in spare():
            spared |= {pid} | descendants(pid, table)
        targets = {p for p in descendants(os.getpid(), table) if p not in spared}
        targets |= {p for p, (_, uid) in table.items() if uid == SANDBOX_UID and p not in spared}
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        alive = set()
        for pid in targets:
            try:
                os.kill(pid, signal.SIGKILL)
                alive.add(pid)
            except ProcessLookupError:
                pass
        _reap(alive | killed)
        if not alive - killed and proc.poll() is not None:
            break
        killed |= alive
        time.sleep(0.05)
    return len(killed)


def _reap(pids: set[int]) -> None:
    """Collect those of ``pids`` that became our zombies (detached grandchildren re-parent to us when
    we are a subreaper). Only these: another worker's exit status is for its own Popen to read."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass  # not our child (it belonged to a process we killed, which was reaped there)


def become_subreaper() -> bool:
    """Orphaned descendants re-parent to this process instead of init, so they can be found."""
    if not sys.platform.startswith("linux"):
        return False
    return _libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def lock_down(scratch: Path, folders: list[Path]) -> None:
    """In a private mount table of this process (root only): cover each folder with an empty
    read-only one and make every file read-only except ``scratch``."""
    libc = _libc()

    def mount(source, target, fstype, flags, data=None):
        if libc.mount(source, str(target).encode(), fstype, flags, data) != 0:
            raise OSError(ctypes.get_errno(), f"mount {target}")

    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS) refused")
    # Private first: without it the empty folders would also cover the teacher's view.
    mount(b"none", "/", None, MS_REC | MS_PRIVATE)
    for folder in folders:
        if folder.is_dir():
            mount(b"tmpfs", folder, b"tmpfs", MS_RDONLY, b"size=4k")
    mount(str(scratch).encode(), scratch, None, MS_BIND)  # its own mount: stays writable
    mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY)  # this namespace's view only


def drop_privileges(scratch: Path, other_user: bool) -> None:
    """Root gives up what would let the kernel undo the box: to the sandbox user (which owns only
    ``scratch``) when it can run Python, else every capability (root without them cannot mount,
    raise its limits, or read another process's memory)."""
    libc = _libc()
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if other_user:
        os.chown(scratch, SANDBOX_UID, SANDBOX_UID)
        # counted per user, so only for a user of its own: it stops a fork bomb
        resource.setrlimit(resource.RLIMIT_NPROC, (NPROC, NPROC))
        os.setgroups([])
        os.setgid(SANDBOX_UID)
        os.setuid(SANDBOX_UID)  # clears every capability too
        return
    for cap in range(64):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # an exec would otherwise give root its capabilities back

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    if libc.capset(ctypes.byref(Header(0x20080522, 0)), (Data * 2)()) != 0:
        raise OSError(ctypes.get_errno(), "capset refused")


def kernel_env(scratch: Path, extra: dict[str, str]) -> dict[str, str]:
    """A small environment: a few of the teacher's variables, homes and caches inside ``scratch``."""
    env = {k: os.environ[k] for k in PASS_THROUGH if k in os.environ}
    home = str(scratch)
    env.update(HOME=home, TMPDIR=home, USER="student", LOGNAME="student", IPYTHONDIR=f"{home}/.ipython",
               JUPYTER_CONFIG_DIR=f"{home}/.jupyter", JUPYTER_DATA_DIR=f"{home}/.jupyter-data",
               JUPYTER_RUNTIME_DIR=f"{home}/.jupyter-runtime", MPLCONFIGDIR=f"{home}/.matplotlib",
               NBLIB_CACHE_DIR=f"{home}/.cache/nblib", HF_HOME=f"{home}/.cache/huggingface",
               PYTHONDONTWRITEBYTECODE="1")
    env.update(extra)
    return env
