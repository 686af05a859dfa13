"""The Python package stays in layers (issue 17): every module of mtia_alloc is parsed with
`ast`, the graph of imports between mtia_alloc's own modules is built, and the test fails on

  (a) a cycle in that graph;
  (b) an import from a lower layer to a higher one (LAYERS below is the one table of layers);
  (c) an import of an mtia_alloc module outside the import block at the top of its file: inside
      a def or class, inside an if/try that is not itself at the top, or after the first
      statement that is not an import (a docstring, imports, and top-level if/try blocks
      holding only imports make the block); importlib.import_module / __import__ count too.

Python also runs a submodule's parent package first; those implicit edges are not in the
graph (every module would otherwise depend on the façade, mtia_alloc/__init__.py). What
`import mtia_alloc` loads is checked at run time instead: no tool and no torch.

The checker is a plain function of {module: (source, is_package)}, so the self-checks at
the end feed it synthetic packages with a cycle, an upward import and a delayed import,
and assert that each is caught."""
import ast
import pathlib
import subprocess
import sys

import mtia_alloc

ROOT = "mtia_alloc"
PACKAGE_DIR = pathlib.Path(mtia_alloc.__file__).resolve().parent

# The layers, lowest first. A module may import modules of its own layer (the graph must
# stay acyclic) or of lower layers, never of higher ones.
STATE, CORE, PUBLIC, FACADE, TOP = 0, 1, 2, 3, 4
LAYERS = {
    # private state: the binding, errors, settings, lazy init, device parsing, formatting,
    # and the registries that used to pull modules into a circle (captures, kernel errors)
    "mtia_alloc._C": STATE,
    "mtia_alloc._errors": STATE,
    "mtia_alloc._settings": STATE,
    "mtia_alloc._format": STATE,
    "mtia_alloc._kernel_errors": STATE,
    "mtia_alloc._lazy_init": STATE,
    "mtia_alloc._device_arg": STATE,
    "mtia_alloc._capture": STATE,
    "mtia_alloc._alloc_conf": STATE,
    # devices and streams, kernel submission, history, pools, statistics, the snapshot view
    "mtia_alloc.devices": CORE,
    "mtia_alloc.streams": CORE,
    "mtia_alloc._kernels": CORE,
    "mtia_alloc.history": CORE,
    "mtia_alloc.mtrace": CORE,
    "mtia_alloc.raw_allocators": CORE,
    "mtia_alloc.pools": CORE,
    "mtia_alloc.stats": CORE,
    "mtia_alloc.viz": CORE,
    "mtia_alloc.viz.load": CORE,
    "mtia_alloc.viz.render": CORE,
    "mtia_alloc.viz.segments": CORE,
    "mtia_alloc.viz.model": CORE,
    "mtia_alloc.viz.frames": CORE,
    "mtia_alloc.viz.runner": CORE,
    "mtia_alloc.viz.reports": CORE,
    "mtia_alloc.viz._pickle_reader": CORE,
    "mtia_alloc.viz.columns": CORE,
    "mtia_alloc.viz.timeline": CORE,
    # the public modules
    "mtia_alloc.memory": PUBLIC,
    "mtia_alloc.array": PUBLIC,
    "mtia_alloc.graphs": PUBLIC,
    "mtia_alloc.emulator": PUBLIC,
    "mtia_alloc.rng": PUBLIC,
    # the torch.mtia-shaped façade
    "mtia_alloc": FACADE,
    # over the façade, never imported by the library: the tools (and `python -m mtia_alloc`)
    "mtia_alloc.__main__": TOP,
    "mtia_alloc.tools": TOP,
    "mtia_alloc.tools.cli": TOP,
    "mtia_alloc.tools.replay": TOP,
    "mtia_alloc.tools.workload": TOP,
    "mtia_alloc.tools.bench_suite": TOP,
    "mtia_alloc.tools.snapshot_cli": TOP,
    "mtia_alloc.tools.viz_check": TOP,
    "mtia_alloc.tools.analysis_cli": TOP,
    "mtia_alloc.tools.fit": TOP,
    "mtia_alloc.tools.sweep": TOP,
    "mtia_alloc.tools.diff": TOP,
    "mtia_alloc.tools.ranks": TOP,
    "mtia_alloc.tools.convert_cli": TOP,
    "mtia_alloc.tools.synth_snapshot": TOP,
    "mtia_alloc.tools.slice": TOP,
    "mtia_alloc.tools.peer_build": TOP,
    "mtia_alloc.tools.shipped_traces": TOP,
    "mtia_alloc.tools.output_path": TOP,
    # the PyTorch backend, and torch's backend-autoload entry point that loads it at `import torch`
    "mtia_alloc.torch": TOP,
    "mtia_alloc._torch_autoload": TOP,
}
# Subpackages whose modules take the subpackage's layer unless listed above.
SUBPACKAGE_LAYERS = {"mtia_alloc.tools": TOP, "mtia_alloc.torch": TOP}
# The one import delayed by design: torch's autoload entry point runs during `import torch`
# and must never make it fail, so it imports the backend inside a function and turns a
# failure (a wrong torch version, a failed build) into a warning.
DELAYED_BY_DESIGN = {("mtia_alloc._torch_autoload", "mtia_alloc.torch")}
EXTENSIONS = {"mtia_alloc._C", "mtia_alloc.viz._pickle_reader"}  # compiled: no Python source to parse


def package_sources(package_dir=PACKAGE_DIR, root=ROOT):
    """{module name: (source text, is_package)} for every .py file of the package."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        out[".".join([root, *parts])] = (path.read_text(encoding="utf-8"), is_package)
    return out


def _resolve(module, is_package, node, known, root):
    """The modules of the package that an Import/ImportFrom node names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name == root or a.name.startswith(root + ".")]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        base = ".".join(base + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base != root and not base.startswith(root + "."):
        return []
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.append(sub if sub in known else base)  # `from pkg import submodule` or a name of pkg
    return sorted(set(out))


def _is_import_only(stmt):
    if isinstance(stmt, (ast.Import, ast.ImportFrom, ast.Pass)):
        return True
    if isinstance(stmt, ast.If):
        return all(_is_import_only(s) for s in stmt.body + stmt.orelse)
    if isinstance(stmt, ast.Try):
        return all(_is_import_only(s) for s in stmt.body + stmt.orelse + stmt.finalbody) and all(
            _is_import_only(s) for h in stmt.handlers for s in h.body)
    return False


def _top_block(tree):
    """The ids of the statements of the import block at the top of a module."""
    block = set()
    for i, stmt in enumerate(tree.body):
        docstring = i == 0 and isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) \
            and isinstance(stmt.value.value, str)
        if docstring:
            continue
        if not _is_import_only(stmt):
            break
        block.update(id(n) for n in ast.walk(stmt))
    return block


def import_graph(sources, root=ROOT):
    """(edges {module: {imported module: first line}}, delayed [(module, line, target)],
    dynamic [(module, line)]) of a {module: (source, is_package)} package."""
    known = set(sources) | {m for m in LAYERS if m in EXTENSIONS}
    edges, delayed, dynamic = {}, [], []
    for module, (source, is_package) in sources.items():
        tree = ast.parse(source, filename=module)
        top = _top_block(tree)
        out = edges.setdefault(module, {})
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                if name in ("import_module", "__import__"):
                    dynamic.append((module, node.lineno))
                continue
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _resolve(module, is_package, node, known, root):
                out.setdefault(target, node.lineno)
                if id(node) not in top:
                    delayed.append((module, node.lineno, target))
    return edges, delayed, dynamic


def find_cycle(edges):
    """One cycle of the graph as a list of modules (first == last), or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = {m: WHITE for m in edges}
    stack = []

    def visit(m):
        color[m] = GREY
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if color.get(t, WHITE) == GREY:
                return stack[stack.index(t):] + [t]
            if color.get(t, WHITE) == WHITE and t in edges:
                found = visit(t)
                if found:
                    return found
        stack.pop()
        color[m] = BLACK
        return None

    for m in sorted(edges):
        if color[m] == WHITE:
            found = visit(m)
            if found:
                return found
    return None


def layer_of(module, layers=LAYERS, subpackages=SUBPACKAGE_LAYERS):
    if module in layers:
        return layers[module]
    for prefix, layer in subpackages.items():
        if module.startswith(prefix + "."):
            return layer
    return None


def check(sources, layers=LAYERS, subpackages=SUBPACKAGE_LAYERS, root=ROOT):
    """Every problem of the package's import structure, as readable lines ([] = none)."""
    edges, delayed, dynamic = import_graph(sources, root)
    problems = []
    for module in sorted(set(edges) | {t for ts in edges.values() for t in ts}):
        if layer_of(module, layers, subpackages) is None:
            problems.append(f"{module}: no layer declared (add it to LAYERS)")
    cycle = find_cycle(edges)
    if cycle:
        problems.append("import cycle: " + " -> ".join(cycle))
    for module, targets in sorted(edges.items()):
        low = layer_of(module, layers, subpackages)
        for target, line in sorted(targets.items()):
            high = layer_of(target, layers, subpackages)
            if low is not None and high is not None and high > low:
                problems.append(f"{module}:{line}: imports {target} (layer {high}) from layer {low}: "
                                f"imports go downward only")
    for module, line, target in delayed:
        if (module, target) in DELAYED_BY_DESIGN and root == ROOT:
            continue
        problems.append(f"{module}:{line}: imports {target} outside the import block at the top of the file")
    for module, line in dynamic:
        problems.append(f"{module}:{line}: imports dynamically (importlib.import_module / __import__)")
    return problems


# ------------------------------------------------------------------ the package


def test_every_module_has_a_layer_and_the_table_names_only_modules():
    sources = package_sources()
    assert sources, f"no modules found under {PACKAGE_DIR}"
    missing = [m for m in sources if layer_of(m) is None]
    assert not missing, f"modules without a layer: {missing}"
    stale = [m for m in LAYERS if m not in sources and m not in EXTENSIONS]
    assert not stale, f"LAYERS names modules that do not exist: {stale}"


def test_imports_form_layers_without_cycles_or_delayed_imports():
    problems = check(package_sources())
    assert not problems, "\n".join(problems)


def test_the_library_imports_no_tool_and_no_torch():
    """`import mtia_alloc` loads the library only: the tools sit above it and torch is
    optional (mtia_alloc/torch/, the PyTorch backend, is imported on demand only)."""
    code = ("import sys, mtia_alloc, mtia_alloc.memory, mtia_alloc.emulator; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'mtia_alloc.tools', "
            "'mtia_alloc.torch'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=PACKAGE_DIR.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_the_snapshot_module_name_is_not_shadowed():
    """mtia_alloc.snapshot is the snapshot() function, and no module carries that name."""
    assert callable(mtia_alloc.snapshot) and not (PACKAGE_DIR / "snapshot.py").exists()
    assert mtia_alloc.memory.Snapshot.__module__ == "mtia_alloc.viz.model"


# ------------------------------------------------------------------ the checker can fail

def _pkg(**modules):
    """A synthetic package 'mtia_alloc' from {dotted suffix: source}; '__init__' is the root."""
    out = {}
    for suffix, source in modules.items():
        name = ROOT if suffix == "__init__" else f"{ROOT}.{suffix}"
        out[name] = (source, suffix == "__init__")
    return out


SYNTHETIC_LAYERS = {"mtia_alloc": 3, "mtia_alloc.low": 0, "mtia_alloc.mid": 1, "mtia_alloc.high": 2}


def test_self_check_a_clean_synthetic_package_passes():
    sources = _pkg(__init__="from . import high\n", low='"""doc"""\nimport os\n',
                   mid="from . import low\ntry:\n    from .low import x\nexcept ImportError:\n    pass\n",
                   high="from .mid import y\nfrom mtia_alloc import low\n\ndef f():\n    import json\n")
    assert check(sources, SYNTHETIC_LAYERS, {}) == []


def test_self_check_a_cycle_is_caught():
    sources = _pkg(__init__="", low="from . import mid\n", mid="from .low import x\n", high="")
    layers = dict(SYNTHETIC_LAYERS, **{"mtia_alloc.mid": 0})  # same layer: only the cycle is wrong
    problems = check(sources, layers, {})
    assert any(p.startswith("import cycle: ") and "mtia_alloc.low" in p and "mtia_alloc.mid" in p
               for p in problems), problems
    assert len(problems) == 1, problems


def test_self_check_an_upward_import_is_caught():
    sources = _pkg(__init__="", low="from .high import thing\n", mid="", high="")
    problems = check(sources, SYNTHETIC_LAYERS, {})
    assert problems == ["mtia_alloc.low:1: imports mtia_alloc.high (layer 2) from layer 0: "
                        "imports go downward only"], problems
    # an absolute import of the façade from below is upward too
    problems = check(_pkg(__init__="", low="import mtia_alloc\n", mid="", high=""), SYNTHETIC_LAYERS, {})
    assert problems and "imports mtia_alloc (layer 3) from layer 0" in problems[0], problems


def test_self_check_delayed_imports_are_caught():
    cases = {
        "in a function": "import os\n\ndef f():\n    from .low import x\n",
        "in a method": "class C:\n    def m(self):\n        from . import low\n",
        "in a class body": "class C:\n    from . import low\n",
        "at the bottom": "import os\nX = 1\nfrom .low import x\n",
        "in a nested if": "import os\nif True:\n    def f():\n        pass\n    from . import low\n",
        "dynamic": "import importlib\nlow = importlib.import_module('mtia_alloc.low')\n",
    }
    for what, source in cases.items():
        problems = check(_pkg(__init__="", low="", mid=source, high=""), SYNTHETIC_LAYERS, {})
        assert len(problems) == 1 and problems[0].startswith("mtia_alloc.mid:"), (what, problems)
        assert "outside the import block" in problems[0] or "dynamically" in problems[0], (what, problems)


def test_self_check_an_undeclared_module_is_caught():
    problems = check(_pkg(__init__="", low="", mid="", high="", extra=""), SYNTHETIC_LAYERS, {})
    assert problems == ["mtia_alloc.extra: no layer declared (add it to LAYERS)"], problems
