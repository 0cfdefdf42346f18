"""The service config as an application is built: the YAML `args`, then the environment —
the replaced service's variables, `RATE_LIMIT_PER_MINUTE`/`_HOUR`, and any
`LLM_SERVE__<SECTION>__<FIELD>` (`load_config`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

from deployments.config import ServiceConfig, deep_merge

ENV_PREFIX = "LLM_SERVE__"

# The replaced service's container variables → the field each sets (below LLM_SERVE__ variables,
# above the YAML `args`). VLLM_PORT is Serve's HTTP port (`http_options.port` in the Serve config
# file), not an application setting; TENSOR_PARALLEL_SIZE has no equivalent (one GPU per replica).
LEGACY_ENV = {
    "VLLM_MODEL": ("model", "model_source"),
    "MODEL_NAME": ("model", "model_id"),
    "MAX_MODEL_LEN": ("engine", "max_model_len"),
    "GPU_MEMORY_UTILIZATION": ("engine", "gpu_memory_utilization"),
}
# The rate limiter's overrides (0 turns the window off), at the same level: read here, where the
# app is built, like every other variable; the replicas use the config they are given.
RATE_LIMIT_ENV = {
    "RATE_LIMIT_PER_MINUTE": ("rate_limit", "per_minute"),
    "RATE_LIMIT_PER_HOUR": ("rate_limit", "per_hour"),
}


def load_config(args: dict[str, Any] | None, environ: Mapping[str, str] | None = None) -> ServiceConfig:
    """The application's config: the YAML `args`, then the replaced service's variables
    (`LEGACY_ENV`) and `RATE_LIMIT_PER_MINUTE`/`_HOUR`, then any `LLM_SERVE__<SECTION>__<FIELD>` variable (e.g.
    `LLM_SERVE__LIMITS__MAX_TOKENS_CAP=1024`, `LLM_SERVE__LORA__ADAPTERS='{"a": "/path"}'`: JSON
    for lists and maps), read by pydantic-settings. Read once, where the application is built;
    the deployments get the result. A variable naming no field, or a value its field refuses, is
    an error at start naming the variable."""
    environ = os.environ if environ is None else environ
    env: Mapping[str, str] = environ  # as the settings class below reads it
    ours = {k: v for k, v in environ.items() if k.upper().startswith(ENV_PREFIX)}
    for key in ours:
        section = key[len(ENV_PREFIX) :].split("__", 1)[0].lower()
        if section not in ServiceConfig.model_fields:
            raise ValueError(
                f"environment variable {key}: {section!r} is not a config section or field "
                f"(one of {sorted(ServiceConfig.model_fields)})"
            )
    legacy: dict[str, Any] = {}
    for name, (section, field) in {**LEGACY_ENV, **RATE_LIMIT_ENV}.items():
        if environ.get(name, "").strip():
            legacy.setdefault(section, {})[field] = environ[name].strip()

    class Settings(ServiceConfig, BaseSettings):
        model_config = SettingsConfigDict(
            env_prefix=ENV_PREFIX,
            env_nested_delimiter="__",
            extra="forbid",
            protected_namespaces=(),
            case_sensitive=False,
        )

        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (_EnvironSource(settings_cls, env), init_settings)  # the environment wins

    try:
        settings = Settings(**deep_merge(args or {}, legacy))
    except ValidationError as exc:
        names = [
            f"{ENV_PREFIX}{'__'.join(str(p).upper() for p in e['loc'])}" if e["loc"] else "the configuration"
            for e in exc.errors()
        ]
        legacy_used = [n for n in {**LEGACY_ENV, **RATE_LIMIT_ENV} if environ.get(n)]
        hint = f" (set by the environment: {sorted(set(ours) | set(legacy_used))})" if ours or legacy_used else ""
        raise ValueError(
            f"invalid configuration{hint}: {exc.error_count()} problem(s), e.g. "
            f"{names[0]}: {exc.errors()[0]['msg']}\n{exc}"
        ) from None
    return ServiceConfig.model_validate(settings.model_dump())


class _EnvironSource(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping (the process's environment by
    default; a test's dict)."""

    def __init__(self, settings_cls, environ: Mapping[str, str]):
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self):
        return parse_env_vars(self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)
