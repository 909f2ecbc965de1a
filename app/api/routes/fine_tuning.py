"""OpenAI's Files API (purpose fine-tune) and fine-tuning jobs API: what the official `openai` SDK calls
(`client.files.*`, `client.fine_tuning.jobs.*`, `...jobs.checkpoints.list`). Admin token only: these train
on and store a company's data."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as StarletteRequest

from app.api.body import read_body_capped
from app.api.deps import AdminDep, FineTuningDep, SettingsDep
from app.api.errors import ApiError
from app.api.fine_tuning_schemas import JobCreate
from app.services.fine_tuning import PAGE_MAX

router = APIRouter(prefix="/v1", tags=["fine-tuning"], dependencies=[AdminDep])
MULTIPART_SLACK = 64 * 1024  # the form's other fields and boundaries around the file


Limit = Annotated[int, Query(ge=1, le=PAGE_MAX)]


def listing(items: list[dict], more: bool) -> dict:
    return {"object": "list", "data": items, "has_more": more,
            "first_id": items[0]["id"] if items else None, "last_id": items[-1]["id"] if items else None}


# -- files ---------------------------------------------------------------------------------------------
@router.post("/files", openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {
    "schema": {"type": "object", "required": ["file", "purpose"], "properties": {
        "file": {"type": "string", "format": "binary"}, "purpose": {"type": "string", "enum": ["fine-tune"]}}}}}}})
async def upload_file(request: Request, service: FineTuningDep, settings: SettingsDep):
    """Upload a JSONL training file (multipart: `file`, `purpose=fine-tune`). Every line is checked: a line
    that cannot train is refused (400) with its number and field."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(415, "unsupported_media_type", "send the file as multipart/form-data with fields file "
                       "and purpose (as the openai SDK's client.files.create does)")
    cap = (settings.files_max_mb << 20) + MULTIPART_SLACK
    body = await read_body_capped(request.headers.get("content-length"), request.stream(), cap,
                                  "upload (PROMPTSERVE_FILES_MAX_MB)")
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await StarletteRequest(request.scope, replay).form(max_files=1, max_fields=8)
    except Exception as exc:  # python-multipart's and starlette's parse errors: the client's body
        raise ApiError(400, "invalid_request", f"unreadable multipart body: {exc}") from None
    unknown = sorted(set(form.keys()) - {"file", "purpose"})
    if unknown:
        raise ApiError(400, "unsupported_field", f"unsupported field {unknown[0]!r}", param=unknown[0])
    upload, purpose = form.get("file"), form.get("purpose")
    if upload is None or isinstance(upload, str):
        raise ApiError(400, "invalid_request", "the form needs a file part named 'file'", param="file")
    if not isinstance(purpose, str):
        raise ApiError(400, "invalid_request", "the form needs a field 'purpose' ('fine-tune')", param="purpose")
    data = await upload.read()
    return await run_in_threadpool(service.upload_file, upload.filename or "upload.jsonl", purpose, data)


@router.get("/files")
async def list_files(service: FineTuningDep, purpose: str | None = None, after: str | None = None,
                     limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
                     order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc"):
    return listing(*await run_in_threadpool(service.list_files, purpose, after, limit, order))


@router.get("/files/{file_id}")
async def get_file(file_id: str, service: FineTuningDep):
    return await run_in_threadpool(service.get_file, file_id)


@router.get("/files/{file_id}/content")
async def file_content(file_id: str, service: FineTuningDep):
    data = await run_in_threadpool(service.file_content, file_id)
    return Response(data, media_type="application/octet-stream")


@router.delete("/files/{file_id}")
async def delete_file(file_id: str, service: FineTuningDep):
    return await run_in_threadpool(service.delete_file, file_id)


# -- jobs ----------------------------------------------------------------------------------------------
@router.post("/fine_tuning/jobs")
async def create_job(body: JobCreate, service: FineTuningDep):
    """Start a fine-tuning job: OpenAI's body, plus `prompt_set` (kind, virtual_tokens, task_type, labels,
    init_text) for what a prompt set needs. `metadata.promote_to` names a task the result replaces if it scores
    better on the validation file than the task's active version."""
    return await run_in_threadpool(service.create_job, body.to_request())


@router.get("/fine_tuning/jobs")
async def list_jobs(request: Request, service: FineTuningDep, after: str | None = None, limit: Limit = 20):
    """Newest first; `metadata[key]=value` filters (as the openai SDK sends them)."""
    metadata = {k[len("metadata["):-1]: v for k, v in request.query_params.items()
                if k.startswith("metadata[") and k.endswith("]")}
    return listing(*await run_in_threadpool(service.list_jobs, after, limit, metadata))


@router.get("/fine_tuning/jobs/{job_id}")
async def get_job(job_id: str, service: FineTuningDep):
    return await run_in_threadpool(service.get_job, job_id)


@router.post("/fine_tuning/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, service: FineTuningDep):
    """A queued job is cancelled at once; a running one stops within seconds (its worker sees it at its next
    report)."""
    return await run_in_threadpool(service.cancel_job, job_id)


@router.get("/fine_tuning/jobs/{job_id}/events")
async def list_events(job_id: str, service: FineTuningDep, after: str | None = None,
                      limit: Annotated[int, Query(ge=1, le=1000)] = 20):
    """Newest first: messages, and `metrics` events with the step's train loss and each epoch's validation
    figure (valid_loss for generate, valid_f1 for classify and extract)."""
    return listing(*await run_in_threadpool(service.list_events, job_id, after, limit))


@router.get("/fine_tuning/jobs/{job_id}/checkpoints")
async def list_checkpoints(job_id: str, service: FineTuningDep, after: str | None = None, limit: Limit = 10):
    """The job's resume points (the last three), newest first."""
    return listing(*await run_in_threadpool(service.list_checkpoints, job_id, after, limit))
