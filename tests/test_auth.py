"""Optional API-key auth: keys from an env var and/or a mounted file, constant-time checks,
401 OpenAI errors."""

from __future__ import annotations

import os

import pytest

from deployments.admission.auth import ApiKeyAuth, AuthConfig, parse_keys
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
    for header, code in ((None, "missing_api_key"), ("", "missing_api_key"), ("Bearer", "invalid_authorization_header"),
                         ("Basic c2stb25lOg==", "invalid_authorization_header"), ("Bearer sk-four", "invalid_api_key"),
                         ("Bearer sk-one2", "invalid_api_key"), ("Bearer SK-ONE", "invalid_api_key")):
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
