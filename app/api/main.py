"""The FastAPI application: wiring, lifecycle, and nothing else."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool

from app.api.errors import install_error_handlers
from app.api.middleware import ServingMiddleware
from app.api.routes import admin, fine_tuning, health, metrics, openai, tasks, tokenizer, web
from app.engine.constraints import GrammarLimits
from app.engine.engine import Engine, EngineConfig
from app.engine.kv_cache import default_budget_bytes
from app.model.loader import LoadedModel, load_model
from app.observability import Metrics
from app.services.fine_tuning import FineTuningService
from app.services.seeding import seed_store
from app.services.tasks import TaskService
from app.settings import Settings, get_settings
from fine_tuning.files import FileBook, FileLimits
from fine_tuning.jobs import JobBook
from prompt_store import open_record_store, open_store

log = logging.getLogger("promptserve")


def build_engine(settings: Settings, loaded: LoadedModel, owns_model: bool = True) -> Engine:
    """owns_model: the model was loaded for this engine alone, so the engine's packed copies may replace its
    weights (held once); a model handed in by a caller (tests, an embedding program) keeps its own."""
    return Engine(loaded, EngineConfig(
        max_num_seqs=settings.max_num_seqs, max_model_len=settings.max_model_len, max_queue=settings.max_queue,
        max_prefills_per_step=settings.max_prefills_per_step, max_prefill_tokens=settings.max_prefill_tokens,
        prefix_cache_size=settings.prefix_cache_size,
        prefix_cache_bytes=settings.prefix_cache_mb << 20, pack_weights=settings.pack_weights,
        release_model_weights=owns_model, small_batch_copy_bytes=settings.small_batch_copy_mb << 20,
        adaptive_threads=settings.adaptive_threads,
        kv_cache_bytes=(settings.kv_cache_mb << 20) or default_budget_bytes(loaded.device),
        prompt_cache_bytes=settings.prompt_cache_mb << 20, speculative_tokens=settings.speculative_tokens,
        kernel_cache_dir=str(settings.cache_dir) if settings.native_kernels else None))


def create_app(settings: Settings | None = None, loaded: LoadedModel | None = None,
               engine: Engine | None = None) -> FastAPI:
    """With `engine`, the caller built it and runs its loop (engine.run_forever(), see app/cli.py);
    otherwise the app builds one at start-up and it runs on its own thread."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        store = open_store(settings.store_url, settings.store_dir, settings.store_poll_seconds)
        # a model handed in (tests, or a caller that already holds one) is used as it is
        if engine is not None:
            model, running = engine.loaded, engine
        else:
            handed = loaded or getattr(app.state, "preloaded", None)
            model = handed or await run_in_threadpool(load_model, settings)
            running = build_engine(settings, model, owns_model=handed is None)
            running.start()
        service = TaskService(running, store, model.spec, model.tokenizer, GrammarLimits(
            cache_bytes=settings.grammar_cache_mb << 20, max_bytes=settings.grammar_max_mb << 20,
            max_seconds=settings.grammar_max_seconds))
        await run_in_threadpool(seed_store, store, service, settings.seed_dir)
        records = open_record_store(settings.store_url, settings.store_dir)
        app.state.fine_tuning = FineTuningService(
            FileBook(records, FileLimits(settings.files_max_mb << 20, settings.files_max_lines)), JobBook(records),
            store, service.base_model_id)
        app.state.engine, app.state.store, app.state.tasks = running, store, service
        if settings.warmup:
            await running.warmup()
        else:
            running.ready = True
        log.info("ready: %s on %s (%s)", model.spec.name, model.device, model.dtype)
        try:
            yield
        finally:
            running.stop()

    # /docs and /redoc with their assets served by the app itself (fastapi-offline ships them), so the docs
    # work where there is no internet; no Google fonts, no validator badge fetched from swagger.io
    app = FastAPIOffline(title="promptserve", version="0.1.0", lifespan=lifespan,
                         description="Many P-Tuning v2 tasks served from one frozen Llama-family model.",
                         swagger_ui_parameters={"validatorUrl": None})
    app.state.settings = settings
    app.state.draining = False
    app.state.inflight = 0
    app.state.engine = None
    app.state.metrics = Metrics(lambda: app.state.engine)
    install_error_handlers(app)
    app.add_middleware(ServingMiddleware, state=app.state)
    for module in (health, metrics, tasks, openai, tokenizer, admin, fine_tuning, web):
        app.include_router(module.router)
    web.mount_static(app)
    return app
