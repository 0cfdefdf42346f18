"""Optional API-key auth: keys from an env var and/or a mounted file, constant-time checks,
401 OpenAI errors."""

from __future__ import annotations

import os

import pytest
from fastapi import Request

from deployments.admission.auth import ApiKeyAuth, parse_keys
from deployments.admission.auth_config import AuthConfig
from deployments.api.errors import APIError


def test_disabled_by_default_accepts_anything_and_returns_no_key():
    auth = ApiKeyAuth.from_config(AuthConfig(), env={})
    assert not auth.enabled
    assert auth.check(None) is None
    assert auth.check("Bearer whatever") is None  # not usable as a rate-limit identity


def test_env_keys_right_wrong_missing():
    auth = ApiKeyAuth.from_config(True, "MY_KEYS", None, env={"MY_KEYS": "sk-one, sk-two\nsk-three"})
    assert auth.num_keys == 3
    assert auth.check("Bearer sk-two") == "sk-two"
    assert auth.check("bearer   sk-three ") == "sk-three"
    for header, code in (
        (None, "missing_api_key"),
        ("", "missing_api_key"),
        ("Bearer", "invalid_authorization_header"),
        ("Basic c2stb25lOg==", "invalid_authorization_header"),
        ("Bearer sk-four", "invalid_api_key"),
        ("Bearer sk-one2", "invalid_api_key"),
        ("Bearer SK-ONE", "invalid_api_key"),
    ):
        with pytest.raises(APIError) as ei:
            auth.check(header)
        err = ei.value
        assert err.status == 401 and err.code == code, header
        assert err.headers["WWW-Authenticate"].startswith("Bearer")
        body = err.body()["error"]
        assert body["type"] == "authentication_error" and body["message"]
        assert "sk-one" not in body["message"] and "sk-four" not in body["message"]


def test_file_keys_with_comments_and_rotation(tmp_path):
    f = tmp_path / "api-keys"
    f.write_text("# team A\nsk-file-a\n\n  sk-file-b  \n")
    auth = ApiKeyAuth.from_config(AuthConfig(enabled=True, file=str(f), env_var=None, reload_interval_s=0))
    assert auth.check("Bearer sk-file-a") == "sk-file-a" and auth.check("Bearer sk-file-b") == "sk-file-b"
    with pytest.raises(APIError):
        auth.check("Bearer # team A")
    # Secret rotated: the mounted file changes, the next check sees it.
    f.write_text("sk-file-c\n")
    st = f.stat()
    os.utime(f, (st.st_atime, st.st_mtime + 5))
    assert auth.check("Bearer sk-file-c") == "sk-file-c"
    with pytest.raises(APIError):
        auth.check("Bearer sk-file-a")
    # An unreadable file later keeps the last good keys.
    f.unlink()
    assert auth.check("Bearer sk-file-c") == "sk-file-c"


def test_env_and_file_combine(tmp_path):
    f = tmp_path / "keys"
    f.write_text("sk-from-file\n")
    auth = ApiKeyAuth.from_config(True, "K", str(f), env={"K": "sk-from-env"})
    assert auth.check("Bearer sk-from-file") and auth.check("Bearer sk-from-env")


def test_enabled_without_keys_fails_at_start(tmp_path):
    with pytest.raises(ValueError, match="no keys"):
        ApiKeyAuth.from_config(True, "EMPTY", None, env={"EMPTY": " , "})
    with pytest.raises(ValueError, match="cannot be read"):
        ApiKeyAuth.from_config(True, None, str(tmp_path / "missing"))


def test_keys_are_not_held_in_clear():
    auth = ApiKeyAuth(True, ["sk-secret-value"])
    assert "sk-secret-value" not in repr(vars(auth))


def test_compare_examines_every_key(monkeypatch):
    """No early exit: every stored digest is compared, whether the key is first, last or absent."""
    import deployments.admission.auth as auth_mod

    keys = [f"sk-{i:04d}" for i in range(50)]
    auth = ApiKeyAuth(True, keys)
    calls = []
    real = auth_mod.hmac.compare_digest

    def counting(a, b):
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(auth_mod.hmac, "compare_digest", counting)
    for candidate, expected in ((keys[0], True), (keys[-1], True), ("sk-none", False)):
        calls.clear()
        assert auth.verify(candidate) is expected
        assert len(calls) == 50


def test_public_paths_and_parse_keys():
    auth = ApiKeyAuth.from_config(AuthConfig(enabled=False))
    assert "/health" in auth.public_paths and "/v1/completions" not in auth.public_paths
    assert parse_keys("a,b  c\n d") == ["a", "b", "c", "d"]
    assert parse_keys("# c\n a \n\n#d\nb", lines=True) == ["a", "b"]
    assert all(f.description for f in AuthConfig.model_fields.values())


# --------------------------------------------------------------------------- tenants and roles (issue 18)

from deployments.admission.auth import Identity, parse_keys_document  # noqa: E402

KEYS_DOC = """
tenants:
  acme: {priority: 1, requests_per_minute: 5, tokens_per_minute: 1000, max_concurrent: 2}
  ops: {priority: 10}
keys:
  - {key: sk-acme-1, tenant: acme}
  - {key: sk-acme-2, tenant: acme, role: client}
  - {sha256: %s, tenant: ops, role: admin}
  - {key: sk-loose, tenant: nobody}
"""


def _doc() -> str:
    import hashlib

    return KEYS_DOC % hashlib.sha256(b"sk-ops-admin").hexdigest()


def test_structured_keys_file_tenants_roles_limits(tmp_path):
    f = tmp_path / "keys.yaml"
    f.write_text(_doc())
    auth = ApiKeyAuth.from_config(AuthConfig(enabled=True, file=str(f), env_var=None))
    assert auth.file_structured and auth.num_keys == 4 and auth.num_admin_keys == 1
    a1, a2 = auth.identify("Bearer sk-acme-1"), auth.identify("Bearer sk-acme-2")
    assert (a1.tenant, a1.role, a1.is_admin, a1.priority) == ("acme", "client", False, 1)
    assert a1.limits.requests_per_minute == 5 and a1.limits.tokens_per_minute == 1000
    assert a2.tenant == "acme" and a1.key_id != a2.key_id
    ops = auth.identify("Bearer sk-ops-admin")  # listed by its SHA-256 only
    assert ops.is_admin and ops.tenant == "ops" and ops.priority == 10
    loose = auth.identify("Bearer sk-loose")
    assert loose.tenant == "nobody" and loose.limits is None  # the default budgets
    assert auth.check("Bearer sk-acme-1") == "sk-acme-1"  # the old API still answers
    with pytest.raises(APIError) as ei:
        auth.identify("Bearer sk-acme-3")
    assert ei.value.status == 401
    # keys are never held in clear, nor in identities
    assert "sk-acme-1" not in repr(vars(auth)) and "sk-acme-1" not in repr(a1)


def test_admin_guard_403_and_message():
    import hashlib

    from deployments.admission.auth import _Entry

    plain = ApiKeyAuth(True, ["sk-plain"])  # a plain key list: clients
    ident = plain.identify("Bearer sk-plain")
    assert ident.role == "client" and ident.tenant.startswith("key:")
    with pytest.raises(APIError) as ei:
        plain.require_admin(ident, "/v1/load_lora_adapter")
    err = ei.value
    # the upgrade case: no admin key at all -> the admin routes are off, and the message says how
    # to turn them on
    assert err.status == 403 and err.code == "admin_routes_disabled"
    body = err.body()["error"]
    assert body["type"] == "permission_error"
    assert "none is configured" in body["message"] and "role: admin" in body["message"]
    assert "LLM_SERVE_ADMIN_KEYS" in body["message"] and "sk-plain" not in body["message"]
    level, line = plain.startup_summary()
    assert level >= 30 and "no admin key" in line and "sk-plain" not in line
    # plain_keys_role: admin restores the pre-tenant behaviour
    legacy = ApiKeyAuth.from_config(
        AuthConfig(enabled=True, plain_keys_role="admin", env_var="K"), env={"K": "sk-plain"}
    )
    legacy.require_admin(legacy.identify("Bearer sk-plain"), "/v1/load_lora_adapter")
    # an admin key beside the client keys: a client key gets admin_key_required
    mixed = ApiKeyAuth(True, ["sk-plain"], admin_keys=["sk-admin"])
    with pytest.raises(APIError) as ei:
        mixed.require_admin(mixed.identify("Bearer sk-plain"), "/v1/load_lora_adapter")
    assert (ei.value.status, ei.value.code) == (403, "admin_key_required")
    mixed.require_admin(mixed.identify("Bearer sk-admin"), "/v1/load_lora_adapter")
    assert isinstance(_Entry(hashlib.sha256(b"x").digest(), None, "client", None), _Entry)


def test_auth_off_admin_routes_are_off_until_an_admin_key_is_configured():
    """Issue 24 (safe defaults): with auth off the admin routes are no longer open to everyone.
    Without an admin key they are off (403 `admin_routes_disabled`, saying how to turn them on);
    with one (`LLM_SERVE_ADMIN_KEYS`) they need it: 401 without a key or with a wrong one."""
    shipped = ApiKeyAuth.from_config(AuthConfig(), env={})  # the shipped config: auth off, no keys
    assert not shipped.enabled and not shipped.admin_routes_enabled
    for header in (None, "Bearer anything", "Bearer sk-plain"):
        with pytest.raises(APIError) as ei:
            shipped.admin_identity(header, "/v1/unload_lora_adapter")
        err = ei.value
        assert (err.status, err.code) == (403, "admin_routes_disabled")
        assert "LLM_SERVE_ADMIN_KEYS" in err.message and "auth is off" in err.message
    with pytest.raises(APIError) as ei:
        shipped.require_admin(None, "/v1/load_lora_adapter")  # an anonymous caller is no admin
    assert ei.value.code == "admin_routes_disabled"
    assert shipped.identify_quietly("Bearer anything") is None
    _, line = shipped.startup_summary()
    assert "admin routes" in line and "off" in line and "LLM_SERVE_ADMIN_KEYS" in line

    admin = ApiKeyAuth.from_config(AuthConfig(), env={"LLM_SERVE_ADMIN_KEYS": "sk-admin-1, sk-admin-2"})
    assert not admin.enabled and admin.admin_routes_enabled and admin.num_admin_keys == 2
    assert admin.check(None) is None and admin.identify(None) is None  # the client routes stay open
    for header, code in ((None, "missing_api_key"), ("Bearer wrong", "invalid_api_key")):
        with pytest.raises(APIError) as ei:
            admin.admin_identity(header, "/v1/unload_lora_adapter")
        assert (ei.value.status, ei.value.code) == (401, code)
    ident = admin.admin_identity("Bearer sk-admin-2", "/v1/unload_lora_adapter")
    assert ident.is_admin and "sk-admin-2" not in repr(ident)
    # /health's details follow the same rule: an admin key is known on the public path too
    assert admin.identify_quietly("Bearer sk-admin-1").is_admin
    assert admin.identify_quietly("Bearer wrong") is None and admin.identify_quietly(None) is None
    # a structured keys file with `role: admin` turns them on as well (auth off)
    assert ApiKeyAuth.from_config(AuthConfig(admin_env_var=None), env={"LLM_SERVE_ADMIN_KEYS": "x"}).num_admin_keys == 0


def test_auth_off_admin_key_from_a_rotated_keys_file(tmp_path):
    """A keys file that gains an admin key turns the admin routes on without a restart."""
    f = tmp_path / "keys"
    f.write_text("# no keys yet\n")
    auth = ApiKeyAuth.from_config(AuthConfig(file=str(f), reload_interval_s=0), env={})
    with pytest.raises(APIError) as ei:
        auth.admin_identity("Bearer sk-ops", "/v1/load_lora_adapter")
    assert ei.value.code == "admin_routes_disabled"
    f.write_text("keys:\n  - {key: sk-ops, tenant: ops, role: admin}\n  - {key: sk-client, tenant: a}\n")
    st = f.stat()
    os.utime(f, (st.st_atime, st.st_mtime + 5))
    assert auth.admin_identity("Bearer sk-ops", "/v1/load_lora_adapter").tenant == "ops"
    with pytest.raises(APIError) as ei:
        auth.admin_identity("Bearer sk-client", "/v1/load_lora_adapter")
    assert (ei.value.status, ei.value.code) == (403, "admin_key_required")


def _health_route(auth: ApiKeyAuth):
    from deployments.admission.middleware import is_admin

    def health(request: Request):  # what the ingress's /health decides: the details or not
        return {"details": is_admin(request.scope, auth)}

    return health


def test_the_middleware_refuses_admin_routes_with_the_shipped_config(monkeypatch):
    """In process, the ingress's admission middleware with configs/serve_config.yaml's `auth`
    (off, no keys): an anonymous unload is a 403 OpenAI error before the route runs; the client
    routes and /health stay open, /health without its details."""
    from pathlib import Path

    import yaml
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from deployments.admission.middleware import Admission, AdmissionMiddleware
    from deployments.admission.rate_limit import RateLimiter
    from deployments.config import ServiceConfig

    doc = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "serve_config.yaml").read_text())
    cfg = ServiceConfig.model_validate(next(a for a in doc["applications"] if a["name"] == "llm")["args"])
    ran = []
    for env in ({}, {"LLM_SERVE_ADMIN_KEYS": "sk-admin"}):
        for var in ("LLM_SERVE_API_KEYS", "LLM_SERVE_ADMIN_KEYS"):
            monkeypatch.delenv(var, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        auth = ApiKeyAuth.from_config(cfg.auth)
        app = FastAPI()
        app.add_middleware(AdmissionMiddleware)
        app.post("/v1/unload_lora_adapter")(lambda: ran.append(1) or {"ok": True})
        app.post("/v1/completions")(lambda: {"ok": True})
        app.get("/health")(_health_route(auth))
        app.state.admission = Admission(
            auth=auth,
            limiter=RateLimiter([]),
            trusted_proxies=[],
            max_request_bytes=1 << 20,
            public_paths=frozenset(auth.public_paths),
        )
        with TestClient(app) as http:
            r = http.post("/v1/unload_lora_adapter", json={"lora_name": "news-lora"})
            err = r.json()["error"]
            if not env:
                assert r.status_code == 403 and err["code"] == "admin_routes_disabled", r.text
                assert err["type"] == "permission_error" and "LLM_SERVE_ADMIN_KEYS" in err["message"]
            else:
                assert r.status_code == 401 and err["code"] == "missing_api_key", r.text
                ok = http.post(
                    "/v1/unload_lora_adapter", json={"lora_name": "x"}, headers={"Authorization": "Bearer sk-admin"}
                )
                assert ok.status_code == 200 and ran == [1]
            assert http.post("/v1/completions", json={}).status_code == 200  # client routes: open
            assert http.get("/health").json() == {"details": False}
            assert http.get("/health", headers={"Authorization": "Bearer sk-admin"}).json() == {"details": bool(env)}


def test_keys_file_errors_name_the_problem_not_the_key(tmp_path):
    for text, fragment in (
        ("keys:\n  - {key: sk-secret-zz, tenant: a, role: root}\n", "role"),
        ("keys:\n  - {key: sk-secret-zz}\n", "tenant"),
        ("keys:\n  - {key: sk-secret-zz, sha256: '" + "0" * 64 + "', tenant: a}\n", "exactly one"),
        ("tenants: {a: {tokens_per_minute: -1}}\nkeys: []\n", "tokens_per_minute"),
    ):
        with pytest.raises(ValueError) as ei:
            parse_keys_document(text)
        assert fragment in str(ei.value) and "sk-secret-zz" not in str(ei.value)
    # a plain list stays a plain list
    entries, structured = parse_keys_document("# comment\nsk-a\nsk-b\n")
    assert not structured and len(entries) == 2 and all(e.role == "client" for e in entries)
    # a broken rotation keeps the last good keys
    f = tmp_path / "keys"
    f.write_text(_doc())
    auth = ApiKeyAuth.from_config(AuthConfig(enabled=True, file=str(f), env_var=None, reload_interval_s=0))
    f.write_text("keys:\n  - {key: x, tenant: a, role: root}\n")
    st = f.stat()
    os.utime(f, (st.st_atime, st.st_mtime + 5))
    assert auth.identify("Bearer sk-acme-1").tenant == "acme"


def test_identify_compares_every_key(monkeypatch):
    import deployments.admission.auth as auth_mod

    auth = ApiKeyAuth(True, [f"sk-{i:04d}" for i in range(20)])
    calls = []
    real = auth_mod.hmac.compare_digest
    monkeypatch.setattr(auth_mod.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    for key in ("sk-0000", "sk-0019"):
        calls.clear()
        assert isinstance(auth.identify(f"Bearer {key}"), Identity)
        assert len(calls) == 20
    calls.clear()
    assert auth.identify_quietly("Bearer nope") is None and len(calls) == 20
