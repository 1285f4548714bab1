"""`captionbus auth-callout`: the per-connection identity service of a secured fleet
(captionbus/authcallout.py; deploy/README.md, "Per-connection identity")."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import click

from captionbus.cli.common import end_of_service, insecure_option, main, require_secure, service_logging
from captionbus.cli.errors import UserError
from captionbus.core.settings import load


@main.group("auth-callout")
def auth_callout() -> None:
    """Per-connection identity for a secured bus (NATS auth callout)."""


@auth_callout.command("keygen")
@click.option("--seed-file", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the new signing key (mode 0600); refused if it exists.")
def keygen(seed_file: Path) -> None:
    """Make the callout's signing key.

    Prints its public key: the servers' `auth_callout.issuer`."""
    from captionbus.authcallout import new_account_seed, public_key

    if seed_file.exists():
        raise UserError(f"{seed_file} exists: the servers trust its key; remove it yourself to make another")
    seed = new_account_seed()
    fd = os.open(seed_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(seed + "\n")
    click.echo(public_key(seed))


@auth_callout.command("run")
@click.option("--accounts", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The users, bcrypt passwords and roles to grant (deploy/nats/accounts.conf, which includes "
                   "roles.conf); checked with `nats-server -t`.")
@click.option("--seed-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The signing key from `captionbus auth-callout keygen`.")
@insecure_option
def run(accounts: Path, seed_file: Path, insecure: bool) -> None:
    """Answer the servers' authorization requests until stopped. Log in as one of the servers'
    `auth_users` (CAPTIONBUS_NATS_USER/_PASSWORD, not in callout mode)."""
    from captionbus.authcallout import Callout, ConfError, check_with_server, read_users
    from captionbus.core.bus import connect, resolve_url
    from captionbus.runner import stop_on_signals

    service_logging()
    settings = load().model_copy(update={"nats_auth_callout": False})  # its own login is a static user
    url = resolve_url(settings)
    require_secure(url, settings, insecure)
    try:
        callout = Callout(read_users(accounts), seed_file.read_text().strip())
        check_with_server(accounts)  # the servers could load it too (static mode reads the same file)
    except (ConfError, OSError, ValueError) as error:
        raise UserError(f"cannot load the callout's users or key: {error}") from None

    async def serve() -> int | None:
        nc = await connect(url, "captionbus-auth-callout", settings)
        stop, stopped_by = stop_on_signals()
        ready = asyncio.Event()

        async def say_ready() -> None:
            await ready.wait()
            click.echo(f"auth callout answering for {len(callout.users)} users", err=True)

        told = asyncio.create_task(say_ready())
        try:
            await callout.serve(nc, stop, ready)
            return stopped_by[0] if stopped_by else None
        finally:
            told.cancel()
            await nc.drain()

    end_of_service(asyncio.run(serve()))
