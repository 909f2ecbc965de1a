"""One error body for every failure, OpenAI's: {"error": {"message", "type", "param", "code"}}.

`code` is this server's specific reason (`model_not_found`, `context_length_exceeded`,
`unsupported_field`, `invalid_prompt_set`, ...), `type` OpenAI's category for the status, `param` the
request field at fault when there is one. The same object is the `error` of an error event in a stream.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.services.errors import ServiceError

# OpenAI's error categories by status: what its client libraries and their users branch on
_CATEGORIES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               409: "conflict_error", 429: "rate_limit_error", 503: "service_unavailable_error"}


def error_category(status: int) -> str:
    if status in _CATEGORIES:
        return _CATEGORIES[status]
    return "invalid_request_error" if status < 500 else "server_error"


def error_body(status: int, code: str, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_category(status), "param": param, "code": code}}


def error_response(status: int, code: str, message: str, headers: dict | None = None,
                   param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, code, message, param), status_code=status, headers=headers)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers, self.param = status, code, message, headers, param


def body_of(exc: ServiceError | ApiError) -> dict:
    """The error body of a failure raised by a route or a service (also used inside streams)."""
    return error_body(exc.status, exc.code, exc.message, getattr(exc, "param", None))


def _is_field(part) -> bool:
    """A location part that names a field or an index, not one of pydantic's validator or union-member tags
    (`list[function-after[valid_unicode(), constrained-str]]`, `str`, `NamedToolChoice`)."""
    if isinstance(part, int):
        return True
    return part != "body" and part not in _TYPE_TAGS and not any(c in part for c in "[]()-,") and \
        not part[:1].isupper()


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "tuple", "literal", "function-after"}


def _field(loc) -> str:
    return ".".join(str(p) for p in loc if _is_field(p)) or "body"


def validation_failure(errors: list[dict]) -> tuple[str, str, str | None]:
    """(code, message, param) of a body that failed validation: a field this server does not know is
    refused by name (`unsupported_field`), never dropped."""
    unknown = [_field(e.get("loc", ())) for e in errors if e.get("type") == "extra_forbidden"]
    if unknown:
        return ("unsupported_field", f"unsupported field{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(repr(u) for u in unknown)}: this server does not implement "
                f"{'them' if len(unknown) > 1 else 'it'}", unknown[0])
    problems = "; ".join(f"{_field(e.get('loc', ()))}: {e.get('msg')}" for e in errors)
    param = _field(errors[0].get("loc", ())) if errors else None
    return "invalid_request", problems or "invalid request", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError):
        return JSONResponse(body_of(exc), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError):
        return JSONResponse(body_of(exc), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        # 400 as OpenAI answers an invalid body (its clients raise BadRequestError for it)
        code, message, param = validation_failure(exc.errors())
        return error_response(400, code, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))
