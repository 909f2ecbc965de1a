from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from app.api.deps import SettingsDep, TasksDep
from app.api.errors import ApiError
from app.api.schemas import (ClassifyResponse, ExtractResponse, GenerateResponse, PromptSetRefOut, TaskRequest,
                             Usage)
from app.api.sse import sse
from app.services.errors import ServiceError

router = APIRouter(prefix="/v1", tags=["tasks"])


@router.post("/tasks/{task}", response_model=GenerateResponse | ClassifyResponse | ExtractResponse)
async def run_task(task: str, body: TaskRequest, tasks: TasksDep, settings: SettingsDep):
    """Run a task with its active prompt set: generate text, classify a text, or extract entities."""
    resolved = tasks.resolve(task)
    ref = PromptSetRefOut(name=resolved.name, version=resolved.version)
    if resolved.task_type != "generate":
        if body.text is None:
            raise ApiError(422, "invalid_request", f"task {task!r} is a {resolved.task_type} task: send 'text'")
        if resolved.task_type == "classify":
            out = await tasks.classify(resolved, body.text)
            return ClassifyResponse(label=out["label"], scores=out["scores"], prompt_set=ref)
        out = await tasks.extract(resolved, body.text)
        return ExtractResponse(entities=out["entities"], prompt_set=ref)
    if body.text is not None:
        raise ApiError(422, "invalid_request", f"task {task!r} is a generate task: send 'prompt' or 'messages'")
    messages = [m.model_dump() for m in body.messages] if body.messages is not None else None
    ids = tasks.encode(body.prompt, messages)
    sampling = body.sampling(settings.default_max_tokens)
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
