"""`stepquant serve DIR`: a minimal OpenAI-compatible server, for `verify --endpoint` without vLLM."""

from __future__ import annotations

import click

from ..endpoint import serve


@click.command("serve")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: any free port.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--fail-first", type=click.IntRange(0), default=0, help="Answer the first N requests with 503 (tests clients' retries).")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model's own Python code (off by default).")
def command(path: str, host: str, port: int, device: str, fail_first: int, trust_remote_code: bool) -> None:
    """Serve a transformers model folder at http://HOST:PORT/v1 (chat completions, one at a time)."""
    server = serve(path, host, port, device, fail_first, trust_remote_code)
    h, p = server.server_address[:2]
    click.echo(f"serving {path} at http://{h}:{p}/v1", err=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
