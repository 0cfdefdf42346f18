"""Supervising local server processes, for the tools and the tests: a free loopback port, a
process started in its own session with its output in a log file, waiting until it is ready
(an HTTP health URL, a log line), and stopping it and whatever it spawned, by pid: SIGTERM,
a grace period, then SIGKILL. Nothing is ever looked up or signalled by name.

Used by cluster/local_cluster.py (`ray start` nodes), the benchmark's servers
(scripts/bench/servers.py), scripts/soak.py, cluster/autoscale_demo.py and the tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import ClassVar

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
# Ray's and Serve's default ports (GCS, Serve HTTP, dashboard, Ray client, dashboard agent):
# never handed out, so nothing started here collides with a default-configured Ray.
AVOID_PORTS = frozenset({6379, 8000, 8265, 10001, 52365})


# Ray's worker processes listen on 10002-19999 (`min_worker_port`, `max_worker_port`).
RAY_WORKER_PORTS = range(10002, 20000)


def ephemeral_ports() -> range:
    """The kernel's ephemeral range: the local ports of outgoing connections and of every
    listener that binds port 0 (Ray's raylets, agents and gRPC servers among them)."""
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        lo, hi = 32768, 60999  # Linux's default
    return range(lo, hi + 1)


def free_port(host: str = HOST) -> int:
    """A port nobody listens on now, never one of `AVOID_PORTS`, outside Ray's worker ports and,
    where the kernel leaves room, below its ephemeral range: the server it is for may bind it
    minutes later (`make run` starts a cluster first), and a port the kernel handed out once is
    one it hands out again to any process's connection or port-0 listener meanwhile (seen:
    `make run`'s HAProxy could not bind its port, taken by then). Picked at random, so that
    concurrent callers (the test workers) do not pick the same one."""
    import random
    import socket

    # Below the ephemeral range only: above it, Ray's nodes pick their own ports at random
    # (`Node._get_unused_port`: between a kernel-chosen port and 65535).
    span = range(max(RAY_WORKER_PORTS.stop, 1024), ephemeral_ports().start)
    rng = random.SystemRandom()
    for _ in range(200 if len(span) >= 1000 else 0):
        port = rng.choice(span)
        if port in AVOID_PORTS:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        return port
    while True:  # no room outside the ephemeral range: the kernel's choice
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in AVOID_PORTS:
            return port


# ----------------------------------------------------------------------------- pids


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, session id) of every live (non-zombie) process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields: state ppid pgrp session ...
        if fields[0] != "Z":
            table[int(entry.name)] = (int(fields[1]), int(fields[3]))
    return table


def session_processes(sids: set[int]) -> set[int]:
    """Every process of these sessions (a process started with `start_new_session` leads one;
    its descendants stay in it, e.g. Ray's workers, which make their own process groups) and
    any descendant that left it."""
    table = proc_table()
    found = {pid for pid, (_, sid) in table.items() if sid in sids}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    todo = list(found)
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


def signal_pids(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


KILL_WAIT_S = 10.0  # SIGKILL is delivered when the process next runs: a loaded machine takes a while


def terminate(find: Callable[[], Iterable[int]], grace_s: float, poll_s: float = 0.5) -> int:
    """SIGTERM every pid `find()` returns; wait up to `grace_s` until they (and whatever `find()`
    still returns) are gone; SIGKILL what is left, and wait (up to `KILL_WAIT_S`) until the killed
    are gone too, so that a caller that returns has nothing left running. Returns the number of
    processes killed."""
    pids = set(find())
    if not pids:
        return 0
    signal_pids(pids, signal.SIGTERM)

    def left() -> set[int]:
        return {p for p in pids if pid_alive(p)} | set(find())

    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and left():
        time.sleep(poll_s)
    killed: set[int] = set()
    for pid in left():
        try:
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + KILL_WAIT_S
    while time.monotonic() < deadline and any(pid_alive(p) for p in killed):
        time.sleep(0.05)
    return len(killed)


def kill_sessions(sids: set[int], grace_s: float) -> int:
    """`terminate` every process of these sessions."""
    return terminate(lambda: session_processes(sids), grace_s, poll_s=0.3)


# ----------------------------------------------------------------------------- starting


def die_with_parent() -> None:
    """Child preexec: get SIGTERM when the process that started it dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def sigint_default() -> None:
    """Child preexec: SIGINT's default action back. A shell starts background jobs (`&`, nohup,
    CI runners) with SIGINT ignored and children inherit it; the service is stopped with SIGINT
    (Ctrl-C, Serve's graceful shutdown), which it would then never see."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _child_setup(orphan_dies: bool) -> None:
    sigint_default()
    if orphan_dies:
        die_with_parent()


def spawn(
    argv: list[str], log_path: Path, env: dict[str, str], cwd: Path = REPO, orphan_dies: bool = False
) -> subprocess.Popen:
    """`argv` in a new session (its pid is also its session and process group id), stdout and
    stderr appended to `log_path`, no stdin, SIGINT's default action restored (it stops on the
    SIGINT it is sent even when started from a background job). `orphan_dies`: SIGTERM when this
    process dies."""
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            argv,
            env=env,
            cwd=str(cwd),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=lambda: _child_setup(orphan_dies),
        )


def log_tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ----------------------------------------------------------------------------- waiting


def wait_until(
    ready: Callable[[], bool], timeout_s: float, interval_s: float = 1.0, died: Callable[[], None] | None = None
) -> float | None:
    """Poll `ready()` every `interval_s` until it is true: the seconds waited; None after
    `timeout_s`. `died()` is called after each miss and raises when the process waited for is
    gone (no point waiting longer)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if ready():
            return time.monotonic() - t0
        if died is not None:
            died()
        time.sleep(interval_s)
    return None


def wait_http(url: str, timeout_s: float, died: Callable[[], None] | None = None, interval_s: float = 1.0) -> float:
    """GET `url` until it answers 200; the seconds waited. TimeoutError after `timeout_s`."""
    import urllib.error
    import urllib.request

    last = ""

    def ready() -> bool:
        nonlocal last
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                if resp.status == 200:
                    return True
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except Exception as exc:
            last = repr(exc)
        return False

    waited = wait_until(ready, timeout_s, interval_s, died)
    if waited is None:
        raise TimeoutError(f"{url} not ready after {timeout_s:.0f}s (last: {last})")
    return waited


# ----------------------------------------------------------------------------- a server


class ManagedProcess:
    """A server started here (`spawn`, dying with us) whose every descendant is tracked by pid
    (and creation time), and, with `marker_env`, found at the end by that variable's value in
    its environment too (daemons that were reparented). `stop` ends all of them."""

    registry: ClassVar[list[ManagedProcess]] = []

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        log_path: Path,
        cwd: Path = REPO,
        marker_env: str | None = None,
    ):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.marker_env = marker_env
        self.marker = env.get(marker_env, "") if marker_env else ""
        self.proc = spawn(argv, log_path, env, cwd, orphan_dies=True)
        self.known: dict[int, float] = {}
        self._stop_tracking = threading.Event()
        self._tracker = threading.Thread(target=self._track_loop, daemon=True)
        self._tracker.start()
        ManagedProcess.registry.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def track(self) -> None:
        try:
            import psutil

            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                try:
                    self.known.setdefault(p.pid, p.create_time())
                except psutil.Error:
                    pass
        except Exception:
            pass

    def _track_loop(self) -> None:
        while not self._stop_tracking.wait(2.0):
            if not self.alive():
                break
            self.track()

    def log_tail(self, n: int = 40) -> str:
        return log_tail(self.log_path, n)

    def check_running(self) -> None:
        """RuntimeError (with the log's tail) when the process has exited."""
        if not self.alive():
            raise RuntimeError(
                f"{self.name} exited with {self.proc.returncode} while starting; log tail:\n{self.log_tail()}"
            )

    def wait_http(self, url: str, timeout_s: float) -> float:
        """`wait_http`, failing early if this process dies meanwhile."""
        return wait_http(url, timeout_s, died=self.check_running)

    def stop(self, grace_s: float = 45.0) -> None:
        """SIGTERM, wait, SIGKILL; then every tracked descendant and every process carrying the
        marker that is still alive, by pid."""
        self.track()
        self._stop_tracking.set()
        if self.alive():
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        terminate(self._leftovers, grace_s=10)
        if self in ManagedProcess.registry:
            ManagedProcess.registry.remove(self)

    def _leftovers(self) -> list[int]:
        try:
            import psutil
        except ImportError:
            return []
        alive = []
        for pid, created in list(self.known.items()):
            try:
                p = psutil.Process(pid)
                if abs(p.create_time() - created) < 0.01 and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.Error:
                pass
        if self.marker:  # reparented daemons: find them by the marker in their environment
            for p in psutil.process_iter(["pid"]):
                if p.pid in alive or p.pid == os.getpid():
                    continue
                try:
                    if p.environ().get(self.marker_env) == self.marker and p.status() != psutil.STATUS_ZOMBIE:
                        alive.append(p.pid)
                except psutil.Error:
                    pass
        return alive
