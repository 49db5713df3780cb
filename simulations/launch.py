"""``flwr run`` that says how the run ended: the command behind ``make run``.

Flower 1.42's ``flwr run --stream`` exits 0 whatever became of the run. This launcher checks
the run configuration first (every unknown key or bad value is named, before anything
starts), streams the run's log, then reads the run's status from ``flwr ls`` and exits 0
only when it is ``finished:completed``; otherwise it prints the status and its details and
exits 1. A run whose ServerApp was killed before it could record its end gets Flower's
status in its ``results.json``.

    python -m simulations.launch [CONNECTION] [--run-config "k=v ..."] [--federation-config ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Mapping
from pathlib import Path

from deploy.flwr_cli import (
    PROJECT,
    FlowerCli,
    FlwrError,
    FlwrRun,
    check_run_config,
    results_file_in,
    settle_results,
)
from wash_fed.config import MAX_TIMEOUT, ConfigError
from wash_fed.results import read_results

__all__ = ["launch", "main"]


def launch(
    *,
    connection: str | None = None,
    run_config: str = "",
    federation_config: str | None = None,
    app: Path = PROJECT,
    env: Mapping[str, str] | None = None,
    echo: bool = True,
) -> FlwrRun:
    """``flwr run <app> [connection] --stream`` to the end, its output echoed as it comes;
    how the run ended, with the error its ``results.json`` records. A ServerApp killed
    before it recorded its end gets Flower's status written there."""
    cli = FlowerCli(None, connection, env)
    submission = cli.submit(run_config, app=app, federation_config=federation_config, echo=echo)
    ended = cli.finish(submission, timeout=MAX_TIMEOUT)
    results = results_file_in(ended.output)
    if results is None:
        return ended
    error = ""
    try:
        if settle_results(results, ended.status, ended.details):
            print(
                f"{results}: the ServerApp did not record its end; wrote {ended.status}",
                file=sys.stderr,
            )
        if results.is_file():
            error = read_results(results).error
    except (OSError, ValueError) as err:  # a full or read-only disk, a damaged file
        print(f"{results}: could not record the run's end ({ended.status}): {err}", file=sys.stderr)
    return dataclasses.replace(ended, error=error)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.launch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("connection", nargs="?", default=None, help="SuperLink connection")
    parser.add_argument("--run-config", default="", help="overrides: 'k=v ...' or a TOML file")
    parser.add_argument("--federation-config", default=None)
    args = parser.parse_args(argv)
    try:
        check_run_config(args.run_config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        ended = launch(
            connection=args.connection,
            run_config=args.run_config,
            federation_config=args.federation_config,
        )
    except FlwrError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if ended.completed:
        return 0
    print(f"\nrun {ended.run_id}: {ended.status} ({ended.details})", file=sys.stderr)
    if ended.error:
        print(f"error: {ended.error}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
