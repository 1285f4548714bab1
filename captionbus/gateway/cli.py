"""`captionbus gateway [--listen HOST:PORT] [--keys FILE]` and `captionbus gateway add-key NAME`."""
from __future__ import annotations

from pathlib import Path

import click

from captionbus.gateway.keys import KeyRing, add_key
from captionbus.web.listen import ListenError, check_bind, is_loopback, parse_listen
from captionbus.core.settings import load


def read_gateway_file(path: Path | None):
    """The --config TOML as dispatch.GatewayFile; a bad file is a ClickException naming what is wrong."""
    import tomllib

    from pydantic import ValidationError

    from captionbus.gateway.dispatch import GatewayFile

    if path is None:
        return GatewayFile()
    try:
        return GatewayFile.model_validate(tomllib.loads(path.read_text()))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise click.ClickException(f"gateway config {path}: {e}") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise click.ClickException(f"gateway config {path}: {where}: {first['msg']}") from None


def build_config(listen_host: str, keys: Path | None, max_upload_mb: int, concurrency: int,
                 inputs: Path | None, webhook_allow: tuple[str, ...], job_timeout: float,
                 config_file: Path | None = None, docs: str | None = None):
    # fastapi/uvicorn/nats take ~1.5 s to import: only `captionbus gateway` itself pays it, not every command.
    from captionbus.gateway.app import GatewayConfig
    from captionbus.core.bus import resolve_url

    try:
        check_bind(listen_host, keys is not None, "the gateway",
                   "pass --keys FILE with API keys (captionbus gateway add-key NAME --keys FILE)")
    except ListenError as e:
        raise click.ClickException(str(e)) from None
    from captionbus.gateway.webhooks import check_target

    file = read_gateway_file(config_file)
    allow = [*webhook_allow, *file.webhook_allow]
    secret = load().webhook_secret
    if (allow or file.subscribers or file.key_webhook_allow) and not secret:
        raise click.ClickException("webhooks need CAPTIONBUS_WEBHOOK_SECRET (the HMAC key receivers check)")
    for subscriber in file.subscribers:
        try:
            check_target(subscriber.url, allow)
        except ValueError as e:
            raise click.ClickException(f"subscriber {subscriber.name}: {e}") from None
    settings = load()
    try:
        ring = KeyRing.load(keys) if keys is not None else None
    except (OSError, ValueError) as e:
        raise click.ClickException(f"API keys: {e}") from None
    unknown = sorted(set(file.key_webhook_allow) - set(ring.hashes if ring is not None else ()))
    if unknown:
        raise click.ClickException(f"gateway config {config_file}: key_webhook_allow names {unknown[0]!r}, "
                                   "which is not a key of --keys")
    return GatewayConfig(
        settings=settings, nats_url=resolve_url(settings), keys=ring,
        max_upload_bytes=max_upload_mb * 1024 * 1024, concurrency_per_key=concurrency,
        inputs_dir=inputs, webhook_allow=allow, key_webhook_allow=file.key_webhook_allow,
        webhook_secret=secret.encode() if secret else None, job_timeout_s=job_timeout,
        webhook_subscribers=file.subscribers, webhook_lease_s=file.webhook_lease_s,
        webhook_catchup_s=file.webhook_catchup_s,
        # open only on loopback without keys: a keyed gateway on loopback may be behind a proxy
        docs=docs or ("open" if is_loopback(listen_host) and ring is None else "key"),
    )


@click.group(invoke_without_command=True, short_help="The HTTP gateway: job API, OpenAI-compatible endpoints.")
@click.option("--listen", default="127.0.0.1:8080", show_default=True, help="HOST:PORT to serve HTTP on.")
@click.option("--keys", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="API key file (hashes); required off loopback.")
@click.option("--max-upload-mb", default=4096, show_default=True, help="Largest upload accepted (413 above).")
@click.option("--concurrency", default=8, show_default=True, help="Requests in flight per key (429 above).")
@click.option("--inputs", type=click.Path(path_type=Path, file_okay=False, exists=True), default=None,
              help="A folder whose files jobs may name by `path` instead of uploading.")
@click.option("--webhook-allow", multiple=True,
              help="URL prefix callback URLs may start with (repeatable); needs CAPTIONBUS_WEBHOOK_SECRET.")
@click.option("--job-timeout", default=3600.0, show_default=True,
              help="Seconds the OpenAI endpoints wait for a job before answering 504.")
@click.option("--docs", type=click.Choice(["open", "key", "off"]), default=None,
              help="Who reads /openapi.json, /docs and /redoc: open (everyone), key (the document with an API key, "
                   "no pages) or off. Default: open on a loopback --listen without --keys, else key.")
@click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help="Gateway config file (TOML): webhook subscribers for every job, allow-list, lease.")
@click.pass_context
def gateway(ctx, listen: str, keys: Path | None, max_upload_mb: int, concurrency: int, inputs: Path | None,
            webhook_allow: tuple[str, ...], job_timeout: float, docs: str | None, config_file: Path | None) -> None:
    """HTTP gateway: job API, OpenAI-compatible audio endpoints, webhooks (docs at /docs on loopback)."""
    if ctx.invoked_subcommand is not None:
        return
    import asyncio

    from captionbus.gateway.app import create_app
    from captionbus.web.serve import end_service, serve
    from captionbus.core.bus import redact
    from captionbus.core.logging import configure_logging

    if ctx.find_root().params.get("verbose", 0) == 0:
        configure_logging(level="INFO")  # a service's log: the bus coming and going, webhooks

    try:
        host, port = parse_listen(listen)
    except ListenError as e:
        raise click.BadParameter(str(e), param_hint="--listen") from None
    config = build_config(host, keys, max_upload_mb, concurrency, inputs, webhook_allow, job_timeout, config_file, docs)
    shown = {"open": "docs: /docs", "key": "API document: /openapi.json with a key", "off": "no docs"}[config.docs]
    click.echo(f"gateway on http://{listen} ({shown}), bus {redact(config.nats_url)} "
               "(/readyz: 503 until connected)", err=True)
    try:
        code = asyncio.run(serve(create_app(config), host, port))
    except OSError as e:
        raise click.ClickException(str(e)) from None
    end_service(code)


@gateway.command("add-key", short_help="Make an API key and print it once.")
@click.argument("name")
@click.option("--keys", type=click.Path(path_type=Path, dir_okay=False), required=True, help="API key file.")
@click.option("--admin", is_flag=True, help="The key sees and acts on every job (default: only the jobs it submitted).")
@click.option("--metrics", is_flag=True, help="The key reads /metrics and nothing else (a Prometheus scraper's).")
def add_key_command(name: str, keys: Path, admin: bool, metrics: bool) -> None:
    """Make a key NAME, append its hash to FILE and print the key (shown only this once)."""
    try:
        click.echo(add_key(keys, name, admin=admin, metrics=metrics))
    except ValueError as e:
        raise click.ClickException(str(e)) from None
