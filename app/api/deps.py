"""Typed dependencies: the routes ask for what they need, the app state provides it."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from app.api.errors import ApiError
from app.services.tasks import TaskService
from app.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_tasks(request: Request) -> TaskService:
    service = getattr(request.app.state, "tasks", None)
    if service is None:
        raise ApiError(503, "unavailable", "the model is still loading", {"Retry-After": "5"})
    return service


SettingsDep = Annotated[Settings, Depends(get_settings)]
TasksDep = Annotated[TaskService, Depends(get_tasks)]


def require_admin(settings: SettingsDep, authorization: Annotated[str | None, Header()] = None) -> None:
    if not settings.admin_token:
        raise ApiError(403, "forbidden", "the admin API is disabled: no PROMPTSERVE_ADMIN_TOKEN is configured")
    if not authorization or not authorization.startswith("Bearer "):
        raise ApiError(401, "unauthorized", "admin routes need 'Authorization: Bearer <admin token>'",
                       {"WWW-Authenticate": "Bearer"})
    # Constant-time comparison, so response timing does not reveal how much of the token matched.
    if not hmac.compare_digest(authorization[7:].encode(), settings.admin_token.encode()):
        raise ApiError(403, "forbidden", "wrong admin token")


AdminDep = Depends(require_admin)
