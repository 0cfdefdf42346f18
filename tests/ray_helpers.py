"""A local Ray for actor tests that need no Serve app.

`ray_local` reuses a cluster that is already up (the conftest's session `ray_cluster`, when
an earlier module started it), else starts a small one (`address="local"`, 2 CPUs). A
cluster it started is handed on to the next module that uses `ray_local` when no test in
between needs the conftest's cluster, and stopped otherwise (and at the end), so the test
modules of this kind share one start-up.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

_state = {"ours": False}


def _keep_for_next_module(request) -> bool:
    """True when the next test that needs Ray after this module uses `ray_local` again."""
    items = request.session.items
    module = request.node  # the module (fixture scope)
    last = max((i for i, it in enumerate(items) if it.module is getattr(module, "obj", None)), default=None)
    if last is None:
        return False
    for it in items[last + 1 :]:
        names = getattr(it, "fixturenames", ())
        if "ray_local" in names:
            return True
        if "ray_cluster" in names:
            return False
    return False


@pytest.fixture(scope="module")
def ray_local(request) -> Iterator[None]:
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}},
        )
        _state["ours"] = True
    yield
    if _state["ours"] and not _keep_for_next_module(request):
        _state["ours"] = False
        ray.shutdown()
