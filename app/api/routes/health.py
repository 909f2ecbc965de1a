from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict:
    """The process is up (the model may still be loading)."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request):
    """200 only once the model is loaded and warmed up, and the server is not draining."""
    engine = getattr(request.app.state, "engine", None)
    if engine is None or not engine.ready or getattr(request.app.state, "draining", False):
        return JSONResponse({"status": "not ready"}, status_code=503)
    return {"status": "ready"}
