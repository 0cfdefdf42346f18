"""Soak (opt-in: `scripts/test.sh -m soak`): scripts/soak.py drives a fixed-rate load for 10
minutes against this module's own app (SOAK_MINUTES, SOAK_RATE and SOAK_MIX, e.g.
"chat=1,completion=1", override); 0 errors and < 10 % RSS growth of every Ray worker process
(and in total) between the post-warm-up baseline and the end."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from conftest import app_args, delete_app, wait_healthy

pytestmark = pytest.mark.soak

REPO = Path(__file__).resolve().parents[1]
APP = "soak"
PREFIX = "/soak"
MINUTES = float(os.environ.get("SOAK_MINUTES", "10"))
RATE = float(os.environ.get("SOAK_RATE", "4"))


@pytest.fixture(scope="module")
def soak_mod():
    from scripts import soak

    return soak


@pytest.fixture(scope="module")
def url(http_port):
    from ray import serve

    from serve_app import build_app

    serve.run(build_app(app_args()), name=APP, route_prefix=PREFIX, blocking=False)
    base = f"http://127.0.0.1:{http_port}{PREFIX}"
    wait_healthy(base)
    yield base
    delete_app(APP)


def test_soak(url, soak_mod):
    mix = soak_mod.parse_mix(os.environ["SOAK_MIX"]) if os.environ.get("SOAK_MIX") else None
    report = asyncio.run(
        soak_mod.soak(
            url, minutes=MINUTES, rate=RATE, warmup_s=min(60.0, MINUTES * 15), processes=soak_mod.ray_processes, mix=mix
        )
    )
    why = soak_mod.verdict(report, max_errors=0, max_rss_growth_pct=10.0)
    print("\n" + soak_mod.format_report(report))
    out = REPO / "reports" / "soak-test.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**report, "verdict": why}, indent=2, ensure_ascii=False))
    assert report["sent"] >= 0.9 * MINUTES * 60 * RATE
    assert not why, why
