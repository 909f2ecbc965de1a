"""`promptserve` command line: serve, import-peft, prepare-model."""

from __future__ import annotations

import argparse
import logging
import sys


def _serve(args) -> int:
    import uvicorn

    from app.api.main import create_app
    from app.settings import get_settings

    settings = get_settings()
    host = args.host or settings.host
    port = args.port or settings.port
    uvicorn.run(create_app(settings), host=host, port=port, log_level=args.log_level,
                timeout_graceful_shutdown=args.grace)
    return 0


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
    from prompt_store.format import PromptSetError
    from prompt_store.peft_import import import_peft

    loaded = load_model(get_settings())
    try:
        ps = import_peft(args.adapter_dir, loaded.spec, loaded.spec.name, task_type=args.task_type)
    except PromptSetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ps.save(args.out, loaded.spec)
    print(f"wrote {args.out}: kind={ps.kind} virtual_tokens={ps.meta.num_virtual_tokens}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="promptserve")
    parser.add_argument("--log-level", default="info")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the model and the prompt-set store over HTTP")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--grace", type=float, default=30.0, help="seconds to finish in-flight requests")
    serve.set_defaults(func=_serve)

    prep = sub.add_parser("prepare-model", help="convert the configured model to the local cache once")
    prep.set_defaults(func=_prepare_model)

    imp = sub.add_parser("import-peft", help="convert a PEFT prompt-learning adapter to a prompt set")
    imp.add_argument("adapter_dir")
    imp.add_argument("--out", required=True)
    imp.add_argument("--task-type", default="generate", choices=["generate", "classify", "extract"])
    imp.set_defaults(func=_import_peft)

    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
