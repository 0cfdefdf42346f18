"""Who gets in, and when: the ASGI middleware (`middleware`: body size, API keys, rate
limits), API keys (`auth`), the cluster-wide rate limiter (`rate_limit`) and the capacity gate
in front of the model deployment (`capacity`)."""
