from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from app.api.deps import AdminDep, SettingsDep, TasksDep
from app.api.errors import ApiError
from app.api.schemas import PromptSetVersionOut
from prompt_store import VersionInfo

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep])


def version_out(info: VersionInfo) -> PromptSetVersionOut:
    return PromptSetVersionOut(name=info.task, version=info.version, active=info.active, kind=info.meta.kind,
                               task_type=info.meta.task_type, num_virtual_tokens=info.meta.num_virtual_tokens,
                               labels=list(info.meta.labels), size=info.size, sha256=info.sha256,
                               created=info.created)


async def read_body_capped(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "too_large", f"upload of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "too_large", f"upload exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@router.put("/prompt-sets/{name}", response_model=PromptSetVersionOut, status_code=201,
            openapi_extra={"requestBody": {"required": True, "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
async def upload_prompt_set(name: str, request: Request, tasks: TasksDep, settings: SettingsDep):
    """Upload a prompt set (raw .safetensors bytes) as the task's next version, and activate it."""
    data = await read_body_capped(request, settings.max_upload_bytes)
    if not data:
        raise ApiError(400, "invalid_request", "empty body: send the .safetensors file as the request body")
    info = await run_in_threadpool(tasks.upload, name, data)
    return version_out(info)
