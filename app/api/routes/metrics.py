from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import MetricsDep, MetricsKeyDep

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response, dependencies=[MetricsKeyDep])
async def metrics(m: MetricsDep):
    """Prometheus metrics (they name every task): with client keys configured, a key is needed unless
    PROMPTSERVE_METRICS_NEED_KEY is false."""
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
