"""The command line's one error path (issue 15 point 5).

Every command's callback is wrapped (:func:`guard`, called by the root callback of :mod:`focusdpo.cli`): an
*expected* failure (bad config value or file, bad data, a corrupt or missing file, a full disk, missing
permissions, a missing optional dependency) prints one red line ``<command>: <message>`` that names the file or
field and the fix, and exits with code 2, without a traceback. ``focusdpo --debug <command>`` (or
``FOCUSDPO_DEBUG=1``) lets the exception through with its traceback. Anything else is a bug and keeps its
traceback. Commands that already turn an error into their own exit code (``typer.Exit``) are unchanged.
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable
from typing import Any

import click
import typer

# OSError numbers -> the fix that goes with them.
_OS_FIXES = {
    errno.ENOSPC: "free space on that disk or choose another output folder",
    errno.EDQUOT: "free space within your quota or choose another output folder",
    errno.EACCES: "check its permissions or choose another folder",
    errno.EPERM: "check its permissions or choose another folder",
    errno.EROFS: "the file system is read-only: choose another folder",
    errno.ENOENT: "check the path",
    errno.EISDIR: "give a file, not a folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
}


def expected_errors() -> tuple[type[BaseException], ...]:
    """The exception types that are bad input or environment, not bugs."""
    import pickle

    from PIL import Image

    from focusdpo.config import ConfigError

    types: list[type[BaseException]] = [ConfigError, ValueError, OSError, ImportError, EOFError,
                                         pickle.UnpicklingError, Image.DecompressionBombError]
    for module, name in (("focusdpo.train.checkpoint", "CheckpointError"),
                         ("focusdpo.train.run_folder", "RunFolderError"),
                         ("focusdpo.data.builder", "BuildStopped"), ("safetensors", "SafetensorError")):
        try:
            types.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(types)


def describe(e: BaseException) -> str:
    """One line for an expected error: its message, with the file and the fix for OS errors."""
    if isinstance(e, OSError) and e.strerror and e.errno in _OS_FIXES:  # from the OS, not one of our messages
        where = f" ({e.filename})" if e.filename else ""
        return f"{e.strerror}{where}: {_OS_FIXES[e.errno]}"
    if isinstance(e, EOFError):
        return f"a file ended early ({e or 'EOFError'}): it is truncated or empty; replace it"
    text = str(e) or type(e).__name__
    ours = type(e).__module__ == "builtins" or type(e).__module__.startswith("focusdpo")
    return text if ours else f"{type(e).__name__}: {text}"  # a library's error: its name tells what failed


def _guarded(name: str, callback: Callable[..., Any], debug: bool) -> Callable[..., Any]:
    @functools.wraps(callback)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return callback(*args, **kwargs)
        except (typer.Exit, click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except expected_errors() as e:
            if debug:
                raise
            typer.secho(f"{name}: {describe(e)}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from e

    run.__focusdpo_guarded__ = True  # type: ignore[attr-defined]
    return run


def guard(group: click.Command, debug: bool, prefix: str = "") -> None:
    """Wrap the callback of every (sub)command of ``group`` with the one error path (idempotent)."""
    debug = debug or os.environ.get("FOCUSDPO_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")
    for name, cmd in getattr(group, "commands", {}).items():
        full = f"{prefix}{name}"
        if isinstance(cmd, click.Group):
            guard(cmd, debug, full + " ")
        elif cmd.callback is not None and not getattr(cmd.callback, "__focusdpo_guarded__", False):
            cmd.callback = _guarded(full, cmd.callback, debug)
