"""The session app's configuration (conftest.app_args) on its own local Ray cluster, started
with the environment that turns Ray Serve's tracing on (tests/test_tracing.py starts it as a
subprocess: Serve's tracing is per cluster, read by its proxy and replicas when they start).
Prints READY when healthy; SIGTERM shuts Serve and the cluster down.

    RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH=deployments.observability.tracing:otlp_span_processors \
    RAY_SERVE_TRACING_SAMPLING_RATIO=1 OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=http://…/v1/traces \
    python tests/tracing_app.py HTTP_PORT
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path


def main(port: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import ray
    from conftest import app_args, wait_healthy
    from ray import serve

    from serve_app import build_app

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        overrides = json.loads(os.environ.get("TRACING_APP_OVERRIDES") or "{}")
        serve.run(build_app(app_args(**overrides)), name="llm", route_prefix="/", blocking=False)
        wait_healthy(f"http://127.0.0.1:{port}")
        print("SESSION", ray._private.worker._global_node.get_session_dir_path(), flush=True)
        print("READY", flush=True)
        stop.wait()
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]))
