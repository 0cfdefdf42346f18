"""`make run`'s launcher (`cluster/run.py`): when `serve run` ends, what it started and left
running is stopped, by pid; SIGTERM reaches the child as SIGINT. A stand-in command plays
`serve run` (the real one: `tests/test_fast_path.py`'s `make run` fixture)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cluster.processes import pid_alive

REPO = Path(__file__).resolve().parents[1]


def _launch(tmp_path: Path, body: str, sigint_ignored: bool = False) -> subprocess.Popen:
    script = tmp_path / "serve_run.py"
    script.write_text(textwrap.dedent(body))
    code = (
        "import sys, cluster.run as r; r.LEFTOVER_GRACE_S = 1.0; r.TERM_GRACE_S = 2.0; "
        f"sys.exit(r.run([sys.executable, {str(script)!r}, {str(tmp_path)!r}]))"
    )
    # a shell's background job starts with SIGINT ignored (`make run &`, nohup, CI runners)
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        start_new_session=True,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ignore,
    )


def test_leftovers_of_an_exited_serve_run_are_stopped(tmp_path):
    """The stand-in starts a process in its own session that ignores SIGTERM (as a stuck
    worker would) and exits at once: the launcher stops it (SIGTERM, then SIGKILL) and says so."""
    proc = _launch(
        tmp_path,
        """
        import subprocess, sys
        from pathlib import Path
        w = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"],
                             start_new_session=True)
        Path(sys.argv[1], "worker.pid").write_text(str(w.pid))
        sys.exit(3)
    """,
    )
    _, err = proc.communicate(timeout=60)
    worker = int((tmp_path / "worker.pid").read_text())
    assert proc.returncode == 3  # serve run's status
    assert not pid_alive(worker), f"the orphan is still running; the launcher said: {err}"
    assert "stopped 1 process" in err, err


@pytest.mark.parametrize("sigint_ignored", [False, True])
def test_sigterm_is_passed_on_as_sigint_and_nothing_is_left(tmp_path, sigint_ignored):
    """Also when the launcher itself was started with SIGINT ignored (a background job): the
    child gets SIGINT's default back, so Serve's graceful stop runs."""
    proc = _launch(
        tmp_path,
        """
        import signal, sys, time
        from pathlib import Path
        got = []
        Path(sys.argv[1], "initial").write_text(repr(signal.getsignal(signal.SIGINT)))
        signal.signal(signal.SIGINT, lambda s, f: got.append(s))
        Path(sys.argv[1], "ready").write_text("1")
        while not got:
            time.sleep(0.05)
        Path(sys.argv[1], "got").write_text(str(got[0]))
    """,
        sigint_ignored,
    )
    deadline = time.monotonic() + 30
    while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and (tmp_path / "got").read_text() == str(int(signal.SIGINT)), err
    # Python installed its KeyboardInterrupt handler: SIGINT was not inherited as ignored
    assert "default_int_handler" in (tmp_path / "initial").read_text()
    assert "stopped" not in err
