from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from app.api.deps import SettingsDep, TasksDep
from app.api.errors import ApiError
from app.api.schemas import GenerateResponse, PromptSetRefOut, TaskRequest, Usage
from app.api.sse import sse
from app.services.errors import ServiceError

router = APIRouter(prefix="/v1", tags=["tasks"])


@router.post("/tasks/{task}", response_model=GenerateResponse)
async def run_task(task: str, body: TaskRequest, tasks: TasksDep, settings: SettingsDep):
    """Run a task: generate text with the task's active prompt set prepended."""
    resolved = tasks.resolve(task)
    if resolved.task_type != "generate":
        raise ApiError(422, "unsupported_task_type",
                       f"task {task!r} is a {resolved.task_type} task; this server serves generate tasks")
    messages = [m.model_dump() for m in body.messages] if body.messages is not None else None
    ids = tasks.encode(body.prompt, messages)
    sampling = body.sampling(settings.default_max_tokens)
    ref = PromptSetRefOut(name=resolved.name, version=resolved.version)
    if body.stream:
        outputs = tasks.stream(resolved, ids, sampling)

        async def events():
            try:
                async for out in outputs:
                    if out.text or out.finished:
                        yield sse({"text": out.text, "finish_reason": out.finish_reason if out.finished else None,
                                   "prompt_set": ref.model_dump(),
                                   **({"usage": {"prompt_tokens": out.prompt_tokens,
                                                 "completion_tokens": out.completion_tokens,
                                                 "total_tokens": out.prompt_tokens + out.completion_tokens}}
                                      if out.finished else {})})
            except ServiceError as exc:
                yield sse({"error": {"type": exc.type, "message": exc.message, "status": exc.status}})
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")
    result = await tasks.complete(resolved, ids, sampling)
    return GenerateResponse(
        text=result.text, finish_reason=result.finish_reason, prompt_set=ref,
        usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                    total_tokens=result.prompt_tokens + result.completion_tokens))
