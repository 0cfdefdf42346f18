"""`make run`'s launcher: `serve run <config> [serve run options]` in the foreground and, once it
has ended, nothing it started left running.

`serve run` starts a local Ray cluster (GCS, raylet, dashboard, workers, Serve's HAProxy) and
stops it when it ends. On Ctrl-C the terminal signals the whole foreground group (`serve run`,
the GCS, the raylet) at once, and when the machine is busy `serve run` can finish before Ray's
own shutdown has stopped its workers: the Serve replicas, the engine and HAProxy (each in its own
process group) were seen still running minutes later. So this launcher:

* runs `serve run` as its child, in the terminal's process group (Ctrl-C reaches it directly),
  with SIGINT's default restored (a shell starts background jobs with SIGINT ignored, and
  Python then installs no KeyboardInterrupt handler); SIGTERM (a service manager,
  `kill <pid>`) is passed on as SIGINT, Serve's graceful stop, and as SIGTERM if `serve run` is
  still there `STOP_GRACE_S` later;
* becomes a child subreaper (Linux): whatever `serve run` started and left behind becomes the
  launcher's orphan instead of init's; elsewhere it remembers the descendants it saw;
* after `serve run` has exited, gives what is left `LEFTOVER_GRACE_S` to end by itself, then
  SIGTERM, then SIGKILL — by pid, each checked against the start time it was seen with — and
  says how many it stopped. It exits with `serve run`'s status.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cluster.processes import terminate

LEFTOVER_GRACE_S = 15.0
TERM_GRACE_S = 10.0
STOP_GRACE_S = 60.0


def become_subreaper() -> bool:
    """Orphaned descendants re-parent to this process (Linux `PR_SET_CHILD_SUBREAPER`)."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0
    except Exception:
        return False


def descendants() -> dict[int, float]:
    """This process's descendants: pid → start time (to tell a reused pid apart)."""
    import psutil

    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            out[p.pid] = p.create_time()
        except psutil.Error:
            pass
    return out


def alive(seen: dict[int, float]) -> dict[int, float]:
    """Those of `seen` still running as the same process (not a zombie)."""
    import psutil

    out = {}
    for pid, started in seen.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE:
                out[pid] = started
        except psutil.Error:
            pass
    return out


def reap() -> None:
    """Collect exited orphans (as a subreaper they are our children)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def stop_leftovers(seen: dict[int, float]) -> int:
    """Wait for what `serve run` left to end by itself, then `processes.terminate` it (SIGTERM,
    then SIGKILL). Returns how many processes had to be signalled."""

    def left() -> dict[int, float]:
        reap()
        return alive({**seen, **descendants()})

    deadline = time.monotonic() + LEFTOVER_GRACE_S
    while (rest := left()) and time.monotonic() < deadline:
        time.sleep(0.5)
    if rest:
        terminate(lambda: left().keys(), TERM_GRACE_S, poll_s=0.3)
    return len(rest)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    return run([str(Path(sys.executable).parent / "serve"), "run", *args])


def run(command: list[str]) -> int:
    """`command` in the foreground, then its leftovers stopped (see the module)."""
    become_subreaper()
    child = subprocess.Popen(command, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    stop_by: list[float] = []

    def on_term(signum, frame):
        try:
            child.send_signal(signal.SIGINT)
        except ProcessLookupError:
            pass
        stop_by.append(time.monotonic() + STOP_GRACE_S)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, lambda signum, frame: None)  # the terminal signalled `serve run` too
    seen: dict[int, float] = {}
    while True:
        try:
            rc = child.wait(timeout=2)
            break
        except subprocess.TimeoutExpired:
            seen.update(descendants())
            if stop_by and time.monotonic() > stop_by[0]:
                child.terminate()
                stop_by[0] += STOP_GRACE_S
    stopped = stop_leftovers(seen)
    if stopped:
        print(
            f"make run: stopped {stopped} process(es) `serve run` left running (Ray's workers, the engine, HAProxy)",
            file=sys.stderr,
            flush=True,
        )
    return rc


if __name__ == "__main__":
    sys.exit(main())
