"""The import lines of ../shared/STYLE.md, held by parsing each module's imports with `ast`."""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "streamseg"
HEAVY = ("torch", "torchvision", "onnxruntime")


def _module_path(name: str) -> Path:
    return PACKAGE / ("__init__.py" if name == "__init__" else f"{name}.py")


def _resolve(node: ast.ImportFrom) -> list[str]:
    """Absolute module names an ImportFrom brings in ('from . import x' -> 'streamseg.x')."""
    if node.level == 0:
        return [node.module or ""]
    base = "streamseg" if node.level == 1 else ""  # the package is flat: level 2+ would leave it
    if node.module:
        return [f"{base}.{node.module}"]
    return [f"{base}.{alias.name}" for alias in node.names]


class _Imports(ast.NodeVisitor):
    """Collects imported module names; with module_level=True, function bodies are not entered
    (they run on call, not on import; class bodies do run on import)."""

    def __init__(self, module_level: bool):
        self.module_level = module_level
        self.names: set[str] = set()

    def visit_Import(self, node: ast.Import) -> None:
        self.names.update(alias.name for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.names.update(_resolve(node))

    def _function(self, node) -> None:
        if not self.module_level:
            self.generic_visit(node)

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function


@lru_cache(maxsize=None)
def _tree(name: str) -> ast.Module:
    path = _module_path(name)
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


@lru_cache(maxsize=None)
def imports(name: str, *, module_level: bool = False) -> frozenset[str]:
    visitor = _Imports(module_level)
    visitor.visit(_tree(name))
    return frozenset(visitor.names)


def _top(names) -> set[str]:
    return {n.split(".")[0] for n in names}


def _needs(name: str) -> None:
    if not _module_path(name).is_file():
        pytest.skip(f"streamseg/{name}.py does not exist yet")


def closure_at_import(name: str) -> set[str]:
    """Every module (ours and third-party) that importing streamseg.<name> pulls in, following our
    own modules' module-level imports (a package import also runs streamseg/__init__.py)."""
    seen: set[str] = set()
    todo = [name, "__init__"]
    found: set[str] = set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for mod in imports(current, module_level=True):
            found.add(mod)
            if mod.startswith("streamseg."):
                sub = mod.split(".")[1]
                if _module_path(sub).is_file():
                    todo.append(sub)
    return found


def test_every_module_parses():
    modules = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert {"types", "config", "labels", "preprocess", "model", "segmenter", "overlay", "sinks", "pipeline", "cli"} <= set(modules)
    for name in modules:
        _tree(name)


@pytest.mark.parametrize("name", ["types", "config"])
def test_types_and_config_import_neither_cv2_nor_torch(name):
    bad = _top(imports(name)) & {"cv2", *HEAVY}
    assert not bad, f"streamseg/{name}.py imports {sorted(bad)}"


@pytest.mark.parametrize("name", ["labels", "overlay", "sources", "sinks"])
def test_no_torch_below_the_model(name):
    _needs(name)
    bad = _top(imports(name)) & set(HEAVY)
    assert not bad, f"streamseg/{name}.py imports {sorted(bad)}"


def test_cli_imports_no_torch_at_module_level():
    assert not (_top(imports("cli", module_level=True)) & set(HEAVY))
    # Nor through one of our own modules that cli.py imports at module level.
    reached = _top(closure_at_import("cli"))
    assert not (reached & set(HEAVY)), f"importing streamseg.cli pulls in {sorted(reached & set(HEAVY))}"


def test_package_import_is_light():
    reached = _top(closure_at_import("__init__"))
    assert not (reached & {"cv2", *HEAVY})


def test_model_internals_stay_out_of_the_cli():
    """cli.py goes through the Segmenter and the pipeline, never the model module."""
    assert "streamseg.model" not in imports("cli")


@pytest.mark.parametrize("name", ["labels", "overlay", "preprocess", "sinks", "sources", "types", "config"])
def test_lower_modules_do_not_reach_up(name):
    _needs(name)
    upper = {f"streamseg.{m}" for m in ("model", "segmenter", "pipeline", "cli", "app")}
    if name in ("labels", "overlay", "types", "config"):
        upper.add("streamseg.preprocess")
    bad = imports(name) & upper
    assert not bad, f"streamseg/{name}.py imports {sorted(bad)}"


@pytest.mark.parametrize("name", ["preprocess", "model"])
def test_model_side_touches_no_files_or_capture(name):
    bad = imports(name) & {"streamseg.sources", "streamseg.sinks", "streamseg.overlay"}
    assert not bad, f"streamseg/{name}.py imports {sorted(bad)}"
    # cv2 may resize and convert pixels here; capture, files and windows belong elsewhere.
    text = (PACKAGE / f"{name}.py").read_text()
    for call in ("VideoCapture", "VideoWriter", "imread", "imwrite", "imdecode", "imencode", "imshow"):
        assert f"cv2.{call}" not in text, f"streamseg/{name}.py calls cv2.{call}"


def test_nothing_imports_the_cli():
    for path in PACKAGE.glob("*.py"):
        if path.stem in ("cli", "__main__", "_entry"):  # the command line's own entry points
            continue
        assert "streamseg.cli" not in imports(path.stem), f"{path.name} imports streamseg.cli"


LIBRARY = ["types", "config", "labels", "sources", "preprocess", "model", "segmenter", "overlay", "sinks", "pipeline"]


@pytest.mark.parametrize("name", LIBRARY)
def test_library_does_not_print_exit_or_parse_argv(name):
    _needs(name)
    assert "argparse" not in _top(imports(name))
    for node in ast.walk(_tree(name)):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name):
                assert func.id not in ("print", "exit", "quit"), f"{name}.py:{node.lineno} calls {func.id}()"
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                assert (func.value.id, func.attr) != ("sys", "exit"), f"{name}.py:{node.lineno} calls sys.exit()"


@pytest.mark.parametrize("name", LIBRARY)
def test_no_bare_except_or_silent_pass(name):
    _needs(name)
    for node in ast.walk(_tree(name)):
        if isinstance(node, ast.ExceptHandler):
            assert node.type is not None, f"{name}.py:{node.lineno}: bare except"
            silent = len(node.body) == 1 and isinstance(node.body[0], ast.Pass)
            broad = isinstance(node.type, ast.Name) and node.type.id in ("Exception", "BaseException")
            assert not (silent and broad), f"{name}.py:{node.lineno}: except {node.type.id}: pass"


def test_the_checker_sees_what_it_should():
    """The parser itself: it finds torch in model.py (module level) and torchvision only inside functions."""
    assert "torch" in imports("model", module_level=True)
    assert "torchvision.models.segmentation" in imports("model")
    assert "torchvision.models.segmentation" not in imports("model", module_level=True)
    assert "streamseg.segmenter" in imports("cli") and "streamseg.segmenter" not in imports("cli", module_level=True)
