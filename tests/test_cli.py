"""The command line as one whole: every option with a config field has that field's default."""

from __future__ import annotations

import dataclasses

import typer

from gradcheck import CLASS_NAMES
from gradcheck import config as C
from gradcheck.cli import app

CONFIGS = {"make-dataset": C.DatasetConfig, "train-ddpm": C.TrainDDPMConfig,
           "eval-ddpm": C.EvalDDPMConfig, "train-classifier": C.TrainClassifierConfig,
           "run": C.RunConfig, "metrics": C.MetricsConfig, "sweep": C.SweepConfig,
           "pag": C.PagConfig}
WITHOUT_CONFIG = {"eval-classifier", "report", "bench", "precision", "survey"}


def _same(cli_default, field_default) -> bool:
    if isinstance(field_default, tuple):
        if isinstance(cli_default, str):  # comma-separated on the command line
            return tuple(v.strip() for v in cli_default.split(",")) == tuple(
                str(v) for v in field_default)
        return tuple(cli_default) == field_default
    if isinstance(field_default, int) and isinstance(cli_default, str):  # class names
        return CLASS_NAMES.index(cli_default) == field_default
    return cli_default == field_default


def test_every_cli_default_is_its_config_fields_default():
    """None on the command line means "the config's default" (or a device-dependent one)."""
    commands = typer.main.get_command(app).commands
    assert set(commands) == set(CONFIGS) | WITHOUT_CONFIG
    checked = 0
    for name, cls in CONFIGS.items():
        defaults = dataclasses.asdict(cls())
        for param in commands[name].params:
            if param.name in defaults and param.default is not None:
                assert _same(param.default, defaults[param.name]), (name, param.name)
                checked += 1
    assert checked >= 90  # the options that have a field and a fixed default


def test_cos_oracle_flag_keeps_its_old_name():
    """`--oracle` (the name before cos_oracle) still sets cos_oracle on run and sweep."""
    commands = typer.main.get_command(app).commands
    for name in ("run", "sweep"):
        for args, want in (([], None), (["--oracle"], True), (["--no-oracle"], False),
                           (["--cos-oracle"], True), (["--no-cos-oracle"], False)):
            ctx = commands[name].make_context(name, list(args))
            assert ctx.params["cos_oracle"] is want, (name, args)
