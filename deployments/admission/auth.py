"""Optional API-key authentication (`Authorization: Bearer <key>`), off by default.

Keys come from an environment variable (comma/whitespace separated) and/or a file — on
Kubernetes, a Secret mounted as a file, re-read when it changes (Secret rotation), checked at
most every `reload_interval_s`. The file is either

* a plain key list, one key per line (`#` comments and blank lines ignored) — the format before
  tenants: every such key (and every key of the environment variable) is its own tenant with
  the role `auth.plain_keys_role` (default `client`) and the default budgets; or
* a YAML/JSON document with `keys:` (each key mapped to a tenant and a role) and optionally
  `tenants:` (each tenant's budgets and priority)::

      tenants:
        acme:  {priority: 1, requests_per_minute: 600, tokens_per_minute: 200000, max_concurrent: 8}
        ops:   {priority: 10}
      keys:
        - {key: sk-acme-1, tenant: acme}                     # role: client (the default)
        - {sha256: 5e88…, tenant: acme}                      # the key's SHA-256 hex instead
        - {key: sk-ops-admin, tenant: ops, role: admin}

Keys are held only as SHA-256 digests and compared in constant time (every stored digest is
compared, no early exit, whichever matches); they are never logged (log lines name the tenant
and a short digest prefix).

    auth = ApiKeyAuth.from_config(cfg.auth.enabled, cfg.auth.env_var, cfg.auth.file)
    api_key = auth.check(request.headers.get("authorization"))   # raises APIError(401)

`check` returns the verified key, or None when auth is disabled; `identify` returns the
key's `Identity` (tenant, role, budgets; a digest prefix, never the key). Use that value (not the raw
header) for per-key rate limiting: with auth off, clients send arbitrary keys (the OpenAI SDK
always sends one), and limiting by them would let a client dodge its limit by changing keys.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from deployments.admission.auth_config import DEFAULT_ADMIN_ENV_VAR, DEFAULT_ENV_VAR, ROLES, AuthConfig, Role
from deployments.api.errors import APIError

logger = logging.getLogger("ray.serve")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class TenantConfig(BaseModel):
    """One tenant of a structured keys file: its budgets (null: the service's default) and its
    admission priority."""

    model_config = ConfigDict(extra="forbid")

    priority: int = Field(
        0,
        ge=-1000,
        le=1000,
        description=(
            "Higher goes first under overload: the tenant's weight in the capacity gate's fair queue is "
            "priority + 1 (at least 1), and with `engine.scheduling_policy: priority` vLLM schedules its "
            "requests before lower tenants' (docs/security.md S17)."
        ),
    )
    requests_per_minute: int | None = Field(
        None, ge=0, description="Requests per moving minute; 0: no limit; null: `rate_limit.per_minute`."
    )
    requests_per_hour: int | None = Field(
        None, ge=0, description="Requests per moving hour; 0: no limit; null: `rate_limit.per_hour`."
    )
    tokens_per_minute: int | None = Field(
        None,
        ge=0,
        description="Prompt + completion tokens per moving minute; 0: no limit; null: `rate_limit.tokens_per_minute`.",
    )
    max_concurrent: int | None = Field(
        None, ge=0, description="Requests in flight at once; 0: no limit; null: `rate_limit.max_concurrent`."
    )


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str | None = Field(None, min_length=1)
    sha256: str | None = None
    tenant: str = Field(..., min_length=1)
    role: Role = "client"

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is not None:
            v = v.strip().lower()
            if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
                raise ValueError("sha256 must be 64 hex digits")
        return v


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenants: dict[str, TenantConfig] = Field(default_factory=dict)
    keys: list[KeyEntry]


@dataclass(frozen=True)
class Identity:
    """Who a verified key belongs to. `key_id` is a digest prefix (safe to log or use as a
    limiter key); the key itself is not kept."""

    tenant: str
    role: str
    key_id: str
    limits: TenantConfig | None = None  # None: the service's default budgets

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def priority(self) -> int:
        return self.limits.priority if self.limits is not None else 0


@dataclass(frozen=True)
class _Entry:
    digest: bytes
    tenant: str | None  # None: a plain key, its own tenant
    role: str
    limits: TenantConfig | None


def _plain_entries(keys: list[str], role: str) -> list[_Entry]:
    return [_Entry(_digest(k), None, role, None) for k in keys]


def parse_keys_document(text: str, plain_role: str = "client") -> tuple[list[_Entry], bool]:
    """(entries, structured) from a keys file's text: a YAML/JSON mapping with `keys:` is the
    tenant format; anything else is a plain key list. Raises ValueError naming the problem
    (never a key)."""
    import yaml

    doc: Any = None
    stripped = text.lstrip()
    if stripped.startswith(("{", "tenants:", "keys:")) or "\nkeys:" in text or "\ntenants:" in text:
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(
                f"keys file is not valid YAML/JSON (line {getattr(getattr(exc, 'problem_mark', None), 'line', '?')})"
            ) from None
    if not isinstance(doc, dict):
        return _plain_entries(parse_keys(text, lines=True), plain_role), False
    try:
        parsed = KeysFile.model_validate(doc)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        raise ValueError(f"keys file: {problems}") from None
    out = []
    for i, e in enumerate(parsed.keys):
        if (e.key is None) == (e.sha256 is None):
            raise ValueError(f"keys file: keys.{i}: give exactly one of `key` and `sha256`")
        limits = parsed.tenants.get(e.tenant)
        digest = _digest(e.key) if e.key is not None else bytes.fromhex(e.sha256)  # type: ignore[arg-type]
        out.append(_Entry(digest, e.tenant, e.role, limits))
    return out, True


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
    """Verifies bearer keys against the configured set and says whose they are."""

    def __init__(
        self,
        enabled: bool,
        keys: list[str] | None = None,
        *,
        file: str | None = None,
        env_keys: list[str] | None = None,
        reload_interval_s: float = 30.0,
        public_paths: list[str] | None = None,
        plain_keys_role: str = "client",
        admin_paths: list[str] | None = None,
        admin_keys: list[str] | None = None,
    ):
        self.enabled = enabled
        self.file = file
        self.reload_interval_s = reload_interval_s
        self.public_paths = tuple(public_paths or ())
        self.admin_paths = frozenset(
            admin_paths
            if admin_paths is not None
            else AuthConfig.model_fields["admin_paths"].get_default(call_default_factory=True)
        )
        if plain_keys_role not in ROLES:
            raise ValueError(f"plain_keys_role must be one of {ROLES}")
        self.plain_keys_role = plain_keys_role
        self._static = _plain_entries(list(keys or []) + list(env_keys or []), plain_keys_role)
        self._static += _plain_entries(list(admin_keys or []), "admin")
        self._file_entries: list[_Entry] = []
        self.file_structured = False
        self._file_stamp: tuple[float, int] | None = None
        self._next_check = 0.0
        if file:
            self._load_file(force=True)
        if enabled and not self._entries():
            raise ValueError(
                "API-key auth is enabled but no keys were found "
                f"(env var / file {file!r}); refusing to start with every request rejected"
            )

    @classmethod
    def from_config(
        cls,
        enabled: bool | AuthConfig,
        env_var: str | None = DEFAULT_ENV_VAR,
        file: str | None = None,
        *,
        env: Mapping[str, str] | None = None,
        reload_interval_s: float = 30.0,
        public_paths: list[str] | None = None,
    ) -> ApiKeyAuth:
        """From the config fields (or an `AuthConfig` as the first argument)."""
        plain_role, admin_paths = "client", None
        admin_var: str | None = DEFAULT_ADMIN_ENV_VAR
        if isinstance(enabled, AuthConfig):
            c = enabled
            enabled, env_var, file = c.enabled, c.env_var, c.file
            reload_interval_s, public_paths = c.reload_interval_s, c.public_paths
            plain_role, admin_paths, admin_var = c.plain_keys_role, c.admin_paths, c.admin_env_var
        env = os.environ if env is None else env
        env_keys = parse_keys(env.get(env_var, "")) if env_var else []
        admin_keys = parse_keys(env.get(admin_var, "")) if admin_var else []
        return cls(
            bool(enabled),
            env_keys=env_keys,
            file=file,
            reload_interval_s=reload_interval_s,
            public_paths=public_paths if public_paths is not None else ["/health"],
            plain_keys_role=plain_role,
            admin_paths=admin_paths,
            admin_keys=admin_keys,
        )

    # ------------------------------------------------------------------ keys

    def _entries(self) -> list[_Entry]:
        return self._static + self._file_entries

    def _digests(self) -> list[bytes]:
        return [e.digest for e in self._entries()]

    @property
    def num_keys(self) -> int:
        return len(set(self._digests()))

    @property
    def num_admin_keys(self) -> int:
        return len({e.digest for e in self._entries() if e.role == "admin"})

    @property
    def admin_routes_enabled(self) -> bool:
        """The admin routes are served (to admin keys) only once some admin key is configured."""
        return self.num_admin_keys > 0

    def startup_summary(self) -> tuple[int, str]:
        """(log level, line) for the ingress's start: key and tenant counts, and a warning
        when auth is on without any admin key (the admin routes then answer 403 to everyone)."""
        if not self.enabled:
            admin = ", ".join(sorted(self.admin_paths))
            if not self.num_admin_keys:
                return logging.INFO, (
                    f"auth off: client routes open; admin routes ({admin}) off: no admin key is "
                    f"configured (set {DEFAULT_ADMIN_ENV_VAR}, docs/security.md)"
                )
            return logging.INFO, f"auth off: client routes open; admin routes ({admin}) for admin keys only"
        tenants = {e.tenant for e in self._entries() if e.tenant is not None}
        line = (
            f"auth on: {self.num_keys} keys ({self.num_admin_keys} admin), "
            f"{len(tenants)} named tenants, keys file {'structured' if self.file_structured else 'plain'}"
        )
        if not self.num_admin_keys:
            return logging.WARNING, line + (
                "; no admin key, so " + ", ".join(sorted(self.admin_paths)) + " answer 403 to every key: "
                "add `{key: ..., tenant: ..., role: admin}` to the keys file (docs/security.md) or set "
                "auth.plain_keys_role: admin"
            )
        return logging.INFO, line

    def _load_file(self, force: bool = False) -> None:
        path = Path(self.file)  # type: ignore[arg-type]
        try:
            st = path.stat()
            stamp = (st.st_mtime, st.st_size)
            if not force and stamp == self._file_stamp:
                return
            entries, structured = parse_keys_document(path.read_text(encoding="utf-8"), self.plain_keys_role)
        except (OSError, ValueError) as exc:
            if force:
                raise ValueError(f"API key file {self.file!r} cannot be read: {exc}") from None
            logger.warning("API key file %s unusable (%s); keeping the previous keys", self.file, exc)
            return
        self._file_entries = entries
        self.file_structured = structured
        if self._file_stamp is not None:
            logger.info("API key file %s reloaded: %d keys", self.file, len(entries))
        self._file_stamp = stamp

    def _maybe_reload(self) -> None:
        if not self.file:
            return
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self.reload_interval_s
            self._load_file()

    # ------------------------------------------------------------------ checks

    def _lookup(self, key: str) -> _Entry | None:
        """Constant-time lookup: every stored digest is compared, whichever matches (the last
        match wins, so a file entry overrides a plain key with the same value)."""
        cand = _digest(key)
        found: _Entry | None = None
        for e in self._entries():
            if hmac.compare_digest(cand, e.digest):
                found = e
        return found

    def verify(self, key: str) -> bool:
        """Constant-time membership: every stored digest is compared."""
        return self._lookup(key) is not None

    def _token(self, authorization: str | None) -> str:
        if not authorization or not authorization.strip():
            raise unauthorized(
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.", code="missing_api_key"
            )
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise unauthorized(
                "Malformed Authorization header: expected `Bearer <key>`.", code="invalid_authorization_header"
            )
        return token

    def check(self, authorization: str | None) -> str | None:
        """The verified key from an `Authorization` header value; None when auth is disabled.

        Raises `APIError(401)` (OpenAI `authentication_error`, `WWW-Authenticate: Bearer`) when
        the header is missing, not a bearer token, or the key is unknown.
        """
        if not self.enabled:
            return None
        self._maybe_reload()
        token = self._token(authorization)
        if not self.verify(token):
            raise unauthorized("Incorrect API key provided.")
        return token

    def identify(self, authorization: str | None) -> Identity | None:
        """The key's `Identity`; None when auth is disabled. Raises `APIError(401)` as `check`."""
        if not self.enabled:
            return None
        self._maybe_reload()
        return self._identity(self._token(authorization))

    def _identity(self, token: str) -> Identity:
        entry = self._lookup(token)
        if entry is None:
            raise unauthorized("Incorrect API key provided.")
        key_id = entry.digest.hex()[:32]
        return Identity(
            tenant=entry.tenant if entry.tenant is not None else f"key:{key_id}",
            role=entry.role,
            key_id=key_id,
            limits=entry.limits,
        )

    def identify_quietly(self, authorization: str | None) -> Identity | None:
        """For public paths: the identity when a valid key came, else None (never raises). With
        auth off too: an admin key still shows `/health`'s details."""
        if not authorization:
            return None
        self._maybe_reload()
        try:
            return self._identity(self._token(authorization))
        except APIError:
            return None

    def admin_identity(self, authorization: str | None, path: str) -> Identity:
        """The admin key's identity for an admin route (`admin_paths`), with auth on or off: 403
        `admin_routes_disabled` while no admin key is configured, 401 without a (valid) key, 403
        `admin_key_required` for a client key."""
        self._maybe_reload()  # a keys file that gains an admin key turns the routes on
        if not self.num_admin_keys:
            raise admin_routes_disabled(path, self.enabled)
        ident = self._identity(self._token(authorization))
        self.require_admin(ident, path)
        return ident

    def require_admin(self, identity: Identity | None, path: str) -> None:
        """403 unless `identity` is an admin key's (with auth off too: an anonymous caller is no
        admin)."""
        if identity is not None and identity.is_admin:
            return
        if not self.num_admin_keys:
            raise admin_routes_disabled(path, self.enabled)
        if identity is None:
            raise unauthorized(f"{path} needs an admin API key: send it as `Authorization: Bearer <key>`.")
        raise admin_required(f"{path} needs an admin API key; this key's role is client.")


def admin_required(message: str) -> APIError:
    return APIError(403, message, code="admin_key_required")


def admin_routes_disabled(path: str, auth_enabled: bool) -> APIError:
    """The admin routes while no admin key is configured: off, with how to turn them on."""
    keys = (
        "every key is a client key (plain key lists are clients, auth.plain_keys_role)"
        if auth_enabled
        else "auth is off, so no caller is known to be an admin"
    )
    return APIError(
        403,
        f"{path} is turned off: it changes the service and needs an admin API key, and none is "
        f"configured ({keys}). To turn it on, give the ingress an admin key — "
        f"`{DEFAULT_ADMIN_ENV_VAR}=<key>` (auth.admin_env_var), or "
        "`{key: <key>, tenant: <name>, role: admin}` in the keys file (auth.file) — and send "
        "`Authorization: Bearer <key>` (docs/security.md).",
        code="admin_routes_disabled",
    )
