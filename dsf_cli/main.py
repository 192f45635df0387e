"""Entry point of the ``dsf`` command. Each command group lives in its own module and registers itself here."""

from __future__ import annotations

import logging

import typer

app = typer.Typer(
    help="Double Sparse Factorization toolkit: compress, export, inspect, run and benchmark sparse LLMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")


def _register_commands() -> None:
    # Each module defines `register(app)`; imports stay light (torch is imported inside the commands).
    from dsf_cli import commands_bench, commands_cnn, commands_compress, commands_export, commands_runtime

    for module in (commands_compress, commands_runtime, commands_export, commands_cnn, commands_bench):
        module.register(app)


_register_commands()

if __name__ == "__main__":
    app()
