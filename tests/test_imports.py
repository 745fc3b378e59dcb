"""The package's import graph (every ``import``, at module level or inside a function) has no
cycle, and the arrows DESIGN.md forbids do not exist; no module uses another's private name."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "resnet_jax"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(name: str) -> str | None:
    """The project module ``name`` refers to (a package's ``__init__``, or the nearest parent)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> dict[str, set[str]]:
    """{imported project module: names taken from it} for every import in ``module``."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name)
                if target:
                    out.setdefault(target, set())
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in MODULES:
                    out.setdefault(full, set())
                else:
                    target = _resolve(base)
                    if target:
                        out.setdefault(target, set()).add(alias.name)
    out.pop(module, None)
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def _edges(module: str) -> set[str]:
    """Imports of ``module``, plus the packages Python runs on the way to each of them."""
    out = set()
    for target in GRAPH[module]:
        parts = target.split(".")
        out.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
    return {t for t in out if t in MODULES and t != module and not module.startswith(t + ".")}


def test_no_import_cycle() -> None:
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(_edges(m)):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] if t in stack else [t]
                raise AssertionError(f"import cycle: {' -> '.join([*cycle, t])}")
            if t not in state:
                visit(t, [*stack, t])
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize(("source", "forbidden"), [
    ("resnet_jax.models", ("resnet_jax.data", "resnet_jax.train", "resnet_jax.parallel",
                           "resnet_jax.checkpoint")),
    ("resnet_jax.data", ("resnet_jax.models", "resnet_jax.train")),
    ("resnet_jax.checkpoint", ("resnet_jax.train", "resnet_jax.models", "resnet_jax.data")),
    ("resnet_jax.train.step", ("resnet_jax.train.loop", "resnet_jax.parallel")),
])
def test_forbidden_arrows(source: str, forbidden: tuple[str, ...]) -> None:
    for m in MODULES:
        if m == source or m.startswith(source + "."):
            bad = [t for t in GRAPH[m] if any(t == f or t.startswith(f + ".") for f in forbidden)]
            assert not bad, f"{m} imports {bad}"


def test_no_private_name_is_used_across_modules() -> None:
    files = [*MODULES.items(), *((p.stem, p) for p in (ROOT / "benchmarks").glob("*.py")),
             ("train", ROOT / "train.py")]
    for module, path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("resnet_jax"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{module} imports private {private} from {node.module}"
