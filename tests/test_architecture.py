"""The layering of docs/architecture.md, checked on the code's own imports.

Each package of ``lr_monitor`` may import only from the layers below it; only
``lr_monitor/callbacks/`` imports Lightning (and ``cli/demo.py``, inside the function that
trains); importing anything outside ``callbacks/`` loads no Lightning module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lr_monitor"

#: Layer of each part of the package (first path component below lr_monitor/, or the
#: module's file name). A module may import from its own part and from lower layers.
LAYERS: dict[str, int] = {
    "tags": 0, "_validation": 0, "events": 0, "_moved": 0,
    "functional": 1, "faults": 1, "eventlog": 1,
    "recording": 2, "guard": 2, "alerts": 2,
    "callbacks": 3,
    "cli": 4,
    "__init__": 5, "lightning": 5,
}

#: Imports that reach up a layer on purpose, each imported lazily inside a function.
LAZY_UPWARD = {
    ("cli", "callbacks"),  # demo trains with the callbacks
    ("_moved", "*"),  # resolves old module paths to wherever they live now
}

LIGHTNING = ("pytorch_lightning", "lightning")


def _part(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    top = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        at_top = id(node) in top or _in_top_level_block(tree, node)
        out.extend((n, at_top) for n in names)
    return out


def _in_top_level_block(tree: ast.Module, node: ast.AST) -> bool:
    """Whether ``node`` sits in a module-level ``try``/``if`` (runs at import time)."""
    for stmt in tree.body:
        if isinstance(stmt, (ast.Try, ast.If)) and any(n is node for n in ast.walk(stmt)):
            return not (isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test))
    return False


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_the_layers(path: Path) -> None:
    part = _part(path)
    assert part in LAYERS, f"{part} has no layer in this test (and in docs/architecture.md)"
    for name, at_top in _imports(path):
        if not name.startswith("lr_monitor."):
            continue
        target = name.split(".")[1]
        if target == part:
            continue
        upward = LAYERS[target] > LAYERS[part]
        if not upward:
            continue
        allowed = (part, target) in LAZY_UPWARD or (part, "*") in LAZY_UPWARD
        assert allowed and not at_top, (
            f"{path.relative_to(PACKAGE)} imports {name} (layer {LAYERS[target]}) from layer "
            f"{LAYERS[part]}" + ("" if allowed else "; not an allowed lazy import"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_callbacks_import_lightning(path: Path) -> None:
    part = _part(path)
    for name, at_top in _imports(path):
        if name.split(".")[0] not in LIGHTNING:
            continue
        demo_trains = path == PACKAGE / "cli" / "demo.py" and not at_top
        assert part == "callbacks" or demo_trains, (
            f"{path.relative_to(PACKAGE)} imports {name}; only lr_monitor/callbacks/ may "
            "(and cli/demo.py inside the function that trains)")


def test_the_functional_layer_imports_nothing_stateful() -> None:
    for path in (PACKAGE / "functional").rglob("*.py"):
        for name, _ in _imports(path):
            if name.startswith("lr_monitor."):
                assert name.split(".")[1] in ("functional", "tags", "_validation"), (path, name)


@pytest.mark.parametrize("module", [
    "lr_monitor", "lr_monitor.cli", "lr_monitor.cli.report", "lr_monitor.cli.plot",
    "lr_monitor.guard", "lr_monitor.recording", "lr_monitor.alerts", "lr_monitor.eventlog",
    "lr_monitor.functional", "lr_monitor.tags",
])
def test_importing_outside_callbacks_does_not_load_lightning(module: str) -> None:
    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            "print([m for m in ('pytorch_lightning', 'lightning') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]", (module, out.stdout, out.stderr)


def test_old_module_paths_still_import_with_a_deprecation_warning() -> None:
    from lr_monitor._moved import MOVED, MOVED_NAMES

    code = "\n".join([
        "import importlib, warnings",
        "warnings.simplefilter('error', DeprecationWarning)",
        "from lr_monitor._moved import MOVED, MOVED_NAMES",
        "for old, new in MOVED.items():",
        "    try:",
        "        importlib.import_module(old)",
        "        raise SystemExit(f'{old}: no warning')",
        "    except DeprecationWarning as w:",
        "        assert new in str(w), w",
        "warnings.simplefilter('ignore', DeprecationWarning)",
        "for old, new in MOVED.items():",
        "    assert importlib.import_module(old) is importlib.import_module(new), old",
        "for (module, name), new in MOVED_NAMES.items():",
        "    value = getattr(importlib.import_module(module), name)",
        "    assert value is getattr(importlib.import_module(new), name), name",
        "print(len(MOVED) + len(MOVED_NAMES))",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(len(MOVED) + len(MOVED_NAMES))
