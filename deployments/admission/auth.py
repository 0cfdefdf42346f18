"""Optional API-key authentication (`Authorization: Bearer <key>`), off by default.

Keys come from an environment variable (comma/whitespace separated) and/or a file with one key
per line (`#` comments and blank lines ignored) — on Kubernetes, a Secret mounted as a file.
The file is re-read when it changes (Secret rotation), checked at most every
`reload_interval_s`. Keys are held only as SHA-256 digests and compared in constant time
(every stored digest is compared, no early exit).

    auth = ApiKeyAuth.from_config(cfg.auth.enabled, cfg.auth.env_var, cfg.auth.file)
    api_key = auth.check(request.headers.get("authorization"))   # raises APIError(401)

`check` returns the verified key, or None when auth is disabled. Use that value (not the raw
header) for per-key rate limiting: with auth off, clients send arbitrary keys (the OpenAI SDK
always sends one), and limiting by them would let a client dodge its limit by changing keys.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from pathlib import Path
from typing import Mapping

from pydantic import BaseModel, ConfigDict, Field

from deployments.api.errors import APIError

logger = logging.getLogger("ray.serve")

DEFAULT_ENV_VAR = "LLM_SERVE_API_KEYS"


class AuthConfig(BaseModel):
    """API-key authentication of the OpenAI endpoints."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Require `Authorization: Bearer <key>`; 401 when missing or wrong.")
    env_var: str | None = Field(
        DEFAULT_ENV_VAR, description="Environment variable holding keys, comma- or whitespace-separated."
    )
    file: str | None = Field(
        None,
        description="File with one key per line (`#` comments allowed), e.g. a mounted Kubernetes "
        "Secret; re-read when it changes.",
    )
    reload_interval_s: float = Field(
        30.0, ge=0, description="How often (at most) the key file is checked for changes; 0: every request."
    )
    public_paths: list[str] = Field(
        default_factory=lambda: ["/health"],
        description="Paths served without a key (liveness/readiness probes).",
    )


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def parse_keys(text: str, *, lines: bool = False) -> list[str]:
    """Keys in `text`: one per line for files (lines starting with `#` are comments), else
    comma/whitespace separated."""
    out: list[str] = []
    if lines:
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(line)
        return out
    for part in text.replace(",", " ").split():
        if part:
            out.append(part)
    return out


def unauthorized(message: str, code: str = "invalid_api_key") -> APIError:
    return APIError(401, message, code=code, headers={"WWW-Authenticate": 'Bearer realm="llm-serve"'})


class ApiKeyAuth:
    """Verifies bearer keys against the configured set."""

    def __init__(self, enabled: bool, keys: list[str] | None = None, *, file: str | None = None,
                 env_keys: list[str] | None = None, reload_interval_s: float = 30.0,
                 public_paths: list[str] | None = None):
        self.enabled = enabled
        self.file = file
        self.reload_interval_s = reload_interval_s
        self.public_paths = tuple(public_paths or ())
        self._static = [_digest(k) for k in (keys or [])] + [_digest(k) for k in (env_keys or [])]
        self._file_digests: list[bytes] = []
        self._file_stamp: tuple[float, int] | None = None
        self._next_check = 0.0
        if file:
            self._load_file(force=True)
        if enabled and not self._digests():
            raise ValueError(
                "API-key auth is enabled but no keys were found "
                f"(env var / file {file!r}); refusing to start with every request rejected")

    @classmethod
    def from_config(cls, enabled: bool | AuthConfig, env_var: str | None = DEFAULT_ENV_VAR,
                    file: str | None = None, *, env: Mapping[str, str] | None = None,
                    reload_interval_s: float = 30.0, public_paths: list[str] | None = None) -> "ApiKeyAuth":
        """From the config fields (or an `AuthConfig` as the first argument)."""
        if isinstance(enabled, AuthConfig):
            c = enabled
            enabled, env_var, file = c.enabled, c.env_var, c.file
            reload_interval_s, public_paths = c.reload_interval_s, c.public_paths
        env = os.environ if env is None else env
        env_keys = parse_keys(env.get(env_var, "")) if env_var else []
        return cls(bool(enabled), env_keys=env_keys, file=file, reload_interval_s=reload_interval_s,
                   public_paths=public_paths if public_paths is not None else ["/health"])

    # ------------------------------------------------------------------ keys

    def _digests(self) -> list[bytes]:
        return self._static + self._file_digests

    @property
    def num_keys(self) -> int:
        return len(set(self._digests()))

    def _load_file(self, force: bool = False) -> None:
        path = Path(self.file)  # type: ignore[arg-type]
        try:
            st = path.stat()
            stamp = (st.st_mtime, st.st_size)
            if not force and stamp == self._file_stamp:
                return
            keys = parse_keys(path.read_text(encoding="utf-8"), lines=True)
        except OSError as exc:
            if force:
                raise ValueError(f"API key file {self.file!r} cannot be read: {exc}") from None
            logger.warning("API key file %s unreadable (%s); keeping the previous keys", self.file, exc)
            return
        self._file_digests = [_digest(k) for k in keys]
        if self._file_stamp is not None:
            logger.info("API key file %s reloaded: %d keys", self.file, len(keys))
        self._file_stamp = stamp

    def _maybe_reload(self) -> None:
        if not self.file:
            return
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self.reload_interval_s
            self._load_file()

    # ------------------------------------------------------------------ checks

    def verify(self, key: str) -> bool:
        """Constant-time membership: every stored digest is compared."""
        cand = _digest(key)
        found = 0
        for d in self._digests():
            found |= hmac.compare_digest(cand, d)
        return bool(found)

    def check(self, authorization: str | None) -> str | None:
        """The verified key from an `Authorization` header value; None when auth is disabled.

        Raises `APIError(401)` (OpenAI `authentication_error`, `WWW-Authenticate: Bearer`) when
        the header is missing, not a bearer token, or the key is unknown.
        """
        if not self.enabled:
            return None
        self._maybe_reload()
        if not authorization or not authorization.strip():
            raise unauthorized(
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
                code="missing_api_key")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise unauthorized("Malformed Authorization header: expected `Bearer <key>`.",
                               code="invalid_authorization_header")
        if not self.verify(token):
            raise unauthorized("Incorrect API key provided.")
        return token
