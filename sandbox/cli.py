"""``notify sandbox`` and ``notify dev``: the dev tooling's commands, added to ``notify``.

They are declared as entry points (group ``notify.commands`` in pyproject.toml) and found by
``worker.front.cli`` when asked for, so the production package never imports this one: an image
without ``sandbox/`` simply has no such commands.
"""

from __future__ import annotations

import sys

import click

from worker.front.cli import friendly_errors


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def sandbox(args: tuple[str, ...]) -> None:
    """Run the local Concur v4 sandbox (see `notify sandbox --help`)."""
    from sandbox import concur

    sys.exit(concur.main(list(args)))


@click.command()
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 32))
@click.option("--sandbox-port", default=8099, show_default=True, type=int)
@click.option("--sandbox-latency-ms", default=20.0, show_default=True, type=float)
@click.option("--api-port", default=8000, show_default=True, type=int)
@click.option("--flower-port", default=5555, show_default=True, type=int)
@friendly_errors
def dev(
    workers: int, sandbox_port: int, sandbox_latency_ms: float, api_port: int, flower_port: int
) -> None:
    """Run the whole stack locally: Redis (if none answers), sandbox, worker(s), API, Flower.

    Writes what `notify` in another shell needs to reach it into ./.env (made from
    ./.env.example when missing).
    """
    from sandbox.devstack import run_dev

    sys.exit(
        run_dev(
            workers=workers,
            sandbox_port=sandbox_port,
            latency_ms=sandbox_latency_ms,
            api_port=api_port,
            flower_port=flower_port,
        )
    )
