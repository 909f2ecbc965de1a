from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from app.api.body import read_body_capped
from app.api.deps import AdminDep, MetricsDep, SettingsDep, TasksDep
from app.api.errors import ApiError
from app.api.schemas import PromptSetVersionOut, TaskVersionsOut
from prompt_store import VersionInfo

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep])

SAFETENSORS_TYPES = {"application/octet-stream", "application/vnd.safetensors", "application/x-safetensors"}
ZIP_TYPES = {"application/zip", "application/x-zip-compressed"}


def version_out(info: VersionInfo) -> PromptSetVersionOut:
    return PromptSetVersionOut(name=info.task, version=info.version, active=info.active, kind=info.meta.kind,
                               task_type=info.meta.task_type, num_virtual_tokens=info.meta.num_virtual_tokens,
                               labels=list(info.meta.labels), size=info.size, sha256=info.sha256,
                               created=info.created, description=info.meta.description)


@router.put("/prompt-sets/{name}", response_model=PromptSetVersionOut, status_code=201,
            openapi_extra={"requestBody": {"required": True, "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                "application/zip": {"schema": {"type": "string", "format": "binary"}}}}})
async def upload_prompt_set(name: str, request: Request, response: Response, tasks: TasksDep,
                            settings: SettingsDep, metrics: MetricsDep,
                            content_type: Annotated[str | None, Header()] = None,
                            idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
                            task_type: Annotated[str, Query(pattern="^(generate|classify|extract)$")] = "generate"):
    """Upload a prompt set as the task's next version and activate it: raw `.safetensors` bytes, or a
    zipped Hugging Face PEFT prompt-learning adapter (`Content-Type: application/zip`; `task_type` applies).

    Idempotent: a retry with the same `Idempotency-Key` header (or the same bytes as the task's newest
    version) answers 200 with the version already stored instead of storing a duplicate (201)."""
    media = (content_type or "application/octet-stream").split(";")[0].strip().lower()
    if media not in SAFETENSORS_TYPES | ZIP_TYPES:
        raise ApiError(415, "unsupported_media_type",
                       f"send the .safetensors file as application/octet-stream, or a PEFT adapter as "
                       f"application/zip (got {media})")
    data = await read_body_capped(request.headers.get("content-length"), request.stream(),
                                  settings.max_upload_bytes, "upload")
    if not data:
        raise ApiError(400, "invalid_request", "empty body: send the prompt-set file as the request body")
    if media in ZIP_TYPES:
        info = await run_in_threadpool(tasks.upload_peft_zip, name, data, task_type, idempotency_key)
    else:
        info = await run_in_threadpool(tasks.upload, name, data, idempotency_key)
    if info.created_now:
        metrics.uploads.labels(task=name).inc()
    else:
        response.status_code = 200
    return version_out(info)


@router.get("/prompt-sets", response_model=list[TaskVersionsOut])
async def list_prompt_sets(tasks: TasksDep):
    """Every task with all its stored versions and their metadata."""
    out = []
    for info in await run_in_threadpool(tasks.list_tasks):
        versions = await run_in_threadpool(tasks.versions, info.task)
        out.append(TaskVersionsOut(name=info.task, active_version=info.version,
                                   versions=[version_out(v) for v in versions]))
    return out


@router.get("/prompt-sets/{name}", response_model=TaskVersionsOut)
async def get_prompt_set(name: str, tasks: TasksDep):
    versions = await run_in_threadpool(tasks.versions, name)
    active = next((v.version for v in versions if v.active), None)
    return TaskVersionsOut(name=name, active_version=active, versions=[version_out(v) for v in versions])


@router.post("/prompt-sets/{name}/versions/{version}/activate", response_model=PromptSetVersionOut)
async def activate_version(name: str, version: int, tasks: TasksDep):
    """Make a stored version the active one (rollback or roll forward)."""
    return version_out(await run_in_threadpool(tasks.activate, name, version))


@router.delete("/prompt-sets/{name}/versions/{version}", status_code=204)
async def delete_version(name: str, version: int, tasks: TasksDep):
    """Delete a stored version. The active version is refused (409): activate another one first, or
    delete the whole task, so a task is never silently left without an active version."""
    await run_in_threadpool(tasks.delete_version, name, version)
    return Response(status_code=204)


@router.delete("/prompt-sets/{name}", status_code=204)
async def delete_task(name: str, tasks: TasksDep):
    """Delete a task and all its versions."""
    await run_in_threadpool(tasks.delete_task, name)
    return Response(status_code=204)
