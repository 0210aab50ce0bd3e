"""The gradcheck command line: one thin typer command per stage, no logic beyond arguments."""

from __future__ import annotations

import sys

import click
import typer

import gradcheck
from gradcheck.utils import GradcheckError

app = typer.Typer(
    name="gradcheck",
    help="Why classifier guidance works or fails: data, DDPM, classifiers, guided sampling, "
    "metrics and reports.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gradcheck {gradcheck.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """gradcheck: instrumented classifier guidance for diffusion models."""


# ---- commands: each section belongs to the module named in its header -----------------------
# [make-dataset: data/sportballs.py]
# [train-ddpm, eval-ddpm: train_ddpm.py]
# [train-classifier: train_classifier.py]
# [run: sampler.py]
# [metrics: metrics.py]
# [pag: pag.py]
# [sweep, report: sweep.py, report/]
# [survey: survey.py]
# [bench: bench.py]


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors print one line and exit 2; Ctrl-C exits 130."""
    try:
        rv = app(args=argv, standalone_mode=False)
    except GradcheckError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (KeyboardInterrupt, click.exceptions.Abort):
        typer.echo("error: interrupted; partial outputs were removed", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    sys.exit(rv if isinstance(rv, int) else 0)

