"""Small-GPU recipes (configs/recipes/, docs/recipes.md): each is a valid Serve config whose args
validate, names a quantization method vLLM 0.32 has, and gives vLLM engine arguments it accepts.
Not run on a GPU here (no engine is started): the memory arithmetic is in docs/recipes.md."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO

RECIPES = sorted((REPO / "configs" / "recipes").glob("*.yaml"))


def test_there_are_recipes_for_the_users_cards():
    assert {p.stem for p in RECIPES} >= {"ampere-12gb-int8", "ada-hopper-fp8", "awq-4bit", "gptq-4bit"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates(path: Path):
    from ray.serve.schema import ServeDeploySchema
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    from deployments.config import ServiceConfig
    from deployments.engine import engine_kwargs
    from serve_app import app_options

    doc = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(doc)
    [app] = doc["applications"]
    assert app["import_path"] == "serve_app:build_app"
    cfg = ServiceConfig.model_validate(app["args"])
    assert cfg.accelerator == "gpu" and cfg.engine.quantization in QUANTIZATION_METHODS
    model = app_options(cfg, "gpu")["model"]
    assert model["ray_actor_options"]["num_gpus"] == 1 and model["max_ongoing_requests"] >= 1
    kwargs = engine_kwargs(cfg, on_cpu=False)
    AsyncEngineArgs(**kwargs)  # every argument is one vLLM's engine takes
    assert kwargs["quantization"] == cfg.engine.quantization and kwargs["enforce_eager"] is False
