"""The package's shape, checked from the source: the daemon side never imports torch, no module-level import
cycle, the layering rules of ARCHITECTURE.md, and no module over MAX_LINES lines.

Everything but (a) reads the files with ``ast`` and imports nothing; (a) imports the daemon side in a fresh
interpreter, because this test process has long since imported everything.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "daemon"
MAX_LINES = 450
HEAVY = ("torch", "diffusers")
# Ray is an optional extra (worker.executor: ray): only these modules import it, and only inside functions, so
# that the daemon side imports without it and a daemon with local workers never loads it.
RAY_MODULES = {"daemon.worker.ray_cluster", "daemon.worker.ray_executor", "daemon.worker.ray_actor"}

# The only modules that may import torch / diffusers: they run inside the worker process.
WORKER_PROCESS_ONLY = {
    "daemon.worker.main",
    "daemon.worker.backend",
    "daemon.worker.cache",
    "daemon.worker.media",
    "daemon.worker.lora",
    "daemon.worker.speed",
    "daemon.worker.sampling",
    "daemon.worker.tiny",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    """Every module of the package, by dotted name (packages by their own name)."""
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts}


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@dataclass(frozen=True)
class Import:
    target: str  # a module of the package, the most specific one the statement names
    line: int
    module_level: bool  # False: inside a function body (runs when called, not at import)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(name: str) -> str | None:
    """The longest prefix of ``name`` that is a module of the package (``from daemon.x import y``: y may be a
    module or a name in daemon.x)."""
    known = modules()
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


@cache
def imports_of(module: str) -> tuple[Import, ...]:
    path = modules()[module]
    return parse_imports(path.read_text(), module, is_package=path.name == "__init__.py")


def parse_imports(source: str, module: str, is_package: bool = False) -> tuple[Import, ...]:
    """The package's modules that ``module`` imports, at any depth, except under ``if TYPE_CHECKING:``."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []

    def add(names: list[str], line: int, module_level: bool) -> None:
        for name in names:
            if name == "daemon" or name.startswith("daemon."):
                target = _resolve(name)
                if target and target != module and Import(target, line, module_level) not in found:
                    found.append(Import(target, line, module_level))

    def visit(nodes: list[ast.stmt], module_level: bool) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                add([a.name for a in node.names], node.lineno, module_level)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                add([f"{base}.{a.name}" for a in node.names], node.lineno, module_level)
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                visit(node.orelse, module_level)  # the body only runs under a type checker
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(node.body, False)
            else:  # class bodies, if/else, try/except/finally, with, loops: all run at import time
                for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                    children = getattr(node, field, None)
                    if isinstance(children, list):
                        visit([c for c in children if isinstance(c, ast.stmt)], module_level)
                        for c in children:  # except handlers and match cases hold statements one level down
                            if isinstance(c, (ast.ExceptHandler, ast.match_case)):
                                visit(c.body, module_level)

    visit(ast.parse(source).body, True)
    return tuple(found)


# ---- (a) the daemon side never imports torch or diffusers --------------------------------------------------


def daemon_side() -> list[str]:
    """daemon.cli, daemon.runtime.*, daemon.jobspec.*, daemon.hub.*, daemon.ops.*, daemon.worker.protocol and
    .process, daemon.testing and the top-level modules: everything but the worker-process modules and
    ``__main__`` (which would run the command line)."""
    return [m for m in modules() if m not in WORKER_PROCESS_ONLY and m != "daemon.__main__"]


IMPORT_PROBE = """
import importlib, json, sys
heavy, first, broken = {heavy!r}, {{}}, {{}}
for name in {names!r}:
    try:
        importlib.import_module(name)
    except Exception as exc:
        broken[name] = f"{{type(exc).__name__}}: {{exc}}"
    for lib in heavy:
        if lib in sys.modules and lib not in first:
            first[lib] = name
print(json.dumps({{"first": first, "broken": broken}}))
"""


def test_the_daemon_side_imports_neither_torch_nor_diffusers():
    names = daemon_side()
    assert {
        "daemon.cli",
        "daemon.runtime.daemon",
        "daemon.worker.protocol",
        "daemon.worker.process",
        "daemon.testing",
    } <= set(names)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE.format(heavy=(*HEAVY, "ray"), names=names)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["broken"] == {}, f"modules of the daemon side that fail to import: {out['broken']}"
    assert out["first"] == {}, "the daemon side must not import " + ", ".join(
        f"{lib} (first pulled in by importing {mod})" for lib, mod in out["first"].items()
    )


LOCAL_WORKERS_PROBE = """
import sys, time
from daemon.config import load_settings
from daemon.runtime.placement import make_workers
workers = make_workers(load_settings(None, {}), [], clock=time.monotonic, backend=None)
print(type(next(iter(workers.values()))).__name__, "ray" in sys.modules)
"""


def test_a_daemon_with_local_workers_never_imports_ray():
    res = subprocess.run(
        [sys.executable, "-c", LOCAL_WORKERS_PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["LocalProcessExecutor", "False"]


def ray_imports(source: str) -> list[tuple[int, bool]]:
    """(line, at module level) of each ``import ray`` / ``from ray... import`` outside ``if TYPE_CHECKING:``."""
    found: list[tuple[int, bool]] = []

    def visit(nodes: list[ast.stmt], module_level: bool) -> None:
        for node in nodes:
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            if any(n == "ray" or n.startswith("ray.") for n in names):
                found.append((node.lineno, module_level))
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                visit(node.orelse, module_level)
                continue
            inner = module_level and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                for child in getattr(node, field, None) or []:
                    visit(child.body if isinstance(child, (ast.ExceptHandler, ast.match_case)) else [child], inner)

    visit(ast.parse(source).body, True)
    return found


def test_the_ray_import_walker_on_a_planted_module():
    planted = "import ray\nif TYPE_CHECKING:\n    import ray.actor\ndef f():\n    from ray.util import state\n"
    assert ray_imports(planted) == [(1, True), (5, False)]


def test_only_the_ray_modules_import_ray_and_only_inside_functions():
    found = [
        f"{m}:{line}{'' if m in RAY_MODULES else ' (only ' + ', '.join(sorted(RAY_MODULES)) + ' may)'}"
        for m, path in modules().items()
        for line, module_level in ray_imports(path.read_text())
        if module_level or m not in RAY_MODULES
    ]
    assert RAY_MODULES <= set(modules())
    assert not found, "ray imported at module level or outside the Ray modules: " + ", ".join(found)


# ---- (b) no import cycle at module level ------------------------------------------------------------------


def module_level_graph() -> dict[str, set[str]]:
    return {m: {i.target for i in imports_of(m) if i.module_level} for m in modules()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)

    cycles = []
    for component in components:
        start = min(component)
        # breadth-first from start back to start inside the component: the shortest cycle through it
        paths = {start: [start]}
        frontier = [start]
        cycle = None
        while frontier and cycle is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & component):
                    if w == start:
                        cycle = paths[v] + [start]
                        break
                    if w not in paths:
                        paths[w] = paths[v] + [w]
                        nxt.append(w)
                if cycle:
                    break
            frontier = nxt
        cycles.append(cycle or sorted(component))
    return cycles


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]


def test_no_import_cycle_between_modules_at_module_level():
    cycles = find_cycles(module_level_graph())
    assert not cycles, "module-level import cycles (import one of them inside a function, or move code):\n" + "\n".join(
        "  " + " -> ".join(c) for c in cycles
    )


# ---- (c) layering ----------------------------------------------------------------------------------------

PURE_TOP_LEVEL = (
    "daemon.errors",
    "daemon.fsutil",
    "daemon.models",
    "daemon.memory",
    "daemon.scheduler",
    "daemon.ranking",
    "daemon.policy",
    "daemon.speed",
    "daemon.jobs",
    "daemon.control",
)


@dataclass(frozen=True)
class Rule:
    name: str
    why: str
    sources: tuple[str, ...]  # modules (or packages, with everything under them) the rule is about
    forbidden: tuple[str, ...]  # what they must not import (packages include their modules)
    allowed: tuple[str, ...] = ()  # exceptions inside ``forbidden``
    module_level_only: bool = False  # True: imports inside functions do not count
    exempt: tuple[str, ...] = ()  # sources the rule does not apply to


RULES = [
    Rule(
        "jobspec-stands-alone",
        "jobspec is the job-file language: it stands alone, below everything that runs jobs",
        ("daemon.jobspec",),
        ("daemon.runtime", "daemon.worker", "daemon.hub", "daemon.ops", "daemon.cli"),
    ),
    Rule(
        "runtime-uses-worker-protocol-only",
        "the daemon process reaches the worker only through its protocol and its executor",
        ("daemon.runtime",),
        ("daemon.worker",),
        allowed=("daemon.worker.protocol", "daemon.worker.process"),
        module_level_only=True,
    ),
    Rule(
        "worker-never-imports-runtime",
        "the worker process never reaches back into the daemon process",
        ("daemon.worker",),
        ("daemon.runtime",),
    ),
    Rule(
        "hub-stands-alone",
        "hub is the Hugging Face cache and downloads, nothing about jobs, workers or operations",
        ("daemon.hub",),
        ("daemon.runtime", "daemon.worker", "daemon.jobspec", "daemon.ops"),
    ),
    Rule(
        "pure-top-level",
        "the top-level pure modules are used by every layer and use none of the process-level ones",
        PURE_TOP_LEVEL,
        ("daemon.runtime", "daemon.worker", "daemon.ops", "daemon.cli"),
    ),
    Rule(
        "cli-is-the-top",
        "daemon.cli is the entry point: nothing but daemon.__main__ imports it",
        ("daemon",),
        ("daemon.cli",),
        exempt=("daemon.__main__", "daemon.cli"),
    ),
]


def violations(rule: Rule) -> list[str]:
    out = []
    for module in modules():
        if not any(within(module, s) for s in rule.sources) or module in rule.exempt:
            continue
        for imp in imports_of(module):
            if rule.module_level_only and not imp.module_level:
                continue
            if any(within(imp.target, f) for f in rule.forbidden) and not any(
                within(imp.target, a) for a in rule.allowed
            ):
                where = "" if imp.module_level else " (inside a function)"
                out.append(f"{module}:{imp.line} imports {imp.target}{where}")
    return out


def test_every_rule_names_real_modules():
    for rule in RULES:
        for name in (*rule.sources, *rule.forbidden, *rule.allowed, *rule.exempt):
            assert name in modules(), f"{rule.why}: {name} is not a module of daemon/"


@pytest.mark.parametrize("rule", RULES, ids=[r.name for r in RULES])
def test_layering(rule: Rule):
    found = violations(rule)
    assert not found, f"rule: {rule.why}\n" + "\n".join("  " + v for v in found)


PLANTED = """
from __future__ import annotations
import os
import daemon.errors
from daemon import jobs
from . import protocol
from .process import LocalProcessExecutor
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from daemon.runtime.daemon import Daemon
else:
    from daemon.config import Settings
try:
    from daemon.fsutil import publish
except ImportError:
    from daemon.policy import decide
class Holder:
    from daemon.memory import plan_for
    def method(self):
        from daemon.worker.tiny import build_all
def later():
    import daemon.models
"""


def test_the_import_walker_on_a_planted_module():
    found = {(i.target, i.module_level) for i in parse_imports(PLANTED, "daemon.worker.planted")}
    assert found == {
        ("daemon.errors", True),
        ("daemon.jobs", True),
        ("daemon.worker.protocol", True),
        ("daemon.worker.process", True),
        ("daemon.config", True),
        ("daemon.fsutil", True),
        ("daemon.policy", True),
        ("daemon.memory", True),
        ("daemon.worker.tiny", False),
        ("daemon.models", False),
    }


# ---- (d) module size -------------------------------------------------------------------------------------


def test_no_module_is_longer_than_the_limit():
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by responsibility): " + ", ".join(
        f"{m} ({n})" for m, n in sorted(long.items(), key=lambda kv: -kv[1])
    )
