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
  to the client's TCP address, replacing whatever a client sent, and `X-LLM-Serve-Proxy-Secret`
  to the cluster's shared secret (`LLM_SERVE_PROXY_SECRET`, set by the launchers for every Ray
  process). The address is believed only on the fast path, only from a connection that comes
  from loopback or a Ray node's address, and only with the secret: any other process on a Ray
  node can reach an ingress replica's own HTTP port and set the address header, but cannot know
  the secret. Without a secret the header is never believed (every client then shares HAProxy's
  address, and the ingress says so at start).
* **`rate_limit.trusted_proxies`** (ours): `X-Forwarded-For` counts only when the peer found
  above is one of them (`rate_limit.client_key`).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
from collections.abc import Iterable

CLIENT_ADDR_HEADER = "X-LLM-Serve-Client-Addr"
PROXY_SECRET_HEADER = "X-LLM-Serve-Proxy-Secret"
PROXY_SECRET_ENV = "LLM_SERVE_PROXY_SECRET"
_HEADER = CLIENT_ADDR_HEADER.lower()
_SECRET_HEADER = PROXY_SECRET_HEADER.lower()
WRAPPER_NAME = "llm-serve-haproxy"
# what HAProxy can carry in a quoted header value: letters, digits and URL-safe punctuation
SECRET_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~+/=")
SECRET_MIN_LEN = 32


def proxy_secret(environ=os.environ) -> str | None:
    """The cluster's HAProxy-to-ingress secret, or None when unset. Raises ValueError for a
    value that is too short or has characters HAProxy's configuration cannot carry as is."""
    value = environ.get(PROXY_SECRET_ENV, "").strip()
    if not value:
        return None
    if len(value) < SECRET_MIN_LEN or not set(value) <= SECRET_CHARS:
        raise ValueError(
            f"{PROXY_SECRET_ENV} must be at least {SECRET_MIN_LEN} characters of "
            "A-Z a-z 0-9 - _ . ~ + / = (e.g. `python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))'`)"
        )
    return value


def new_proxy_secret() -> str:
    import secrets

    return secrets.token_urlsafe(32)


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
                f"<venv>/bin/{WRAPPER_NAME} (`make run` does)."
            )
        if proxy_secret(environ) is None:
            return logging.WARNING, (
                f"request path: Serve's fast path, but {PROXY_SECRET_ENV} is not set in this cluster: "
                "HAProxy's client addresses cannot be told from a forged header, so they are ignored "
                "and all clients without an API key share one rate-limit budget. Set it for every Ray "
                "process (`make run` generates one; KubeRay: the Secret llm-serve-proxy)."
            )
        line = "request path: Serve's fast path (HAProxy direct ingress, configs/fast-path.env)"
    else:
        line = (
            "request path: Serve's Python proxy (RAY_SERVE_ENABLE_HA_PROXY unset); `make run` "
            "serves on the fast path, HAProxy straight to the ingress (configs/fast-path.env; "
            "less latency and CPU per request: docs/performance.md)"
        )
    if inherited_forwarding != "":
        return logging.WARNING, line + (
            "; FORWARDED_ALLOW_IPS is not empty in this cluster, so Serve's proxy takes a loopback "
            "client's X-Forwarded-For as its address: start Ray with FORWARDED_ALLOW_IPS= "
            "(`make run` and the KubeRay manifests do)"
        )
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
    async def for_ingress_replica(cls) -> ClientAddress:
        """In an ingress replica's constructor: uvicorn's forwarding off, the start line logged,
        and on the fast path the Ray nodes' addresses, kept current in the background."""
        _log_now(*startup_report(inherited_forwarding=disable_uvicorn_forwarding()))
        self = cls(fast_path_enabled(), secret=proxy_secret() if fast_path_enabled() else None)
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

    def __init__(self, fast_path: bool, cluster_addresses: Iterable[str] = (), secret: str | None = None):
        self.fast_path = fast_path
        self._secret = secret.encode() if secret else None
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
                _log_now(
                    logging.WARNING,
                    f"a request through HAProxy came without {CLIENT_ADDR_HEADER}: "
                    "clients share HAProxy's address for rate limits (is "
                    f"RAY_SERVE_HAPROXY_BINARY_PATH {WRAPPER_NAME}?)",
                )
            return tcp_peer
        return value.strip() if self._from_haproxy(tcp_peer, headers) else tcp_peer

    def _from_haproxy(self, tcp_peer: str | None, headers: dict[str, str]) -> bool:
        """The request came through our HAProxy: from a Ray node, carrying the secret (compared
        in constant time)."""
        if self._secret is None or not self._from_cluster(tcp_peer):
            return False
        sent = headers.get(_SECRET_HEADER)
        return sent is not None and hmac.compare_digest(sent.strip().encode(), self._secret)
