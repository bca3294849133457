"""The house is one-way: imports flow down the layers of DESIGN.md, never in a circle, and no
module grows past ~500 lines without saying why.

    0  errors, files, images, schedules, parameterization, provenance, compile_cache, compiler,
       host_memory
    1  models
    2  samplers, convert, data, sharding, checkpoint, config
    3  sampling, metrics, analytic
    4  train
    5  pipelines
    6  cli

A module imports only its own layer or lower (function-level imports count too). On top of
that, samplers never import models (they meet in `sampling.py` through a plain model_fn).
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jaxdiff"

LAYERS = {
    "errors": 0, "files": 0, "images": 0, "schedules": 0, "parameterization": 0,
    "compile_cache": 0, "compiler": 0, "host_memory": 0, "provenance": 0,
    "models": 1,
    "samplers": 2, "convert": 2, "data": 2, "sharding": 2, "checkpoint": 2, "config": 2,
    "sampling": 3, "metrics": 3, "analytic": 3,
    "train": 4,
    "pipelines": 5,
    "cli": 6,
}
MAX_LINES = 500
LONG_FILE_MARK = "Why this file is long:"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: pathlib.Path, name: str, known: set[str]) -> set[str]:
    """The jaxdiff modules `path` imports, anywhere in the file (relative imports resolved;
    `from pkg import mod` counts as importing pkg.mod when that is a module)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:          # `import jaxdiff.a.b` -> the module a.b
                target = target.rpartition(".")[0]
            if target and target.startswith("jaxdiff") and target != name:
                out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_every_top_level_module_has_a_layer():
    missing = sorted({m.split(".")[1] for m in _modules() if "." in m} - set(LAYERS))
    assert not missing, f"add these modules to LAYERS (and to DESIGN.md's layer list): {missing}"


def test_imports_flow_down_the_layers():
    bad = []
    for module, targets in _graph().items():
        here = _layer(module)
        for target in targets:
            there = _layer(target)
            if here is not None and there is not None and there > here:
                bad.append(f"{module} (layer {here}) imports {target} (layer {there})")
    assert not bad, "\n".join(sorted(bad))


def test_samplers_never_import_models_and_models_import_only_layer_zero():
    bad = []
    for module, targets in _graph().items():
        if module.startswith("jaxdiff.samplers"):
            bad += [f"{module} imports {t}" for t in targets if t.startswith("jaxdiff.models")]
        if module.startswith("jaxdiff.models"):
            bad += [f"{module} imports {t}" for t in targets
                    if not t.startswith("jaxdiff.models") and _layer(t) != 0]
    assert not bad, "\n".join(sorted(bad))


def test_training_imports_no_pipeline():
    bad = [f"{m} imports {t}" for m, targets in _graph().items() if m.startswith("jaxdiff.train")
           for t in targets if t.startswith("jaxdiff.pipelines") or t == "jaxdiff.cli"]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = _graph()
    # A package's __init__ is imported whenever one of its modules is; an edge from a package
    # to its own submodules (re-exports) and back is the package, not a cycle.
    def edges(m):
        return {t for t in graph.get(m, ()) if not (t.startswith(m + ".") or m.startswith(t + "."))}

    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(edges(m)):
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_a_bad_import(tmp_path, monkeypatch):
    """The rules above can fail: a model importing a sampler breaks them."""
    fake = {"jaxdiff.models.fake": {"jaxdiff.samplers.base"}, "jaxdiff.samplers.base": {"jaxdiff.models.fake"}}
    monkeypatch.setattr(__import__(__name__), "_graph", lambda: fake)
    with pytest.raises(AssertionError, match="layer 1.*layer 2"):
        test_imports_flow_down_the_layers()
    with pytest.raises(AssertionError, match="cycle|->"):
        test_no_import_cycles()


def test_pipelines_sample_through_the_one_core():
    """Noise, padding, guidance, the scan and decoding live in pipelines/core.py: no other pipeline
    (nor the trainer) calls the sampling loop or the guidance wrapper itself."""
    bad = []
    for path in sorted((PACKAGE / "pipelines").glob("*.py")) + sorted((PACKAGE / "train").glob("*.py")):
        if path.name == "core.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("sample", "cfg") \
                    and isinstance(node.value, ast.Name) and node.value.id == "sampling":
                bad.append(f"{path.relative_to(PACKAGE)}:{node.lineno} calls sampling.{node.attr}")
    assert not bad, "\n".join(bad)
    # A front end is a pipeline module that plans a sampler; it hands the plan to the core.
    front_ends = [p for p in (PACKAGE / "pipelines").glob("*.py")
                  if p.name != "core.py" and ("samplers." in p.read_text() or "core.Job(" in p.read_text())]
    assert len(front_ends) >= 3, [p.name for p in front_ends]
    assert all("core.run(" in p.read_text() for p in front_ends), [p.name for p in front_ends]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_short_or_say_why(path):
    lines = path.read_text().count("\n")
    if lines > MAX_LINES:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert LONG_FILE_MARK in doc, (f"{path.name} has {lines} lines: split it by concern, or give the reason "
                                       f"in its docstring after '{LONG_FILE_MARK}'")
