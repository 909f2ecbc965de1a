"""Typed dependencies: the routes ask for what they need, the app state provides it."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from app.api.errors import ApiError
from app.observability import Metrics
from app.services.fine_tuning import FineTuningService
from app.services.tasks import TaskService
from app.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_tasks(request: Request) -> TaskService:
    service = getattr(request.app.state, "tasks", None)
    if service is None:
        raise ApiError(503, "unavailable", "the model is still loading", {"Retry-After": "5"})
    return service


def get_fine_tuning(request: Request) -> FineTuningService:
    service = getattr(request.app.state, "fine_tuning", None)
    if service is None:
        raise ApiError(503, "unavailable", "the server is still starting", {"Retry-After": "5"})
    return service


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
TasksDep = Annotated[TaskService, Depends(get_tasks)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
FineTuningDep = Annotated[FineTuningService, Depends(get_fine_tuning)]


def _bearer(authorization: str | None) -> str | None:
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return None


def _matches(given: str, secret: str) -> bool:
    # Constant-time comparison, so response timing does not reveal how much of a secret matched.
    return hmac.compare_digest(given.encode(), secret.encode())


def require_admin(settings: SettingsDep, authorization: Annotated[str | None, Header()] = None) -> None:
    if not settings.admin_token:
        raise ApiError(403, "forbidden", "the admin API is disabled: no PROMPTSERVE_ADMIN_TOKEN is configured")
    token = _bearer(authorization)
    if token is None:
        raise ApiError(401, "unauthorized", "admin routes need 'Authorization: Bearer <admin token>'",
                       {"WWW-Authenticate": "Bearer"})
    if not _matches(token, settings.admin_token):
        raise ApiError(403, "forbidden", "wrong admin token")


def require_api_key(settings: SettingsDep, authorization: Annotated[str | None, Header()] = None) -> None:
    """Client API keys for /v1, when any are configured (PROMPTSERVE_API_KEYS)."""
    keys = settings.api_key_list
    if not keys:
        return
    token = _bearer(authorization)
    if token is None:
        raise ApiError(401, "unauthorized", "this server needs 'Authorization: Bearer <API key>'",
                       {"WWW-Authenticate": "Bearer"})
    if not any(_matches(token, k) for k in keys):  # every key compared, so timing says nothing
        raise ApiError(401, "unauthorized", "invalid API key", {"WWW-Authenticate": "Bearer"})


def require_metrics_key(settings: SettingsDep, authorization: Annotated[str | None, Header()] = None) -> None:
    """/metrics lists task names and traffic: with client keys on it needs one too, unless the operator
    opened it for a scraper that cannot send a bearer token (PROMPTSERVE_METRICS_NEED_KEY=false)."""
    if settings.metrics_need_key:
        require_api_key(settings, authorization)


AdminDep = Depends(require_admin)
ApiKeyDep = Depends(require_api_key)
MetricsKeyDep = Depends(require_metrics_key)
