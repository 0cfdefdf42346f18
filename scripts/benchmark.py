#!/usr/bin/env python
"""OpenAI-compatible load generator and side-by-side benchmark against vLLM's own server.

The command line of the `scripts/bench/` package (modes, load, output: scripts/bench/cli.py;
the method: docs/performance.md):

    .venv/bin/python scripts/benchmark.py --compare            # the side-by-side run
    .venv/bin/python scripts/benchmark.py --url http://127.0.0.1:8000 --concurrency 1,3
    .venv/bin/python scripts/benchmark.py --start ours --overload
"""

import sys

from scripts.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
