"""The energy side's layout holds: ``estimators/`` never imports the HTTP side, its top level is
the pure core (importable with the I/O libraries gone), and each package says what is public."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENERGY = ROOT / "estimators"
#: What the pure core must import without: the HTTP side and every I/O library of the shells.
UNAVAILABLE = ("aiohttp", "redis", "prometheus_client", "pynvml", "proxy")


def _imported(path: Path) -> list[str]:
    """Every module name an ``import`` or ``from ... import`` in ``path`` names (at any depth:
    imports inside functions count too)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_no_module_of_the_energy_side_imports_the_http_side() -> None:
    found = [
        f"{p.relative_to(ROOT)}: {name}"
        for p in sorted(ENERGY.rglob("*.py"))
        for name in _imported(p)
        if name == "proxy" or name.startswith("proxy.")
    ]
    assert found == []


PURE_CORE_PROBE = """
import importlib, importlib.abc, sys

UNAVAILABLE = {unavailable!r}

class Unavailable(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in UNAVAILABLE:
            raise ImportError(f"{{name}} is unavailable in this probe")
        return None

sys.meta_path.insert(0, Unavailable())
for name in {modules!r}:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in UNAVAILABLE)
assert not leaked, leaked
print("ok")
"""


def _pure_core() -> list[str]:
    return ["estimators", *(f"estimators.{p.stem}" for p in sorted(ENERGY.glob("*.py")))]


def test_the_pure_core_imports_without_aiohttp_redis_prometheus_pynvml_or_the_proxy() -> None:
    """Every module at the top of ``estimators/`` is pure core: a process in which the I/O
    libraries and the HTTP side cannot be imported still imports each of them."""
    modules = [m for m in _pure_core() if not m.endswith("__init__")]
    assert "estimators.attribution" in modules and "estimators.llm" in modules
    code = PURE_CORE_PROBE.format(unavailable=UNAVAILABLE, modules=modules)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


#: every package of the product: each says what is public
PACKAGES = sorted(
    ".".join(p.parent.relative_to(ROOT).parts)
    for folder in ("proxy", "estimators")
    for p in (ROOT / folder).rglob("__init__.py")
)


def test_every_package_is_checked() -> None:
    assert {"estimators", "estimators.meters", "proxy", "proxy.usage", "proxy.ledger"} <= set(
        PACKAGES
    )


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_names_its_public_surface(package: str) -> None:
    """``__all__`` lists what other packages import, and every name in it exists."""
    module = importlib.import_module(package)
    public = getattr(module, "__all__", None)
    assert public, f"{package} has no __all__"
    assert len(set(public)) == len(public), f"{package}.__all__ names a name twice"
    missing = [name for name in public if not hasattr(module, name)]
    assert missing == []


def test_other_packages_take_a_public_name_from_its_package() -> None:
    """Outside ``estimators/``, a name a package of the energy side lists in ``__all__`` is
    imported from that package, not from the module behind it (``from estimators.meters import
    Reading``, not ``from estimators.meters.base import Reading``)."""
    packages = {
        name: set(importlib.import_module(name).__all__)
        for name in ("estimators", "estimators.meters", "estimators.carbon")
    }
    wrong = []
    for folder in ("proxy", "bench", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
                if not isinstance(node, ast.ImportFrom) or node.module is None:
                    continue
                package = node.module.rpartition(".")[0]
                for alias in node.names:
                    if alias.name in packages.get(package, ()):
                        wrong.append(f"{path.relative_to(ROOT)}: {node.module}.{alias.name}")
    assert wrong == []
