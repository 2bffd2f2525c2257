"""Dependencies flow one way: the distillation core imports no Ray, Optuna or MLflow, and each framework is
imported only by the modules that own it."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kdsearch"
FRAMEWORKS = ("ray", "optuna", "mlflow")
# Who may import each framework (module paths relative to kdsearch/).
OWNERS = {
    "ray": {"run/trainer", "search/driver", "search/callbacks", "search/export"},  # Ray Train; Ray Tune
    "optuna": {"search/driver", "search/space_model", "search/importance"},  # sampler; define-by-run; importance
    "mlflow": {"tracking"},
}
# What must load without any framework: every layer below the search but Ray Train's wrapper, and the search's
# own pure parts.
CORE = sorted(".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
              for folder in ("core", "methods", "config", "data", "run") for p in (PACKAGE / folder).rglob("*.py")
              if p.name != "trainer.py") + ["search.ranking", "search.confidence"]


def _imported_frameworks(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
        found |= {n.split(".")[0] for n in names if n.split(".")[0] in FRAMEWORKS}
    return found


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_framework_is_imported_only_by_its_owners(path: Path) -> None:
    module = path.relative_to(PACKAGE).with_suffix("").as_posix()
    for framework in _imported_frameworks(path):
        assert any(module == owner or module.startswith(owner + "/") for owner in OWNERS[framework]), \
            f"kdsearch/{module}.py imports {framework}"


def test_the_core_loads_without_any_framework() -> None:
    code = ("import importlib, json, sys\n"
            f"for name in {CORE!r}: importlib.import_module('kdsearch.' + name)\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_tests_never_reach_a_users_ray_cluster() -> None:
    import os

    assert "RAY_ADDRESS" not in os.environ  # tests/conftest.py clears it


# The layers, lowest first: a module imports from its own layer or below. The commands are the top-level modules
# (`python -m kdsearch.<command>`) and import no other command. Tracking is a side branch that stores runs and
# knows nothing of the distillation. Imports under TYPE_CHECKING (annotations only) are not dependencies.
LAYERS = ("core", "methods", "config", "data", "run", "tracking", "search", "commands")
TRACKING_MAY_IMPORT = {"core", "config", "tracking"}
MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def _layer(module: str) -> str:
    head = module.split(".")[0]
    return head if head in LAYERS else "commands"


def _runtime_imports(path: Path) -> list[tuple[str, int]]:
    """(kdsearch module, line) for each runtime import of `path`; `from kdsearch import x` gives `x`."""
    tree = ast.parse(path.read_text())
    annotations = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(block.test) for n in ast.walk(block)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and id(node) not in annotations:
            assert not node.level, f"{path}:{node.lineno}: imports are absolute (kdsearch.<layer>.<module>)"
            if node.module == "kdsearch":
                found += [(a.name, node.lineno) for a in node.names]
            elif (node.module or "").startswith("kdsearch."):
                found.append((node.module.removeprefix("kdsearch."), node.lineno))
    return found


def test_every_folder_is_a_layer() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(LAYERS) - {"commands"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_imports_only_its_own_layer_or_below(path: Path) -> None:
    me = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    for module, line in _runtime_imports(path):
        where = f"kdsearch/{path.relative_to(PACKAGE)}:{line} imports kdsearch.{module}"
        assert LAYERS.index(_layer(module)) <= LAYERS.index(_layer(me)), f"{where}, a layer above it"
        if _layer(me) == "tracking":
            assert _layer(module) in TRACKING_MAY_IMPORT, f"{where}: tracking knows nothing of the distillation"
        if _layer(me) == "commands":
            assert _layer(module) != "commands" or module.split(".")[0] == me, f"{where}, another command"
