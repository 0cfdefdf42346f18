"""The OpenAI-compatible API: request/response types (`protocol`), every error (`errors`), and
the request handling behind the ingress's routes — generation (`generation`, with its SSE
rendering in `sse`), classification (`classify`) and model names (`models`)."""
