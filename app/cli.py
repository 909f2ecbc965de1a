"""`promptserve` command line: serve, worker, train, eval, bench, import-peft, prepare-model."""

from __future__ import annotations

import argparse
import logging
import sys


def _serve(args) -> int:
    import signal
    import threading

    import uvicorn

    from app.api.http_limits import guarded_protocol
    from app.api.main import build_engine, create_app
    from app.api.shutdown import SHUTDOWN_TIMEOUT, DrainingServer
    from app.engine.threads import size_threads
    from app.model.loader import load_model
    from app.settings import get_settings

    settings = get_settings()
    grace = args.grace if args.grace is not None else settings.drain_grace
    size_threads(settings.threads)  # before the first torch op: the main thread's team is made at that size
    # The model is loaded, its KV cache allocated and its loop run on the main thread, HTTP on a thread.
    # The thread that first runs torch kernels gets an OpenMP team; a second live team (the HTTP thread's,
    # had it allocated the cache) made every SmolLM2 decode step ~1.5x slower here (60-68 vs 36-48 ms).
    engine = build_engine(settings, load_model(settings))
    supervisor = None
    if settings.training_worker:  # fine-tuning jobs train in a process of their own, at low priority
        from fine_tuning.supervisor import WorkerSupervisor

        supervisor = WorkerSupervisor(nice=settings.training_nice)
        supervisor.start()
    app = create_app(settings, engine=engine)
    config = uvicorn.Config(app, host=args.host or settings.host, port=args.port or settings.port,
                            log_level=args.log_level, timeout_graceful_shutdown=SHUTDOWN_TIMEOUT, log_config=None,
                            http=guarded_protocol(settings.http_max_header_bytes, settings.http_header_timeout,
                                                  settings.http_body_timeout, settings.http_body_min_rate),
                            limit_concurrency=settings.http_max_connections,
                            timeout_keep_alive=settings.http_keep_alive_timeout)
    server = DrainingServer(config, app.state, grace)

    def serve_http():
        try:
            server.run()
        finally:
            engine.stop()  # also when the server never started (port taken): end the model loop

    http = threading.Thread(target=serve_http, name="http", daemon=True)
    http.start()
    # signals arrive on the main thread: route them to the server's drain logic
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, server.handle_exit)
    engine.run_forever()  # returns once the engine is stopped
    http.join()
    if supervisor is not None:
        supervisor.stop()
    return 0 if server.started else 1


def _prepare_model(args) -> int:
    from app.model.source import resolve_checkpoint
    from app.settings import get_settings

    settings = get_settings()
    path, name = resolve_checkpoint(settings.model, settings.cache_dir)
    print(f"{name}: {path}")
    return 0


def _import_peft(args) -> int:
    from app.model.loader import load_model
    from app.settings import get_settings
    from prompt_store.peft_import import import_peft

    loaded = load_model(get_settings())
    ps = import_peft(args.adapter_dir, loaded.spec, loaded.spec.name, task_type=args.task_type)
    ps.save(args.out, loaded.spec)
    print(f"wrote {args.out}: kind={ps.kind} virtual_tokens={ps.meta.num_virtual_tokens}")
    return 0


def _train(args) -> int:
    from training.run import main as train_main

    return train_main(args)


def _eval(args) -> int:
    from training.evaluate import main as eval_main

    return eval_main(args)


def _worker(args) -> int:
    from fine_tuning.worker import main as worker_main

    return worker_main(args)


def _bench(args) -> int:
    # --bare measures the closed loops on the bare model: refused beside what measures something else
    other = [flag for flag, on in (("--rate", args.rate), ("--neighbours", args.neighbours),
                                   ("--during-training", args.during_training), ("--model", args.model)) if on]
    if args.bare and other:
        raise ValueError(f"--bare runs the closed loops on the bare model only; {', '.join(other)} measures "
                         "something else: drop one or the other")
    if args.during_training:
        from benchmarks.training_interference import main as interference

        return interference(args)
    if args.model:
        from benchmarks.model_size import run as model_size

        return model_size(args)
    from benchmarks.serving import main as bench_main

    return bench_main(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="promptserve")
    parser.add_argument("--log-level", default="info")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the model and the prompt-set store over HTTP")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--grace", type=float, help="on SIGTERM, seconds in-flight requests get to finish "
                       "(default PROMPTSERVE_DRAIN_GRACE, 30)")
    serve.set_defaults(func=_serve)

    wk = sub.add_parser("worker", help="train the store's queued fine-tuning jobs (serve starts one; run more "
                        "beside other replicas against a shared store)")
    wk.set_defaults(func=_worker)

    prep = sub.add_parser("prepare-model", help="convert the configured model to the local cache once")
    prep.set_defaults(func=_prepare_model)

    imp = sub.add_parser("import-peft", help="convert a PEFT prompt-learning adapter to a prompt set")
    imp.add_argument("adapter_dir")
    imp.add_argument("--out", required=True)
    imp.add_argument("--task-type", default="generate", choices=["generate", "classify", "extract"])
    imp.set_defaults(func=_import_peft)

    tr = sub.add_parser("train", help="train a prompt set on the frozen base model")
    tr.add_argument("--demo", choices=["spam", "ner", "chat"], help="one of the demo tasks (data and settings)")
    tr.add_argument("--data", nargs="*", help="JSONL training file(s)")
    tr.add_argument("--task-type", choices=["generate", "classify", "extract"])
    tr.add_argument("--labels", help="comma-separated labels (classify) or entity types (extract)")
    tr.add_argument("--kind", choices=["input", "deep", "full"], default="deep",
                    help="prompt-set kind; 'full' fine-tunes the whole model as a reference (writes no file)")
    tr.add_argument("--virtual-tokens", type=int)
    tr.add_argument("--reparam", action="store_true", help="train deep prefixes through an MLP (folded on export)")
    tr.add_argument("--epochs", type=float)
    tr.add_argument("--batch-size", type=int)
    tr.add_argument("--lr", type=float)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--max-steps", type=int)
    tr.add_argument("--class-weight", choices=["balanced"], help="classify: weight each label's loss by the "
                    "inverse of its frequency in the training data")
    tr.add_argument("--select-on-dev", action=argparse.BooleanOptionalAction, default=None,
                    help="demo tasks: evaluate on dev after each epoch and keep the best epoch (default: the "
                    "preset's)")
    tr.add_argument("--init-text", help="start the prompt from this text (input: its embeddings; deep: its keys "
                    "and values); default: the preset's, '' for none")
    tr.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=None,
                    help="batches of examples of similar length (default: the preset's, else on)")
    tr.add_argument("--limit", type=int, help="use only the first N rows")
    tr.add_argument("--device")
    tr.add_argument("--dtype")
    tr.add_argument("--description")
    tr.add_argument("--out", help="output .safetensors (default app/demo_prompt_sets/NAME.safetensors, the "
                    "shipped demo set)")
    tr.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="evaluate a task on a dev file through a running server's HTTP API")
    ev.add_argument("--url", default="http://127.0.0.1:8000")
    ev.add_argument("--demo", choices=["spam", "ner", "chat"], required=True)
    ev.add_argument("--task", help="task name on the server (default: the demo name)")
    ev.add_argument("--zero-shot", action="store_true", help="instruct the base model, no prompt set")
    ev.add_argument("--limit", type=int)
    ev.add_argument("--concurrency", type=int, default=16)
    ev.add_argument("--json", help="write the figures here")
    ev.set_defaults(func=_eval)

    be = sub.add_parser("bench", help="serving benchmark against plain-transformers baselines")
    be.add_argument("--url", help="a running server (default: start one here)")
    be.add_argument("--server-env", default="", help="KEY=VALUE,... set for the server this starts only "
                    "(an experiment's setting, e.g. OMP_WAIT_POLICY=PASSIVE; the baselines run without it)")
    be.add_argument("--concurrency", default="1,8,32,64", help="closed-loop clients, comma-separated")
    be.add_argument("--rate", help="Poisson arrivals per second, comma-separated: the sweep runs open-loop at "
                                   "these rates (the ratios still use a closed loop at the top concurrency)")
    be.add_argument("--mix", default="chat:1,ner:1,spam:1", help="task proportions")
    be.add_argument("--requests", type=int, help="requests per phase (default: the top concurrency)")
    be.add_argument("--output-len", type=int, default=64)
    be.add_argument("--many", type=int, default=1000, help="prompt sets registered for the many-sets phase")
    be.add_argument("--neighbours", type=int, default=0, help="a phase at the top concurrency beside N processes "
                    "that keep a core busy each (shared cores), against the same phase alone")
    be.add_argument("--baseline-requests", type=int, default=4, help="requests for the batch-1 baselines")
    be.add_argument("--server-only", action="store_true", help="the closed loops only (no other phase, no "
                    "baseline): the perf workload, e.g. against a container with --url")
    be.add_argument("--llama-server", help="a llama.cpp llama-server binary: the same workload through it as a "
                    "baseline (benchmarks/llama_server.py; bare model, bf16 GGUF converted beside its sources)")
    be.add_argument("--llama-gguf", help="--llama-server: the GGUF to serve (default: the served checkpoint "
                    "converted to bf16 with the convert_hf_to_gguf.py of the binary's source tree)")
    be.add_argument("--bare", action="store_true", help="the closed loops on the bare model through "
                    "/v1/chat/completions, the same requests llama-server gets (no prompt sets: the phases about "
                    "them are skipped), e.g. to compare one client with --llama-server on identical requests")
    be.add_argument("--llama-args", default="", help="--llama-server: more of its arguments, e.g. '--spec-type "
                    "ngram-simple' (its own prompt-lookup speculation, to compare with ours)")
    be.add_argument("--seed", type=int, default=0)
    be.add_argument("--during-training", action="store_true", help="TPOT of the top concurrency's clients "
                    "without a fine-tuning job, while one trains (the server's own worker), and after "
                    "(benchmarks/training_interference.py)")
    be.add_argument("--model", help="a checkpoint directory: measure its server's memory and single-client decode "
                    "against HF generate batch 1 and the read-bandwidth ceiling (benchmarks/model_size.py) "
                    "instead of the serving benchmark")
    be.add_argument("--rows", type=int, default=8, help="--model: KV-cache rows (PROMPTSERVE_MAX_NUM_SEQS)")
    be.add_argument("--context", type=int, default=1024, help="--model: tokens a row holds "
                    "(PROMPTSERVE_MAX_MODEL_LEN), each filled by one client")
    be.add_argument("--json", default="benchmarks/results.json")
    be.add_argument("--plot", default="benchmarks/results.png")
    be.set_defaults(func=_bench)

    args = parser.parse_args(argv)
    from app.observability import RequestIdFilter

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())
    try:
        return args.func(args)
    except Exception as exc:
        if not isinstance(exc, _user_errors()):
            raise  # a bug: the traceback is what helps
        # what a user can cause (a missing file, a server not running): one clear line, no traceback
        print(f"promptserve {args.command}: error: {_describe(exc)}", file=sys.stderr)
        return 1


def _describe(exc: BaseException) -> str:
    import httpx

    if isinstance(exc, httpx.ConnectError):
        return f"cannot reach the server ({exc}); is it running, and is --url right?"
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror or exc}: {exc.filename}"
    return str(exc) or type(exc).__name__


def _user_errors() -> tuple[type[BaseException], ...]:
    import httpx

    from prompt_store.format import PromptSetError
    return (OSError, httpx.HTTPError, PromptSetError, ValueError)


if __name__ == "__main__":
    sys.exit(main())
