"""Entry point of the ``dsf`` command. Each command group lives in its own module and registers itself here."""

from __future__ import annotations

import logging

import typer

from dsf_cli.common import DEBUG_ENV, set_debug, user_errors

app = typer.Typer(
    help="Double Sparse Factorization toolkit: compress, export, inspect, run and benchmark sparse LLMs.\n\n"
    "Example (the packaged SmolLM2 at 50% density, then its size and speed against dense):\n\n"
    "    dsf compress --method dsf --density 0.5 -o runs/smol-dsf50\n\n"
    "    dsf inspect runs/smol-dsf50\n\n"
    "    dsf run --model runs/smol-dsf50 --prompt \"It is a truth\" --dense-baseline\n\n"
    "Each command's --help has its own examples.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
    debug: bool = typer.Option(
        False, "--debug", help=f"Show the traceback of an error instead of one line (or set {DEBUG_ENV}=1)."
    ),
) -> None:
    set_debug(debug)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")


def _register_commands() -> None:
    # Each module defines `register(app)`; imports stay light (torch is imported inside the commands). Every
    # command then reports user errors as one line (dsf_cli.common.user_errors).
    from dsf_cli import commands_bench, commands_cnn, commands_compress, commands_export, commands_runtime

    for module in (commands_compress, commands_runtime, commands_export, commands_cnn, commands_bench):
        module.register(app)
    _guard(app)


def _guard(group: typer.Typer) -> None:
    """Wrap every command of ``group`` and of its sub-groups in ``user_errors``."""
    for info in group.registered_commands:
        info.callback = user_errors(info.callback)
    for sub in group.registered_groups:
        _guard(sub.typer_instance)


_register_commands()

if __name__ == "__main__":
    app()
