"""Every error the service returns is built here, in OpenAI's shape:

    {"error": {"message": str, "type": str, "param": str | null, "code": str | int | null}}

`APIError` is raised anywhere on the request path (it pickles across Ray); the ingress turns
it, FastAPI's validation errors, Serve's backpressure and anything unexpected into a response
with the right status.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

# status -> OpenAI error `type`
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class APIError(Exception):
    """An error with an HTTP status, rendered as an OpenAI error object."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | int | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
        fields: dict[str, Any] | None = None,
    ):
        super().__init__(status, message, param, code, headers, extra, fields)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.extra = extra or {}  # inside the error object
        self.fields = fields or {}  # top level, beside the error object (the replaced service's keys)

    def __str__(self) -> str:
        return f"{self.status}: {self.message}"

    def body(self) -> dict[str, Any]:
        err = {
            "message": self.message,
            "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
            "param": self.param,
            "code": self.code,
        }
        err.update(self.extra)
        return {"error": err, **self.fields}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def unsupported(param: str) -> APIError:
    return APIError(400, f"{param} is not supported by this service.", param=param, code="unsupported_parameter")


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def overloaded(
    retry_after_s: float | None, detail: str = "", max_queue_size: int | None = None, queue_size: int | None = None
) -> APIError:
    """The queue-full 503. Beside the OpenAI error object it carries the replaced service's
    `queue_size` (requests waiting when this one was refused: Serve's count, or, from the
    ingress's gate, the full queue) and `max_queue_size` (the model deployment's
    `max_queued_requests`; null when unbounded)."""
    retry = max(1, math.ceil(retry_after_s)) if retry_after_s else 1
    return APIError(
        503,
        "The model is at capacity: every slot and queue place is taken. Retry after "
        f"{retry} s.{(' ' + detail) if detail else ''}",
        code="queue_full",
        headers={"Retry-After": str(retry)},
        fields={"queue_size": max_queue_size if queue_size is None else queue_size, "max_queue_size": max_queue_size},
    )


def engine_unavailable(message: str = "The model engine is not available.") -> APIError:
    """The model replica serving the call, or its engine, died (such a replica ends itself)."""
    return APIError(503, message, code="engine_unavailable", headers={"Retry-After": "5"})


def is_engine_loss(exc: APIError) -> bool:
    """`exc` is `engine_unavailable`'s: the call lost its model replica (`ModelCalls.lost`)."""
    return exc.code == "engine_unavailable"


def dependency_unavailable(what: str = "service", retry_after_s: int = 1) -> APIError:
    """A part of the service a request needs (`what`: "tokenizer", "adapter registry", …) died
    or cannot be reached — its replica is being replaced, its actor restarted: 503 with
    `Retry-After`, code `<what>_unavailable`, never a 500."""
    return APIError(
        503,
        f"The {what} is briefly unavailable (it is being restarted); retry.",
        code=what.replace(" ", "_") + "_unavailable",
        headers={"Retry-After": str(max(1, retry_after_s))},
    )


@functools.cache
def unavailable_types() -> tuple[type[BaseException], ...]:
    """What a call to a deployment raises when its replica died or none is reachable."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError

    return (ActorDiedError, ActorUnavailableError, RayActorError, DeploymentUnavailableError)


def is_unavailable(exc: BaseException) -> bool:
    """Whether `exc` means a Ray actor or Serve deployment is gone or unreachable (dead,
    restarting, no replica) rather than a bug: a 503, not a 500."""
    return isinstance(exc, unavailable_types())


def timed_out(timeout_s: float) -> APIError:
    return APIError(
        504,
        f"The request did not finish within its {timeout_s:g} s deadline and was aborted.",
        code="timeout",
    )


def body_timed_out(timeout_s: float | None) -> APIError:
    """A request whose body did not arrive in time (a slow or stalled client): 408, closed."""
    return APIError(
        408,
        f"The request body did not arrive within {timeout_s:g} s."
        if timeout_s is not None
        else "The request body did not arrive in time.",
        code="request_timeout",
        headers={"Connection": "close"},
    )


def internal_error() -> APIError:
    return APIError(500, "Internal server error.", code="internal_error")


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "json-or-python"}


def _loc_to_param(loc: tuple | list) -> str | None:
    """FastAPI/pydantic error location → OpenAI `param` (dotted; union-member tags dropped)."""
    parts: list[str] = []
    for p in loc:
        p = str(p)
        if p in ("body", "query", "path") and not parts:
            continue
        if p in _UNION_TAGS or "[" in p:
            break
        parts.append(p)
    return ".".join(parts) or None


def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    kind = first.get("type", "")
    if kind in ("json_invalid", "json_type") or (kind == "missing" and tuple(first.get("loc", ())) == ("body",)):
        msg = "The request body is not valid JSON." if kind != "missing" else "The request body is empty."
        return APIError(400, msg, code="invalid_json").response()
    param = _loc_to_param(first.get("loc", ()))
    if kind == "unsupported_parameter":
        err = unsupported(first["ctx"]["param"])
        err.message = first.get("msg") or err.message  # the refusal's own words (why, what instead)
        return err.response()
    if kind == "extra_forbidden":
        return APIError(
            400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter"
        ).response()
    msg = first.get("msg", "Invalid request.")
    if param:
        msg = f"{param}: {msg}"
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return APIError(400, msg, param=param, code="invalid_value").response()


def route_path(scope) -> str:
    """The request path without the app's route prefix (`root_path`)."""
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


def install_exception_handlers(app) -> None:
    """Map every exception the FastAPI app can meet to an OpenAI error response. Requests
    refused before they reach a route (body validation, unexpected errors) are counted by the
    app's `state.on_rejection(path, status, code)` when the ingress has set one."""

    def record(request: Request, status: int, code) -> None:
        hook = getattr(request.app.state, "on_rejection", None)
        if hook is not None:
            hook(route_path(request.scope), status, code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        if is_unavailable(exc):  # a dependency no call site mapped (RayActorError re-raised)
            err = dependency_unavailable()
            record(request, err.status, err.code)
            return err.response()
        record(request, 500, "internal_error")
        return internal_error().response()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        response = validation_error_response(exc)
        record(request, response.status_code, "invalid_value")
        return response

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        msg = exc.detail if isinstance(exc.detail, str) else "HTTP error."
        if exc.status_code == 404:
            msg = "Not found."
        return APIError(exc.status_code, msg, headers=getattr(exc, "headers", None)).response()
