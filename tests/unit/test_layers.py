"""The package's imports run one way: each module imports only from its own layer or the
layers below (docs/architecture.md), and no cycle exists, function-level imports included."""

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "earlyexit_brain")

#: Layers, lowest first (docs/architecture.md); a module is matched by its longest prefix.
LAYERS = [
    [
        "earlyexit_brain",
        "earlyexit_brain.utils",
        "earlyexit_brain.options",
        "earlyexit_brain.files",
        "earlyexit_brain.safe_load",
        "earlyexit_brain.records",
        "earlyexit_brain.checkpoints",
        "earlyexit_brain.policy_bundle",
        "earlyexit_brain.controller_numpy",
        "earlyexit_brain.runtime",
    ],
    ["earlyexit_brain.data", "earlyexit_brain.audio_check", "earlyexit_brain.dataio"],
    ["earlyexit_brain.models"],
    ["earlyexit_brain.losses", "earlyexit_brain.decoding"],
    ["earlyexit_brain.latency", "earlyexit_brain.controller", "earlyexit_brain.policies", "earlyexit_brain.dynamic"],
    [
        "earlyexit_brain.brain",
        "earlyexit_brain.brain_options",
        "earlyexit_brain.inference",
        "earlyexit_brain.export",
        "earlyexit_brain.report",
        "earlyexit_brain.evaluation",
        "earlyexit_brain.onnx_graphs",
        "earlyexit_brain.onnx_export",
    ],
    ["earlyexit_brain.config", "earlyexit_brain.experiment", "earlyexit_brain.hub", "earlyexit_brain.transcribe"],
]


def modules():
    found = {}
    for folder, _, names in os.walk(ROOT):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                found[rel[:-9] if rel.endswith(".__init__") else rel] = path
    return found


def imports(name, path):
    """Package modules that ``name`` imports (top level and inside functions)."""
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.startswith("earlyexit_brain"):
                out.add(base)
                out.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("earlyexit_brain"))
    return out


def layer(name):
    best = None
    for i, group in enumerate(LAYERS):
        for prefix in group:
            if name == prefix or name.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[1]):
                    best = (i, prefix)
    assert best is not None, f"{name} is in no layer of LAYERS (add it, and to docs/architecture.md)"
    return best[0]


def graph():
    mods = modules()
    return {name: {m for m in imports(name, path) if m in mods and m != name} for name, path in mods.items()}


def test_every_module_has_a_layer():
    for name in modules():
        layer(name)


def test_no_import_points_up_the_layers():
    upward = [
        f"{name} (layer {layer(name)}) imports {dep} (layer {layer(dep)})"
        for name, deps in graph().items()
        for dep in deps
        if layer(dep) > layer(name)
    ]
    assert upward == []


def test_no_import_cycle():
    edges, state, cycles = graph(), {}, []

    def visit(node, stack):
        state[node] = "active"
        for dep in edges[node]:
            if dep == "earlyexit_brain":
                continue  # the package's __init__ holds only the version
            if state.get(dep) == "active":
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for name in edges:
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_the_checker_sees_a_violation(tmp_path):
    """A mutation check of the checker itself: an upward import is reported."""
    assert layer("earlyexit_brain.models.pipeline") < layer("earlyexit_brain.policies")
    path = tmp_path / "m.py"
    path.write_text("from ..policies import make_policy\n")
    assert "earlyexit_brain.policies" in imports("earlyexit_brain.models.m", str(path))
