# The two commands (see README): `make run` and `make test`. Both set up first.
.PHONY: setup run test bench clean

setup:
	scripts/setup.sh

run: setup
	.venv/bin/serve run configs/serve_config.yaml

test: setup
	scripts/test.sh

# Side-by-side benchmark against vLLM's own OpenAI server (docs/performance.md).
bench: setup
	.venv/bin/python scripts/benchmark.py --compare

clean:
	rm -rf .venv models .pytest_cache
