"""One error body for every failure: {"error": {"type", "message", "status"}}."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.services.errors import ServiceError


def error_body(status: int, type_: str, message: str) -> dict:
    return {"error": {"type": type_, "message": message, "status": status}}


def error_response(status: int, type_: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, type_, message), status_code=status, headers=headers)


class ApiError(Exception):
    def __init__(self, status: int, type_: str, message: str, headers: dict | None = None):
        self.status, self.type, self.message, self.headers = status, type_, message, headers


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError):
        return error_response(exc.status, exc.type, exc.message, exc.headers)

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError):
        return error_response(exc.status, exc.type, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
            for e in exc.errors())
        return error_response(422, "invalid_request", problems or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, "http_error", str(exc.detail), getattr(exc, "headers", None))
