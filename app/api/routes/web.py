"""The playground and admin page at `/` (app/web): static files, no templating; the page itself calls the
public API, so this layer only serves bytes."""

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from app.web import STATIC_DIR

router = APIRouter(include_in_schema=False)


@router.get("/")
async def playground() -> FileResponse:
    # no-cache: a new server version's page is fetched again, not served stale from the browser's cache
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def mount_static(app) -> None:
    app.mount("/ui", StaticFiles(directory=STATIC_DIR), name="ui")
