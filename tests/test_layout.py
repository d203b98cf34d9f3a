"""The package's shape (docs/ARCHITECTURE.md): imports run one way, one concern per module, where the
backend is asked, short signatures on decoding's path."""

import ast
import pathlib
import re

import pytest

import keras_nanogpt as kn
from keras_nanogpt._version import REMOVED_IN

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "keras_nanogpt"
# The modules that may ask which backend runs: every other module asks them.
BACKEND_MODULES = {"backends.py", "distribute.py"}
# Above the package's __init__: they may import it (nothing that __init__ imports may).
ABOVE_INIT = {"cli", "serve.runner"}
MAX_LINES = 600
MAX_PARAMETERS = 6  # besides self, on decoding's path (the public generate/stream options are exempt)


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def _name(path):
    """`serve/app.py` -> "serve.app", `__init__.py` -> "__init__", `serve/__init__.py` -> "serve.__init__"."""
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def _is_module(dotted):
    path = PACKAGE.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _module_of(dotted):
    """The graph's node for the package module `dotted` ("" is the package itself)."""
    if not dotted:
        return "__init__"
    return f"{dotted}.__init__" if (PACKAGE.joinpath(*dotted.split(".")) / "__init__.py").is_file() else dotted


def _imports(path):
    """Every package module `path` imports, at the top or inside a function."""
    package = _name(path).split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "keras_nanogpt" or alias.name.startswith("keras_nanogpt."):
                    found.add(_module_of(alias.name.partition(".")[2]))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative
                base = package[:len(package) - node.level + 1] + ([node.module] if node.module else [])
                source = ".".join(base)
            elif node.module and (node.module == "keras_nanogpt" or node.module.startswith("keras_nanogpt.")):
                source = node.module.partition(".")[2]
            else:
                continue
            for alias in node.names:
                inner = f"{source}.{alias.name}" if source else alias.name
                found.add(_module_of(inner) if _is_module(inner) else _module_of(source))
    found.discard(_name(path))
    return found


def _graph():
    return {_name(path): _imports(path) for path in _modules()}


def test_the_import_graph_knows_the_modules_it_reads():
    graph = _graph()
    assert {"__init__", "model", "generation", "serve.app", "serve.__init__", "_version"} <= set(graph)
    assert "_version" in graph["__init__"] and "model" in graph["__init__"]
    assert graph["_version"] == set(), "the version module stands on the ground floor: it imports nothing"


def test_no_import_runs_up_and_no_circle():
    graph = _graph()
    up = sorted(f"{name} -> __init__" for name, imported in graph.items()
                if "__init__" in imported and name not in ABOVE_INIT)
    assert not up, f"modules below the package's __init__ import it: {up}"
    state, circle = {}, []

    def visit(name, trail):
        state[name] = "open"
        for other in sorted(graph.get(name, ())):
            if state.get(other) == "open":
                circle.append(trail[trail.index(other):] + [other])
            elif other not in state:
                visit(other, trail + [other])
        state[name] = "closed"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circle, f"import circles: {circle}"


def test_each_module_names_its_one_concern_and_stays_readable():
    architecture = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    for path in _modules():
        name = str(path.relative_to(PACKAGE))
        docstring = ast.get_docstring(ast.parse(path.read_text()))
        assert docstring, f"{name} has no module docstring naming its concern"
        summary = docstring.split("\n\n")[0]
        assert len(summary) <= 400, f"{name}'s docstring opens with more than one concern: {summary!r}"
        if path.name != "__init__.py" and name not in ("batching.py", "playground.py"):
            listed = f"`{name}`" in architecture or (  # a subpackage's modules: its row names them
                path.parent != PACKAGE and f"`{path.parent.name}/`" in architecture and f"`{path.stem}`" in architecture)
            assert listed or f"`{path.name}`" in architecture, (
                f"{name} is not in docs/ARCHITECTURE.md's module table")
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_LINES, f"{name} has {lines} lines (at most {MAX_LINES}): split its concerns"


def test_decoding_passes_its_state_whole():
    """No function in decoding.py and _torch_compile.py, and no private one in generation.py, takes more
    than MAX_PARAMETERS parameters besides self: the state travels as named objects."""
    long = []
    for name, private_only in (("decoding.py", False), ("_torch_compile.py", False), ("generation.py", True)):
        for node in ast.walk(ast.parse((PACKAGE / name).read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if private_only and not node.name.startswith("_"):
                continue
            arguments = node.args
            names = [a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs]
            names += [a.arg for a in (arguments.vararg, arguments.kwarg) if a]
            names = [n for n in names if n != "self"]
            if len(names) > MAX_PARAMETERS:
                long.append(f"{name}:{node.lineno} {node.name}({', '.join(names)})")
    assert not long, long


def test_only_the_backend_modules_read_the_backend():
    readers = {str(path.relative_to(PACKAGE)) for path in _modules()
               if re.search(r"backend\.backend\(\)|config\.backend\(\)", path.read_text())}
    assert readers and all(name in BACKEND_MODULES or name.startswith("_torch") for name in readers), readers


def test_model_py_imports_every_package_module_at_the_top():
    tree = ast.parse((PACKAGE / "model.py").read_text())
    functions = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nested = [node.lineno for function in functions for node in ast.walk(function)
              if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert not nested, f"function-local imports at lines {nested}"


def test_no_test_module_imports_another():
    tests = pathlib.Path(__file__).resolve().parent
    names = {path.stem for path in tests.glob("test_*.py")}
    for path in tests.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            imported = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                        else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not {name.split(".")[-1] for name in imported} & names, (path.name, imported)


def test_names_that_moved_warn_with_the_version_that_removes_them():
    import importlib
    import sys

    with pytest.warns(DeprecationWarning, match=f"compiling.compiled_function.*{re.escape(REMOVED_IN)}"):
        assert kn.generation.compiled_function is kn.compiling.compiled_function
    for old, new in (("keras_nanogpt.batching", "keras_nanogpt.serve.batching"),
                     ("keras_nanogpt.playground", "keras_nanogpt.serve.page")):
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match=f"{re.escape(new)}.*{re.escape(REMOVED_IN)}"):
            importlib.import_module(old)
    assert kn.model.load_model is kn.load_model is kn.saving.load_model
    assert kn.model.CONFIGS is kn.CONFIGS and kn.model.MODERN["position_embedding"] == "rotary"
    assert kn.data.make_vectorizer is kn.tokenizers.make_vectorizer
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        kn.generation.nothing
    listed = (ROOT / "docs" / "ARCHITECTURE.md").read_text().split("## Moved names")[1]
    for name in ("keras_nanogpt.batching", "keras_nanogpt.playground", "generation.compiled_function"):
        assert name in listed and REMOVED_IN in listed, name


def test_the_version_lives_on_the_ground_floor():
    from keras_nanogpt import _version

    assert kn.__version__ == _version.__version__
    assert "keras_nanogpt._version.__version__" in (ROOT / "setup.cfg").read_text()
