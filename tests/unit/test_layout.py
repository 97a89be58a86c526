"""The package layout's rules, checked on the source: a broken rule fails with its reason.

The sub-packages follow a claim's journey (``domain`` rules, ``store``, ``claims``,
``fulfilment``, ``http``) with development tooling apart (``local``); ``cli`` wires processes.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "claim_service"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE
SUBPACKAGES = ("domain", "store", "claims", "fulfilment", "http", "local")
# What each unit of the package may import of the project (besides itself).
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "config": {"errors"},
    "metrics": set(),
    "domain": {"errors"},
    "store": {"errors", "config", "metrics", "domain"},
    "claims": {"errors", "config", "metrics", "domain", "store"},
    "fulfilment": {"errors", "config", "metrics", "domain", "store"},
    "http": {"errors", "config", "metrics", "domain", "store", "claims", "fulfilment"},
    "local": {"errors", "config", "metrics", "domain", "store", "claims", "fulfilment", "http"},
    "cli": {*SUBPACKAGES, "errors", "config", "metrics", "__init__"},
    "__main__": {"cli"},
    "__init__": set(),
}
# Packages that must not import aiohttp's server side.
NO_WEB = ("domain", "store", "claims", "fulfilment")
MAX_LINES = 400


@dataclass
class Module:
    name: str  # dotted, relative to the package: "store.keyspace"
    lines: int
    imports: set[str] = field(default_factory=set)  # project units and external modules
    nested: list[str] = field(default_factory=list)  # project imports inside functions
    literals: list[str] = field(default_factory=list)


def unit_of(name: str) -> str:
    """``store.keyspace`` -> ``store``; a top-level module is its own unit."""
    return name.split(".")[0]


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = f"{PACKAGE}.{module}".split(".")[: -node.level]
    return ".".join([*base, node.module] if node.module else base)


def parse(path: Path) -> Module:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    name = name.removesuffix(".__init__") if name != "__init__" else name
    tree = ast.parse(path.read_text(), str(path))
    module = Module(name, len(path.read_text().splitlines()))
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    nested_nodes = {id(n) for f in functions for n in ast.walk(f)}
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, node)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
            if any(a.name == "PREFIX" for a in node.names):
                module.literals.append("claim:")  # builds keys of its own from the prefix
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            module.literals.append(node.value)
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                rest = target.removeprefix(PACKAGE).lstrip(".")
                if not rest:
                    continue  # "from claim_service import x" names the unit in x
                module.imports.add(unit_of(rest))
                if id(node) in nested_nodes:
                    module.nested.append(target)
            else:
                module.imports.add(target)
    return module


def load() -> dict[str, Module]:
    return {m.name: m for m in (parse(p) for p in sorted(ROOT.rglob("*.py")))}


def violations(modules: dict[str, Module]) -> list[str]:
    """Every broken rule, as a sentence naming the module."""
    found: list[str] = []
    for module in modules.values():
        unit = unit_of(module.name)
        allowed = ALLOWED.get(unit)
        if allowed is None:
            found.append(f"{module.name}: not in a known package ({', '.join(SUBPACKAGES)})")
            continue
        project = {i for i in module.imports if i in ALLOWED}
        for imported in sorted(project - allowed - {unit}):
            found.append(f"{module.name} imports {imported}, which {unit} may not")
        for target in module.nested:
            found.append(f"{module.name} imports {target} inside a function")
        if unit in NO_WEB and any(
            i == "aiohttp.web" or i.startswith("aiohttp.web") for i in module.imports
        ):
            found.append(f"{module.name} imports aiohttp.web: only http (and local) serve")
        if unit != "store" and any(
            lit.startswith("claim:") or lit.endswith(".lua") for lit in module.literals
        ):
            found.append(f"{module.name} names a Redis key or Lua script: those live in store")
        if module.lines > MAX_LINES:
            found.append(f"{module.name} has {module.lines} lines (at most {MAX_LINES})")
    found += _cycles(modules)
    return found


def _cycles(modules: dict[str, Module]) -> list[str]:
    graph: dict[str, set[str]] = {}
    for module in modules.values():
        unit = unit_of(module.name)
        graph.setdefault(unit, set()).update(
            i for i in module.imports if i in ALLOWED and i != unit
        )
    found = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append(
                    "import cycle: "
                    + " -> ".join([*path, node, nxt][path.index(nxt) if nxt in path else 0 :])
                )
            elif state.get(nxt) is None:
                visit(nxt, [*path, node])
        state[node] = 2

    for unit in sorted(graph):
        if unit not in state:
            visit(unit, [])
    return found


def test_the_package_keeps_its_layout_rules() -> None:
    modules = load()
    assert {unit_of(n) for n in modules} >= set(SUBPACKAGES)
    problems = violations(modules)
    assert not problems, "layout rules broken:\n" + "\n".join(problems)


def test_each_package_says_what_it_owns_and_may_import() -> None:
    for package in SUBPACKAGES:
        doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text()))
        assert doc and "may import" in doc.lower(), f"{package}/__init__.py needs a docstring"


def test_the_checker_catches_each_kind_of_violation() -> None:
    """The rules are not vacuous: a tree breaking each of them is reported."""
    broken = {
        "domain.rules": Module("domain.rules", 10, {"store", "errors"}),
        "store.keys": Module("store.keys", 10, {"claims"}),
        "claims.engine": Module("claims.engine", 10, {"store", "aiohttp.web"}),
        "fulfilment.worker": Module(
            "fulfilment.worker", 500, {"store"}, ["claim_service.http.app"], ["claim:x"]
        ),
        "http.app": Module("http.app", 10, {"local"}),
        "local.demo": Module("local.demo", 10, {"cli"}),
        "odd": Module("odd", 10),
    }
    problems = "\n".join(violations(broken))
    for expected in (
        "domain.rules imports store, which domain may not",
        "store.keys imports claims, which store may not",
        "claims.engine imports aiohttp.web",
        "fulfilment.worker imports claim_service.http.app inside a function",
        "fulfilment.worker names a Redis key",
        "fulfilment.worker has 500 lines",
        "http.app imports local, which http may not",
        "local.demo imports cli, which local may not",
        "odd: not in a known package",
        "import cycle: claims -> store -> claims",
    ):
        assert expected in problems, f"{expected!r} not reported in:\n{problems}"
