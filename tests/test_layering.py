"""The import rules between layers (issue 14, point 2), checked over the source with ``ast``.

Every ``import`` / ``from ... import`` in ``src/focusdpo`` counts, those inside functions (lazy imports) too.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "focusdpo"

# (importing package, forbidden package): ``backbones`` sits below ``train`` and ``data``; ``data`` below
# ``eval``; ``train`` and ``eval`` are siblings that share ``focusdpo.runs`` / ``focusdpo.lora``.
FORBIDDEN = [
    ("focusdpo.backbones", "focusdpo.train"),
    ("focusdpo.backbones", "focusdpo.data"),
    ("focusdpo.backbones", "focusdpo.cli"),
    ("focusdpo.data", "focusdpo.eval"),
    ("focusdpo.train", "focusdpo.eval"),
    ("focusdpo.eval", "focusdpo.train"),
]


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def module_name(path: Path) -> str:
    """``src/focusdpo/train/step.py`` -> ``focusdpo.train.step`` (a package's ``__init__`` -> the package)."""
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in ``source`` (relative imports resolved)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]  # `from focusdpo import eval`
    return out


def violations(source: str, module: str, where: str = "", is_package: bool = False) -> list[str]:
    """``"file:line: module imports target (layer rule)"`` for each forbidden import in ``source``."""
    found: dict[tuple[int, str], str] = {}
    for line, target in imported(source, module, is_package):
        for layer, forbidden in FORBIDDEN:
            if _within(module, layer) and _within(target, forbidden) and (line, forbidden) not in found:
                found[line, forbidden] = (f"{where or module}:{line}: {module} imports {target} ({layer} must not "
                                          f"import {forbidden})")
    return [found[k] for k in sorted(found)]


def test_no_forbidden_imports() -> None:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        found += violations(path.read_text(), module_name(path), str(path.relative_to(SRC.parents[1])),
                            path.name == "__init__.py")
    assert not found, "layer rules broken:\n" + "\n".join(found)


def test_checker_catches_a_planted_import() -> None:
    source = "import torch\n\ndef f():\n    from focusdpo.train.lora import load_lora\n    return load_lora\n"
    assert violations(source, "focusdpo.backbones.flux", "flux.py") == [
        "flux.py:4: focusdpo.backbones.flux imports focusdpo.train.lora (focusdpo.backbones must not import "
        "focusdpo.train)"]
    assert violations("from ..eval import toy_metrics\n", "focusdpo.data.regenerate")
    assert violations("from focusdpo import train\n", "focusdpo.eval.methods")
    assert not violations("from focusdpo.lora import load_lora\n", "focusdpo.backbones.flux")
    assert not violations(source, "focusdpo.cli")


# Outside ``backbones/`` no code compares against or picks by a backbone's name (the registry does). Allowed: the
# config's default value, and pretraining, which builds the tiny base and nothing else.
BACKBONE_NAMES = {"flux-tiny", "flux", "flux2"}
NAMES_ALLOWED = {"focusdpo/config.py": {"flux-tiny"}, "focusdpo/train/pretrain.py": {"flux-tiny"}}


def named_backbones(source: str) -> list[tuple[int, str]]:
    """``(line, name)`` of every string constant that is exactly a built-in backbone name (docstrings and messages
    mention names inside longer text, which is fine)."""
    return [(node.lineno, node.value) for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in BACKBONE_NAMES]


def test_nothing_outside_backbones_names_a_backbone() -> None:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = str(path.relative_to(SRC.parent))
        if rel.startswith("focusdpo/backbones/"):
            continue
        allowed = NAMES_ALLOWED.get(rel, set())
        found += [f"{rel}:{line}: {name!r}" for line, name in named_backbones(path.read_text()) if name not in allowed]
    assert not found, "backbone names outside backbones/ (use the registry):\n" + "\n".join(found)
    assert named_backbones('if cfg.model.backbone == "flux2":\n    pass\n') == [(1, "flux2")]
