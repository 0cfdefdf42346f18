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

On Serve's Python proxy started without `FORWARDED_ALLOW_IPS=` (`serve run` typed by hand),
the proxy's uvicorn has already replaced the ASGI client with the header's last untrusted hop
before the request reaches the ingress (Ray 2.60 pickles that scope to the replica; the header
goes along unchanged). The ingress undoes it (:meth:`ClientAddress.peer`): when the request's
client is exactly what uvicorn would have taken from its `X-Forwarded-For` (host and port: a
real TCP peer has a port, a forwarded hop without one gets 0), the real peer was one of the
proxy's trusted addresses (`FORWARDED_ALLOW_IPS`, uvicorn's default 127.0.0.1 and ::1), and
the request is keyed on that address (127.0.0.1) rather than on the header: forged addresses
all share the loopback client's budget, and `rate_limit.trusted_proxies` alone decides whether
the header is believed, as on every other path.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import os
from collections.abc import Iterable, Sequence
from functools import lru_cache

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
            "client's X-Forwarded-For as its address; the ingress undoes that for rate limits (such "
            "requests count as the proxy's peer, 127.0.0.1, unless rate_limit.trusted_proxies lists it), "
            "but Serve's own logs show the forged address: start Ray with FORWARDED_ALLOW_IPS= "
            "(`make run` and the KubeRay manifests do)"
        )
    return logging.INFO, line


# uvicorn's default when FORWARDED_ALLOW_IPS is unset (uvicorn.config.Config)
UVICORN_DEFAULT_FORWARDED_ALLOW_IPS = "127.0.0.1,::1"


def _uvicorn_pick(trusted: str, forwarded_for: str) -> tuple[str, int] | None:
    """The (host, port) uvicorn's ProxyHeadersMiddleware puts in the ASGI scope for this
    `X-Forwarded-For` when the peer is in `trusted` (FORWARDED_ALLOW_IPS); None for a header it
    would not use. uvicorn's own code, so both read the header the same way."""
    try:
        from uvicorn.middleware.proxy_headers import _TrustedHosts
    except ImportError:  # another uvicorn: its public behaviour, the last hop
        hop = forwarded_for.rsplit(",", 1)[-1].strip()
        return (hop, 0) if hop else None
    picked = _TrustedHosts(trusted).get_trusted_client_address(forwarded_for)
    host, port = (picked, 0) if isinstance(picked, str) else picked
    return (host, int(port)) if host else None


def _proxy_label(trusted: str) -> str:
    """The address a request rewritten by uvicorn is keyed on: the first address uvicorn trusts
    (127.0.0.1 by default), or the setting itself when it names networks or `*`."""
    for entry in trusted.split(","):
        ip = _ip(entry)
        if ip is not None:
            return str(ip)
    return trusted.strip()


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
        inherited = disable_uvicorn_forwarding()
        _log_now(*startup_report(inherited_forwarding=inherited))
        self = cls(
            fast_path_enabled(),
            secret=proxy_secret() if fast_path_enabled() else None,
            # what Serve's proxy (same cluster environment) trusts; its default even where the
            # cluster emptied it (a request it did not rewrite is not mistaken for one: the port)
            uvicorn_forwarding=inherited or UVICORN_DEFAULT_FORWARDED_ALLOW_IPS,
        )
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

    def __init__(
        self,
        fast_path: bool,
        cluster_addresses: Iterable[str] = (),
        secret: str | None = None,
        uvicorn_forwarding: str = "",
    ):
        """`uvicorn_forwarding`: the FORWARDED_ALLOW_IPS of Serve's Python proxy ("": none, the
        proxy does not rewrite client addresses)."""
        self.fast_path = fast_path
        self._uvicorn_trusted = uvicorn_forwarding.strip()
        self._proxy_label = _proxy_label(self._uvicorn_trusted) if self._uvicorn_trusted else ""
        self._warned_rewrite = False
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

    def peer(
        self,
        tcp_peer: str | None,
        headers: dict[str, str],
        port: int | None = None,
        forwarded_for: str | None = None,
    ) -> str | None:
        """The client's address as the first hop in front of the service saw it. `port`: the
        ASGI client's port; `forwarded_for`: every `X-Forwarded-For` line, joined."""
        if not self.fast_path:
            return self._python_proxy_peer(tcp_peer, port, forwarded_for)
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

    def _python_proxy_peer(self, client: str | None, port: int | None, forwarded_for: str | None) -> str | None:
        """Serve's Python proxy: uvicorn replaced the client with the header's pick when the
        client is exactly that pick, port included; the real peer was then one of the addresses
        uvicorn trusts, and the request is keyed on it (see the module)."""
        if not (self._uvicorn_trusted and forwarded_for and client is not None and port is not None):
            return client
        picked = _uvicorn_pick(self._uvicorn_trusted, forwarded_for)
        if picked is None or picked != (client, port):
            return client
        if not self._warned_rewrite:
            self._warned_rewrite = True
            _log_now(
                logging.WARNING,
                f"Serve's proxy replaced a client's address with its X-Forwarded-For (FORWARDED_ALLOW_IPS="
                f"{self._uvicorn_trusted!r}): such requests are keyed on {self._proxy_label}, the proxy's "
                "trusted peer; list it in rate_limit.trusted_proxies to believe a local proxy's header, "
                "or start Ray with FORWARDED_ALLOW_IPS= (`make run` does)",
            )
        return self._proxy_label

    def _from_haproxy(self, tcp_peer: str | None, headers: dict[str, str]) -> bool:
        """The request came through our HAProxy: from a Ray node, carrying the secret (compared
        in constant time)."""
        if self._secret is None or not self._from_cluster(tcp_peer):
            return False
        sent = headers.get(_SECRET_HEADER)
        return sent is not None and hmac.compare_digest(sent.strip().encode(), self._secret)


# --------------------------------------------------------------------------- rate-limit keys


@lru_cache(maxsize=256)
def parse_network(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(entry.strip(), strict=False)
    except ValueError:
        raise ValueError(f"trusted proxy {entry!r} is not an IP address or CIDR") from None


@lru_cache(maxsize=64)
def _networks(entries: tuple[str, ...]) -> tuple:
    return tuple(parse_network(e) for e in entries)


def _normalize_addr(raw: str | None) -> tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address | None]:
    """(canonical text, parsed address or None) for a peer / X-Forwarded-For hop."""
    s = (raw or "").strip().strip('"').strip()
    if not s:
        return "unknown", None
    host = s
    if host.startswith("["):  # "[v6]" or "[v6]:port"
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:  # "v4:port"
        host = host.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return s.lower()[:64], None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), ip


def _trusted(ip, nets) -> bool:
    return ip is not None and any(ip.version == n.version and ip in n for n in nets)


def hash_api_key(api_key: str) -> str:
    """Stable, non-reversible id of an API key (raw keys are never stored or logged)."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:32]


def client_key(
    api_key: str | None, client_host: str | None, forwarded_for: str | None, trusted_proxies: Sequence[str] = ()
) -> str:
    """The rate-limit key of a request.

    * ``key:<sha256 prefix>`` when an API key was presented (one budget per key, whatever the
      address);
    * else ``ip:<address>`` of the client. ``X-Forwarded-For`` is honoured only when the direct
      peer is a trusted proxy: its hops are read right to left, skipping trusted proxies, and
      the first untrusted hop is the client (a client cannot spoof its way past the proxy
      that appended its real address). When every hop is trusted, the left-most is used.
    """
    if api_key:
        return "key:" + hash_api_key(api_key)
    text, ip = _normalize_addr(client_host)
    nets = _networks(tuple(trusted_proxies)) if trusted_proxies else ()
    if forwarded_for and nets and _trusted(ip, nets):
        hops = [h for h in (p.strip() for p in forwarded_for.split(",")) if h]
        chosen = None
        for hop in reversed(hops):
            hop_text, hop_ip = _normalize_addr(hop)
            if not _trusted(hop_ip, nets):
                chosen = hop_text
                break
        if chosen is None and hops:
            chosen = _normalize_addr(hops[0])[0]
        if chosen:
            text = chosen
    return "ip:" + text
