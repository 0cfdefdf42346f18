"""The servers a benchmark starts: vLLM's OpenAI server and our Serve app (in a child process
running its own local Ray cluster), with the same model and engine arguments; each one in its
own session, stopped with everything it spawned (cluster/processes.py)."""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cluster.haproxy_wrapper import read_env_file as _read_env_file
from cluster.processes import ManagedProcess, free_port
from deployments.config import ServiceConfig, deep_merge
from deployments.engine import server_flags
from scripts.bench.common import CHILD_READY, ENTRY, REPO, RUN_MARKER_ENV


def load_serve_yaml(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(Path(path).read_text())


def service_args(
    serve_yaml: dict[str, Any],
    model_path: str,
    served_name: str | None,
    max_ongoing: int,
    max_queued: int,
    gpu_mem_util: float | None,
    override: dict[str, Any] | None,
    fixed_replicas: bool = True,
) -> dict[str, Any]:
    """Our app's ServiceConfig for one benchmark configuration: the config file's args with the
    model, the replica's capacity and the benchmark's overrides merged in.

    `fixed_replicas`: every deployment with an `autoscaling_config` gets a fixed replica count
    instead (its initial/min replicas; the model deployment exactly 1), so one engine is compared
    with one engine and no replica starts in the middle of a measurement."""
    app = (serve_yaml.get("applications") or [{}])[0]
    args = copy.deepcopy(app.get("args") or {})
    model = args.setdefault("model", {})
    model["model_source"] = str(Path(model_path).resolve()) if not Path(model_path).is_absolute() else model_path
    model.pop("tokenizer_source", None)
    model["model_id"] = served_name or model.get("model_id") or Path(model_path).name
    dep = args.setdefault("deployments", {}).setdefault("model", {})
    dep["max_ongoing_requests"] = max_ongoing
    dep["max_queued_requests"] = max_queued
    if fixed_replicas:
        for opts in args["deployments"].values():
            auto = opts.get("autoscaling_config")
            if auto:
                opts["num_replicas"] = int(auto.get("initial_replicas") or auto.get("min_replicas") or 1)
                opts["autoscaling_config"] = None  # deep-merged: None switches the class default off
        dep["num_replicas"] = 1
        if "autoscaling_config" in dep:
            dep["autoscaling_config"] = None
    if gpu_mem_util is not None:
        args.setdefault("engine", {})["gpu_memory_utilization"] = gpu_mem_util
    return deep_merge(args, override or {})


def read_env_file(path: Path | None) -> dict[str, str]:
    """KEY=VALUE lines of an env file (blank lines and # comments skipped)."""
    if path is None:
        return {}
    if not path.is_file():
        raise SystemExit(f"--ours-env-file: no such file: {path}")
    try:
        return _read_env_file(path)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def engine_kwargs_for(args: dict[str, Any], on_cpu: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """The engine kwargs and env our model replica would use (deployments/engine), so vLLM's
    server gets exactly the same engine arguments."""
    from deployments.engine import cpu_engine_env, engine_kwargs

    cfg = ServiceConfig.model_validate(args)
    env = dict(cfg.engine_env)
    if on_cpu:
        from serve_app import app_options

        num_cpus = app_options(cfg)["model"]["ray_actor_options"].get("num_cpus")
        env = {**cpu_engine_env(cfg, num_cpus), **env}
    return engine_kwargs(cfg, on_cpu), env


# store_true flags of vLLM's CLI that have no --no- form: False is their default.
_VLLM_STORE_TRUE = {"disable_log_stats"}


def vllm_cli_args(kwargs: dict[str, Any]) -> list[str]:
    """AsyncEngineArgs kwargs -> `python -m vllm.entrypoints.openai.api_server` flags."""
    out: list[str] = []
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            if value:
                out.append(flag)
            elif key not in _VLLM_STORE_TRUE:
                out.append("--no-" + key.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        elif isinstance(value, dict):
            out += [flag, json.dumps(value)]
        else:
            out += [flag, str(value)]
    return out


def thread_binding(paths: Iterable[Path]) -> list[str]:
    """vLLM's CPU thread-binding log lines ("core ids=...", "reserved_cpus=...") in these logs."""
    found: list[str] = []
    for path in paths:
        try:
            with open(path, errors="replace") as f:
                for line in f:
                    if "core ids=" in line or "reserved_cpus=" in line or "VLLM_CPU_OMP_THREADS_BIND=" in line:
                        text = line.strip().split("] ", 1)[-1].strip()
                        if text not in found:
                            found.append(text)
        except OSError:
            pass
    return found


def detect_on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def stop_all() -> None:
    """Every server this process started and has not stopped yet."""
    for mp in list(reversed(ManagedProcess.registry)):
        print(f"[bench] stopping {mp.name} (pid {mp.pid})", file=sys.stderr, flush=True)
        try:
            mp.stop()
        except Exception as exc:  # keep stopping the others
            print(f"[bench] stopping {mp.name} failed: {exc!r}", file=sys.stderr)


class Servers:
    """Starts/stops the two servers of a comparison; one of each at a time."""

    def __init__(self, opts: argparse.Namespace, out_dir: Path, run_id: str):
        self.opts = opts
        self.out_dir = out_dir
        self.run_id = run_id
        self.serve_yaml = load_serve_yaml(opts.serve_config)
        self.on_cpu: bool | None = None
        self.vllm: ManagedProcess | None = None
        self.vllm_url: str | None = None
        self.ours: ManagedProcess | None = None
        self.ours_url: str | None = None
        self.ours_key: tuple[int, int] | None = None
        self.info: dict[str, Any] = {"vllm": None, "ours": []}
        self._ray_tmp: list[str] = []
        self._n = 0

    def _base_env(self, name: str) -> dict[str, str]:
        self._n += 1
        env = dict(os.environ)
        env.update(
            {
                RUN_MARKER_ENV: f"{self.run_id}-{name}-{self._n}",  # finds this server's processes at the end
                "RAY_AUTH_MODE": "disabled",  # throwaway local cluster on loopback
                "RAY_USAGE_STATS_ENABLED": "0",
                "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.pop("RAY_ADDRESS", None)  # never attach to someone else's cluster
        return env

    def _start(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> ManagedProcess:
        return ManagedProcess(name, argv, env, log, cwd=REPO, marker_env=RUN_MARKER_ENV)

    def args_for(self, max_ongoing: int, max_queued: int) -> dict[str, Any]:
        name = getattr(self.opts, "served_model_name_resolved", None) or self.opts.served_model_name
        return service_args(
            self.serve_yaml,
            self.opts.model,
            name,
            max_ongoing,
            max_queued,
            self.opts.gpu_memory_utilization,
            self.opts.serve_override,
            fixed_replicas=not self.opts.keep_autoscaling,
        )

    def cpu(self) -> bool:
        if self.on_cpu is None:
            self.on_cpu = detect_on_cpu()
        return self.on_cpu

    # -------------------------------------------------------------- vLLM's server

    def start_vllm(self) -> str:
        if self.vllm is not None and self.vllm.alive():
            assert self.vllm_url is not None  # set with self.vllm
            return self.vllm_url
        args = self.args_for(self.opts.max_ongoing[0], -1)
        kwargs, engine_env = engine_kwargs_for(args, self.cpu())
        port = free_port()
        argv = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *vllm_cli_args(kwargs),
            *server_flags(ServiceConfig.model_validate(args)),
            *shlex.split(self.opts.vllm_args or ""),
        ]
        env = self._base_env("vllm")
        env.update(engine_env)
        env.update(self.opts.vllm_env)
        log = self.out_dir / "vllm_server.log"
        print(
            f"[bench] starting vLLM's server on 127.0.0.1:{port}: {shlex.join(argv[1:])}", file=sys.stderr, flush=True
        )
        self.vllm = self._start("vllm-server", argv, env, log)
        self.vllm_url = f"http://127.0.0.1:{port}"
        waited = self.vllm.wait_http(self.vllm_url + "/health", self.opts.startup_timeout)
        print(f"[bench] vLLM's server ready in {waited:.0f}s (pid {self.vllm.pid})", file=sys.stderr, flush=True)
        self.info["vllm"] = {
            "argv": argv[1:],
            "env": {k: env[k] for k in sorted({*engine_env, *self.opts.vllm_env})},
            "engine_kwargs": kwargs,
            "startup_s": waited,
            "log": log.name,
        }
        return self.vllm_url

    def stop_vllm(self) -> None:
        if self.vllm is not None:
            print(f"[bench] stopping vLLM's server (pid {self.vllm.pid})", file=sys.stderr, flush=True)
            self.vllm.stop()
            if self.info.get("vllm"):
                self.info["vllm"]["cpu_thread_binding"] = thread_binding([self.vllm.log_path])
            self.vllm = None

    # -------------------------------------------------------------- our Serve app

    def start_ours(self, max_ongoing: int, max_queued: int) -> str:
        key = (max_ongoing, max_queued)
        if self.ours is not None and self.ours.alive() and self.ours_key == key:
            return self.ours_url  # type: ignore[return-value]
        self.stop_ours()
        args = self.args_for(max_ongoing, max_queued)
        port = free_port()
        ray_tmp = tempfile.mkdtemp(prefix="rb_", dir="/tmp")  # short: Ray's socket paths
        self._ray_tmp.append(ray_tmp)
        http = dict(self.serve_yaml.get("http_options") or {})
        http.update({"host": "127.0.0.1", "port": port})
        app = (self.serve_yaml.get("applications") or [{}])[0]
        env = self._base_env("ours")
        # Our service's rate limiter is off for benchmarks (honoured when implemented).
        env.update({"RATE_LIMIT_PER_MINUTE": "0", "RATE_LIMIT_PER_HOUR": "0"})
        env.update(self.opts.ours_env)
        runtime_env_vars = {
            k: env[k]
            for k in (
                "RAY_AUTH_MODE",
                "VLLM_NO_USAGE_STATS",
                "RATE_LIMIT_PER_MINUTE",
                "RATE_LIMIT_PER_HOUR",
                RUN_MARKER_ENV,
            )
        }
        runtime_env_vars.update(self.opts.ours_env)
        spec = {
            "args": args,
            "http_options": http,
            "proxy_location": self.serve_yaml.get("proxy_location", "EveryNode"),
            "app_name": app.get("name", "llm"),
            "route_prefix": app.get("route_prefix", "/"),
            "num_cpus": self.opts.ray_num_cpus,
            "ray_temp_dir": ray_tmp,
            "runtime_env_vars": runtime_env_vars,
        }
        spec_path = self.out_dir / f"ours_mo{max_ongoing}_mq{max_queued}.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        log = self.out_dir / f"ours_mo{max_ongoing}_mq{max_queued}.log"
        argv = [sys.executable, str(ENTRY), "--_serve-child", str(spec_path)]
        print(
            f"[bench] starting our Serve app on 127.0.0.1:{port} (max_ongoing_requests={max_ongoing}, "
            f"max_queued_requests={max_queued}, Ray temp dir {ray_tmp})",
            file=sys.stderr,
            flush=True,
        )
        self.ours = self._start("serve-app", argv, env, log)
        self.ours_url = f"http://127.0.0.1:{port}"
        self.ours_key = key
        waited = self.ours.wait_http(self.ours_url + "/health", self.opts.startup_timeout)
        print(f"[bench] our Serve app ready in {waited:.0f}s (pid {self.ours.pid})", file=sys.stderr, flush=True)
        self.info["ours"].append(
            {
                "max_ongoing_requests": max_ongoing,
                "max_queued_requests": max_queued,
                "service_config": args,
                "http_options": http,
                "startup_s": waited,
                "env": {k: env[k] for k in ("RATE_LIMIT_PER_MINUTE", "RATE_LIMIT_PER_HOUR")},
                "log": log.name,
            }
        )
        return self.ours_url

    def stop_ours(self) -> None:
        if self.ours is not None:
            print(f"[bench] stopping our Serve app (pid {self.ours.pid})", file=sys.stderr, flush=True)
            self.ours.stop(grace_s=60)
            if self.info["ours"] and self._ray_tmp:
                logs = Path(self._ray_tmp[-1]).glob("session_*/logs/**/*")
                self.info["ours"][-1]["cpu_thread_binding"] = thread_binding(
                    p for p in logs if p.suffix in (".out", ".err", ".log") and p.is_file()
                )
            self.ours = None
            self.ours_key = None

    def stop(self) -> None:
        try:
            self.stop_ours()
        finally:
            self.stop_vllm()
            for d in self._ray_tmp:
                shutil.rmtree(d, ignore_errors=True)


def serve_child(spec_path: str) -> int:
    """Runs in the child process: a fresh local Ray cluster (never an existing one), Serve on the
    given loopback port, our app; shuts all of it down on SIGTERM/SIGINT or when orphaned."""
    spec = json.loads(Path(spec_path).read_text())
    os.chdir(REPO)
    stop = threading.Event()
    parent = os.getppid()
    import ray
    from ray import serve

    ray.init(
        address="local",
        num_cpus=spec["num_cpus"],
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=spec["ray_temp_dir"],
        runtime_env={"env_vars": spec["runtime_env_vars"]},
    )
    # After ray.init, which installs its own (fatal) SIGTERM handler: shut down cleanly instead.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(proxy_location=spec["proxy_location"], http_options=spec["http_options"])
        from serve_app import build_app

        serve.run(build_app(spec["args"]), name=spec["app_name"], route_prefix=spec["route_prefix"], blocking=False)
        print(CHILD_READY, flush=True)
        while not stop.wait(1.0):
            if os.getppid() != parent:  # the benchmark died: don't outlive it
                break
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0
