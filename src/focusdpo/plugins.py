"""Plug-ins: modules that register objectives (:func:`focusdpo.objectives.register_objective`) or backbones
(:func:`focusdpo.backbones.register_backbone`) from outside the package.

A plug-in is imported once, before the registries are first read (config validation reads them), from:

- the ``focusdpo.plugins`` entry-point group of installed packages (``pyproject.toml``::

      [project.entry-points."focusdpo.plugins"]
      my_objective = "mypkg.my_objective"

  ), and
- ``FOCUSDPO_PLUGINS``, a comma-separated list of module names (the CLI's ``--plugin MODULE`` sets it, so processes
  that ``accelerate launch`` starts import the same ones).

A plug-in that fails to import raises :class:`PluginError` naming it and the reason.
"""

from __future__ import annotations

import functools
import importlib
import os
from importlib import metadata

ENV = "FOCUSDPO_PLUGINS"
GROUP = "focusdpo.plugins"
_loaded: set[str] = set()
_loading = False


class PluginError(ImportError):
    """A plug-in module could not be imported; the message names it and where it was listed."""


@functools.cache
def _entry_point_modules() -> tuple[tuple[str, str], ...]:
    """The ``focusdpo.plugins`` entry points of the installed packages, scanned once per process (a scan reads every
    distribution's metadata: milliseconds, and the registries are read on every training step)."""
    return tuple((ep.value.split(":")[0].strip(), f"entry point {ep.name!r} of {GROUP}")
                 for ep in metadata.entry_points(group=GROUP))


def plugin_modules() -> list[tuple[str, str]]:
    """``[(module, where it is listed)]`` from the entry points, then ``FOCUSDPO_PLUGINS``, without repeats."""
    found: list[tuple[str, str]] = list(_entry_point_modules())
    for name in os.environ.get(ENV, "").split(","):
        if name.strip():
            found.append((name.strip(), ENV))
    seen: set[str] = set()
    return [(m, w) for m, w in found if not (m in seen or seen.add(m))]


def load_plugins() -> list[str]:
    """Import every listed plug-in not imported yet; returns the modules imported by this call."""
    global _loading
    if _loading:  # a plug-in reading a registry while it is being imported
        return []
    new = []
    _loading = True
    try:
        for module, where in plugin_modules():
            if module in _loaded:
                continue
            _loaded.add(module)
            try:
                importlib.import_module(module)
            except Exception as e:  # noqa: BLE001 - any failure of a user module is reported the same way
                _loaded.discard(module)
                raise PluginError(f"plug-in {module!r} (from {where}) failed to import: {type(e).__name__}: {e}") from e
            new.append(module)
    finally:
        _loading = False
    return new


def add_plugins(modules: list[str]) -> list[str]:
    """Add ``modules`` to ``FOCUSDPO_PLUGINS`` (so child processes see them) and import them now."""
    current = [m for m in os.environ.get(ENV, "").split(",") if m.strip()]
    os.environ[ENV] = ",".join(current + [m for m in modules if m not in current])
    return load_plugins()
