"""fpdt_ext's import graph: testing -> mcore -> core -> memory, all -> runtime and profiling; no cycle.

core and memory are plain torch (no megatron-core); runtime and profiling import nothing of ours.
Read from the source (ast), imports inside functions included.
"""

from __future__ import annotations

import ast
import os

from tests.helpers import ROOT

PACKAGE = os.path.join(ROOT, "fpdt_ext")
# which parts each part may import (besides itself)
# (profiling: the named ranges, a leaf like runtime that every part may use)
ALLOWED = {"runtime": set(), "profiling": set(), "memory": {"runtime", "profiling"},
           "core": {"memory", "runtime", "profiling"}, "mcore": {"core", "memory", "runtime", "profiling"},
           "testing": {"mcore", "core", "memory", "runtime", "profiling"}, "": None}
PLAIN_TORCH = {"runtime", "profiling", "memory", "core"}


def _modules():
    for directory, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                yield rel.removesuffix(".__init__"), path


def _imports(path):
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_parts_import_only_downward_and_core_and_memory_are_plain_torch():
    modules = dict(_modules())
    problems = []
    for module, path in modules.items():
        part = _part(module)
        for name in _imports(path):
            if name.startswith("megatron") and part in PLAIN_TORCH:
                problems.append(f"{module} imports {name}")
            if name.startswith("fpdt_ext.") and ALLOWED[part] is not None:
                target = _part(name)
                if target != part and target not in ALLOWED[part]:
                    problems.append(f"{module} ({part}) imports {name} ({target})")
    assert not problems, problems


def test_no_import_cycle():
    modules = dict(_modules())
    edges = {m: {n for n in _imports(p) if n in modules and n != m} for m, p in modules.items()}
    state = {}

    def visit(m, trail):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import cycle: " + " -> ".join(trail + [m])
        state[m] = "open"
        for n in sorted(edges[m]):
            if n != "fpdt_ext":  # the package itself re-exports core's API
                visit(n, trail + [m])
        state[m] = "done"

    for m in sorted(modules):
        visit(m, [])
