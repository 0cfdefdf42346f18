# The two commands (see README): `make run` and `make test`. Both set up first.
.PHONY: setup run run-fast test bench clean

setup:
	scripts/setup.sh

run: setup
	.venv/bin/serve run configs/serve_config.yaml

# The same service on Serve's fast request path (HAProxy direct ingress; see
# configs/fast-path.env and docs/performance.md for the measured gain and the caveats).
run-fast: setup
	set -a && . configs/fast-path.env && set +a && exec .venv/bin/serve run configs/serve_config.yaml

test: setup
	scripts/test.sh

# Side-by-side benchmark against vLLM's own OpenAI server (docs/performance.md).
bench: setup
	.venv/bin/python scripts/benchmark.py --compare --ours-env-file configs/fast-path.env

clean:
	rm -rf .venv models .pytest_cache
