# The two commands (see README): `make run` and `make test`. Both set up first.
.PHONY: setup run run-fast run-python-proxy test bench clean

# `make run CONFIG=path/to/other.yaml` serves another Serve config the same way.
CONFIG ?= configs/serve_config.yaml
# Serve's fast request path (HAProxy straight to the ingress replicas; configs/fast-path.env),
# with our HAProxy binary, which passes each client's address on for per-client rate limits,
# vouched for by a secret shared with the ingress (a new random one unless the environment has
# LLM_SERVE_PROXY_SECRET; deployments/admission/client_address.py).
FAST_PATH = set -a && . configs/fast-path.env && set +a && \
	export RAY_SERVE_HAPROXY_BINARY_PATH="$(CURDIR)/.venv/bin/llm-serve-haproxy" && \
	export LLM_SERVE_PROXY_SECRET="$${LLM_SERVE_PROXY_SECRET:-$$(.venv/bin/llm-serve-haproxy --new-secret)}"

setup:
	scripts/setup.sh

run: setup
	@echo "==> serving $(CONFIG) on Serve's fast path (HAProxy straight to the ingress," \
	      "configs/fast-path.env); on Serve's Python proxy instead: make run-python-proxy"
	$(FAST_PATH) && exec .venv/bin/python -m cluster.run $(CONFIG)

run-fast: run

# Serve's default Python proxy instead (for comparison; docs/performance.md).
run-python-proxy: setup
	FORWARDED_ALLOW_IPS= exec .venv/bin/python -m cluster.run $(CONFIG)

test: setup
	scripts/test.sh

# Side-by-side benchmark against vLLM's own OpenAI server (docs/performance.md).
bench: setup
	.venv/bin/python scripts/benchmark.py --compare

clean:
	rm -rf .venv models .pytest_cache
