"""The ``focusdpo`` command line (typer).

Commands import their implementation lazily so that ``focusdpo --help`` stays fast. Every command that
reads a config takes ``--config FILE`` (default: the packaged ``toy.yaml``) and trailing ``key.sub=value``
overrides.
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    name="focusdpo",
    help="FocusDPO: preference post-training for multi-subject personalized image generators.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config (default: the packaged toy.yaml).")
OverridesArg = typer.Argument(None, help="Config overrides, key.sub=value.", show_default=False)


@app.callback()
def _root() -> None:
    """FocusDPO: preference post-training for multi-subject personalized image generators."""


def _load(config: Path | None, overrides: list[str] | None):
    from focusdpo.config import ConfigError, load_config

    try:
        return load_config(config, overrides or [])
    except ConfigError as e:
        typer.secho(f"config error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from e


@app.command("config")
def config_cmd(config: Path | None = ConfigOpt, overrides: list[str] | None = OverridesArg) -> None:
    """Print the resolved config (YAML) after overrides."""
    typer.echo(_load(config, overrides).to_yaml(), nl=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
