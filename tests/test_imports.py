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
# Who may import each framework (module paths relative to kdsearch/, any depth of `tracking/`).
OWNERS = {
    "ray": {"train", "tune", "tune_callbacks", "export"},  # Ray Train: train; Ray Tune: the search driver
    "optuna": {"tune", "space_model", "importance"},  # the sampler; define-by-run types; param importance
    "mlflow": {"tracking"},
}
CORE = ["config", "registry", "losses", "layer_maps", "bridges", "bridges.ted", "bridges.units", "step", "loop",
        "models", "tasks", "data", "encoding", "metrics", "evaluation", "cache", "prepare", "validate", "sizing",
        "spaces", "space_model", "search", "ranking", "optimiser", "precision", "teacher_cache", "relations"]


def _imported_frameworks(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
        found |= {n.split(".")[0] for n in names if n.split(".")[0] in FRAMEWORKS}
    return found


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_framework_is_imported_only_by_its_owners(path: Path) -> None:
    module = path.relative_to(PACKAGE).with_suffix("").parts
    for framework in _imported_frameworks(path):
        assert module[0] in OWNERS[framework], f"kdsearch/{'/'.join(module)}.py imports {framework}"


def test_the_core_loads_without_any_framework() -> None:
    code = ("import importlib, json, sys\n"
            f"for name in {CORE!r}: importlib.import_module('kdsearch.' + name)\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_tests_never_reach_a_users_ray_cluster() -> None:
    import os

    assert "RAY_ADDRESS" not in os.environ  # tests/conftest.py clears it


def _package_imports(path: Path) -> set[str]:
    """The kdsearch modules `path` imports (top level names: `tracking`, not `tracking.store`)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        module = node.module or ""
        if node.level == 1 or module.startswith("kdsearch"):
            inner = module.removeprefix("kdsearch").lstrip(".") if node.level == 0 else module
            found |= {inner.split(".")[0]} if inner else {a.name for a in node.names}
    return found


# The loss math and layer maps know nothing of tasks, data, models or runs; what they share with the data layer
# (the task kinds, the ignored label) lives in `kinds`, below both.
PURE = {"kinds": set(), "registry": {"config"}, "losses": {"kinds", "registry"},
        "layer_maps": {"config", "registry"}}
# Commands that read a finished model or search import no other command for a helper.
NOT_IMPORTED = {"evaluate": {"leaderboard", "report", "tune", "train"}, "analyze": {"report", "tune", "train"},
                "models": {"prepare", "loop", "train", "tune"}, "leaderboard": {"tune", "train", "report"}}


@pytest.mark.parametrize("module", sorted(PURE))
def test_the_loss_math_imports_only_what_lies_below_it(module: str) -> None:
    assert _package_imports(PACKAGE / f"{module}.py") <= PURE[module]


@pytest.mark.parametrize("module", sorted(NOT_IMPORTED))
def test_modules_do_not_reach_across_layers_for_a_helper(module: str) -> None:
    assert not _package_imports(PACKAGE / f"{module}.py") & NOT_IMPORTED[module]


# A bridge method is pure method code: the loss math, the layer maps, the config schema, the cache's keys and
# the model inputs below it; never the run layer (models, prepare, loop), a command, or a framework.
BRIDGE_MAY_IMPORT = {"config", "registry", "kinds", "losses", "layer_maps", "encoding", "cache", "bridges"}


@pytest.mark.parametrize("path", sorted((PACKAGE / "bridges").glob("*.py")), ids=lambda p: p.name)
def test_bridge_methods_import_only_what_lies_below_them(path: Path) -> None:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("kdsearch")):
            module = node.module or ""
            top = "bridges" if node.level == 1 else (module.removeprefix("kdsearch.").split(".")[0] or "kdsearch")
            found.add(top)
    assert found <= BRIDGE_MAY_IMPORT, f"{path.name} imports {sorted(found - BRIDGE_MAY_IMPORT)}"
