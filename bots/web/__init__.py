"""`skillgen web`: the `/skill` front-end as a web page (Gradio), beside the Discord and Slack bots.

    skillgen web [--embedded] [--host 127.0.0.1] [--port 7860]

The page speaks the bots' contracts: the same grammar, intake (prompt policy, backpressure, rate limits), events and
cancels (bots/web/frontend.py); its form and texts are bots/web/form.py, the Gradio layout bots/web/page.py. Plain,
it joins an existing deployment (SKILL_KAFKA_BOOTSTRAP, SKILL_REDIS_URL, SKILL_BLOB_URL, SKILL_SIGNING_KEY, as the
bots and consumers use). `--embedded` first starts the embedded broker and a consumer on SKILL_MODEL (default: the
shipped model) as child processes (bots/web/stack.py), so one command on a laptop, or a Hugging Face Space
(spaces/app.py), gives a working page. No torch in this process either way.
"""

from __future__ import annotations

import asyncio


def add_arguments(parser) -> None:
    parser.add_argument("--embedded", action="store_true",
                        help="also start the embedded broker and a consumer (SKILL_MODEL, default the embedded model)")
    parser.add_argument("--host", help="address to listen on (default SKILL_WEB_HOST or 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, help="port to listen on (default SKILL_WEB_PORT or 7860)")


def run(args) -> int:
    return asyncio.run(main(embedded=args.embedded, host=args.host, port=args.port))


async def main(embedded: bool = False, host: str | None = None, port: int | None = None) -> int:
    if not embedded:
        await serve(host, port)
        return 0
    from bots.web.frontend import WebSettings
    from bots.web.stack import EmbeddedStack

    settings = WebSettings()
    async with EmbeddedStack(adapter_url=settings.adapter_url, trainer=settings.web_training,
                             log=lambda line: print(f"skillgen web: {line}", flush=True)):
        await serve(host, port)
    return 0


async def serve(host: str | None = None, port: int | None = None) -> None:
    """Serve the page until SIGINT/SIGTERM (uvicorn's handlers), then close the Kafka clients."""
    import gradio as gr
    import uvicorn
    from fastapi import FastAPI

    from bots.web.frontend import Frontend, WebSettings
    from bots.web.page import CSS, build

    settings = WebSettings()
    host, port = host or settings.web_host, port or settings.web_port
    frontend = Frontend(settings)
    app = gr.mount_gradio_app(FastAPI(), build(frontend), path="/", css=CSS, footer_links=[])
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    print(f"skillgen web: serving http://{host}:{port}/", flush=True)
    try:
        await server.serve()
    finally:
        await frontend.close()
