"""The address of the client that sent a request: decided here, in one place.

Three layers could each claim to know it:

* **uvicorn**, the HTTP server inside Serve (the Python proxy's and, on the fast path, each
  ingress replica's own), replaces the ASGI client with the last hop of a client-sent
  `X-Forwarded-For` whenever the TCP peer is in `FORWARDED_ALLOW_IPS` (127.0.0.1 and ::1 by
  default): any loopback client, or anything behind a proxy on the same host, could name any
  address and escape its rate limit. The ingress empties `FORWARDED_ALLOW_IPS` for its own
  server (:func:`disable_uvicorn_forwarding`); the launchers (`make run`, the KubeRay
  containers, `configs/fast-path.env`) empty it for the whole cluster, Serve's proxy included.
* **HAProxy** (the fast path) connects to the ingress from its own address, so every client
  would look alike. Our HAProxy binary (`haproxy_wrapper.py`) sets `X-LLM-Serve-Client-Addr`
  to the client's TCP address, replacing whatever a client sent. It is believed only on the
  fast path and only from a connection that comes from loopback or a Ray node's address.
* **`rate_limit.trusted_proxies`** (ours): `X-Forwarded-For` counts only when the peer found
  above is one of them (`rate_limit.client_key`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from typing import Iterable

CLIENT_ADDR_HEADER = "X-LLM-Serve-Client-Addr"
_HEADER = CLIENT_ADDR_HEADER.lower()
WRAPPER_NAME = "llm-serve-haproxy"

logger = logging.getLogger("ray.serve")


def fast_path_enabled(environ=os.environ) -> bool:
    """Serve's HAProxy direct ingress is on in this cluster (set for every Ray process)."""
    return environ.get("RAY_SERVE_ENABLE_HA_PROXY", "0") == "1"


def disable_uvicorn_forwarding(environ=os.environ) -> str | None:
    """Empty `FORWARDED_ALLOW_IPS` in this process (read when Serve starts the replica's own
    HTTP server, after the constructor); returns the value the cluster gave it."""
    inherited = environ.get("FORWARDED_ALLOW_IPS")
    environ["FORWARDED_ALLOW_IPS"] = ""
    return inherited


def startup_report(environ=os.environ, inherited_forwarding: str | None = None) -> tuple[int, str]:
    """(log level, the one line the ingress logs at start): which request path this cluster
    runs on, how to get the other, and what that means for client addresses."""
    if fast_path_enabled(environ):
        if os.path.basename(environ.get("RAY_SERVE_HAPROXY_BINARY_PATH", "")) != WRAPPER_NAME:
            return logging.WARNING, (
                "request path: Serve's fast path (HAProxy direct ingress), but HAProxy is not "
                f"{WRAPPER_NAME}: it does not pass client addresses, so all clients without an API "
                "key share one rate-limit budget. Set RAY_SERVE_HAPROXY_BINARY_PATH to "
                f"<venv>/bin/{WRAPPER_NAME} (`make run` does).")
        line = "request path: Serve's fast path (HAProxy direct ingress, configs/fast-path.env)"
    else:
        line = ("request path: Serve's Python proxy (RAY_SERVE_ENABLE_HA_PROXY unset); `make run` "
                "serves on the fast path, HAProxy straight to the ingress (configs/fast-path.env; "
                "less latency and CPU per request: docs/performance.md)")
    if inherited_forwarding != "":
        return logging.WARNING, line + (
            "; FORWARDED_ALLOW_IPS is not empty in this cluster, so Serve's proxy takes a loopback "
            "client's X-Forwarded-For as its address: start Ray with FORWARDED_ALLOW_IPS= "
            "(`make run` and the KubeRay manifests do)")
    return logging.INFO, line


def _log_now(level: int, line: str) -> None:
    """Log, and write it out now: Serve's throughput profile buffers replica logs in memory
    until 1,000 records or an error (RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE)."""
    logger.log(level, line)
    for handler in logger.handlers:
        handler.flush()


def _ip(text: str | None):
    try:
        ip = ipaddress.ip_address((text or "").strip())
    except ValueError:
        return None
    return ip.ipv4_mapped or ip if isinstance(ip, ipaddress.IPv6Address) else ip


def ray_node_addresses() -> list[str]:
    import ray

    return [n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")]


class ClientAddress:
    """Resolves a request's client address from its TCP peer and headers (see the module)."""

    REFRESH_S = 30.0

    @classmethod
    async def for_ingress_replica(cls) -> "ClientAddress":
        """In an ingress replica's constructor: uvicorn's forwarding off, the start line logged,
        and on the fast path the Ray nodes' addresses, kept current in the background."""
        _log_now(*startup_report(inherited_forwarding=disable_uvicorn_forwarding()))
        self = cls(fast_path_enabled())
        if self.fast_path:
            self.update_cluster(await asyncio.to_thread(ray_node_addresses))
            self._refresher = asyncio.get_running_loop().create_task(self._keep_current())
        return self

    async def _keep_current(self) -> None:
        while True:
            await asyncio.sleep(self.REFRESH_S)
            try:
                self.update_cluster(await asyncio.to_thread(ray_node_addresses))
            except Exception as exc:  # the GCS briefly away: keep the last list
                logger.warning("could not refresh the Ray nodes' addresses: %s", exc)

    def __init__(self, fast_path: bool, cluster_addresses: Iterable[str] = ()):
        self.fast_path = fast_path
        self._cluster: frozenset = frozenset()
        self._warned = False
        self._refresher: asyncio.Task | None = None
        self.update_cluster(cluster_addresses)

    def update_cluster(self, addresses: Iterable[str]) -> None:
        """The Ray nodes' addresses (where HAProxy and Serve's proxies run)."""
        self._cluster = frozenset(ip for ip in map(_ip, addresses) if ip is not None)

    def _from_cluster(self, peer: str | None) -> bool:
        ip = _ip(peer)
        return ip is not None and (ip.is_loopback or ip in self._cluster)

    def peer(self, tcp_peer: str | None, headers: dict[str, str]) -> str | None:
        """The client's address as the first hop in front of the service saw it."""
        if not self.fast_path:
            return tcp_peer
        value = headers.get(_HEADER)
        if value is None:
            if not self._warned and self._from_cluster(tcp_peer):
                self._warned = True
                _log_now(logging.WARNING, f"a request through HAProxy came without {CLIENT_ADDR_HEADER}: "
                         "clients share HAProxy's address for rate limits (is "
                         f"RAY_SERVE_HAPROXY_BINARY_PATH {WRAPPER_NAME}?)")
            return tcp_peer
        return value.strip() if self._from_cluster(tcp_peer) else tcp_peer
