"""The package's shape (docs/ARCHITECTURE.md): module sizes, where the backend is asked, imports in model.py."""

import ast
import pathlib
import re

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "keras_nanogpt"
# The modules that may ask which backend runs: every other module asks them.
BACKEND_MODULES = {"backends.py", "distribute.py"}


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def test_no_module_above_450_lines_and_model_py_at_most_300():
    sizes = {str(path.relative_to(PACKAGE)): len(path.read_text().splitlines()) for path in _modules()}
    assert sizes["model.py"] <= 300, sizes["model.py"]
    assert not {name: size for name, size in sizes.items() if size > 450}


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


def test_names_that_moved_still_work():
    import pytest

    import keras_nanogpt as kn

    with pytest.warns(DeprecationWarning, match="moved to keras_nanogpt.compiling.compiled_function"):
        assert kn.generation.compiled_function is kn.compiling.compiled_function
    assert kn.model.load_model is kn.load_model is kn.saving.load_model
    assert kn.model.CONFIGS is kn.CONFIGS and kn.model.MODERN["position_embedding"] == "rotary"
    assert kn.data.make_vectorizer is kn.tokenizers.make_vectorizer
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        kn.generation.nothing
