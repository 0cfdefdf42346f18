"""How the ingress picks a model replica for a request (docs/performance.md, "Cache-aware
routing"): Serve's request-router API (`request_router_config` on the model deployment), chosen
by `routing.policy`.

* `config`   the `routing` section and the Serve options it becomes (a leaf).
* `blocks`   token-block hashes of a prompt and the table of which replica saw which block.
* `router`   `CacheAffinityRouter`: session affinity, then the longest cached token prefix,
             under an imbalance bound, on top of Serve's adapter (multiplex) preference.
* `prefill`  the prefill speed each model replica measures from vLLM's counters and reports in
             Serve's routing stats: how long a request may wait for the replica holding its cache.
"""
