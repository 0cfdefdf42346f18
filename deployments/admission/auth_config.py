"""The `auth` section of the service config: where API keys come from, which paths are public
and which change the service (admin). A leaf: the config imports it; `auth.py` implements it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_ENV_VAR = "LLM_SERVE_API_KEYS"
DEFAULT_ADMIN_ENV_VAR = "LLM_SERVE_ADMIN_KEYS"

Role = Literal["client", "admin"]
ROLES = ("client", "admin")


class AuthConfig(BaseModel):
    """API-key authentication of the OpenAI endpoints."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Require `Authorization: Bearer <key>`; 401 when missing or wrong.")
    env_var: str | None = Field(
        DEFAULT_ENV_VAR, description="Environment variable holding keys, comma- or whitespace-separated."
    )
    file: str | None = Field(
        None,
        description="Keys file, e.g. a mounted Kubernetes Secret; re-read when it changes. Either one "
        "key per line (`#` comments allowed; role `plain_keys_role`, each key its own tenant) or YAML "
        "with `keys:` (each `{key | sha256, tenant, role: client|admin}`) and `tenants:` (each "
        "tenant's `priority`, `requests_per_minute`, `requests_per_hour`, `tokens_per_minute`, "
        "`max_concurrent`); docs/security.md.",
    )
    reload_interval_s: float = Field(
        30.0, ge=0, description="How often (at most) the key file is checked for changes; 0: every request."
    )
    public_paths: list[str] = Field(
        default_factory=lambda: ["/health"],
        description="Paths served without a key (liveness/readiness probes). `/health` answers "
        "the status (and the replaced service's `gpu` and `limits`) to anyone, its details only "
        "to an admin key.",
    )
    plain_keys_role: Role = Field(
        "client",
        description="Role of keys given without one: the environment variable's and a plain "
        "one-key-per-line file's. `client` (default): admin routes need a key with `role: admin` "
        "in a structured keys file; `admin`: the pre-tenant behaviour, every key may use them.",
    )
    admin_paths: list[str] = Field(
        default_factory=lambda: ["/v1/load_lora_adapter", "/v1/unload_lora_adapter"],
        description="Paths that change the service. With auth on or off they are off (403 "
        "`admin_routes_disabled`) until an admin key is configured (`admin_env_var`, `role: admin` "
        "in `file`, or `plain_keys_role: admin`); then they need one (401 without a key, 403 "
        "`admin_key_required` for a client key).",
    )
    admin_env_var: str | None = Field(
        DEFAULT_ADMIN_ENV_VAR,
        description="Environment variable holding admin keys, comma- or whitespace-separated: each "
        "may use `admin_paths` and see `/health`'s details, whether `enabled` is on or off (each its "
        "own tenant). The simplest way to turn the admin routes on for `make run`.",
    )
