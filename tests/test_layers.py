"""The package's layers import only downwards: each rule names the layers a module of one layer must
never import (at module level or inside a function), read from the source with `ast`."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "chatterbox_lab"
SUBPACKAGES = tuple(sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()))
FOUNDATION = ("registry", "sampling", "validation", "graphed_calls", "source")

# (layer, what it must not import): a layer is a subpackage path (`kernels` holds `kernels/experimental`)
# or a top-level module's name; what it must not import are subpackages.
RULES = (
    ("kernels", ("decode", "tuning", "pipeline", "serving", "measure", "records", "s3gen", "loading")),
    ("serving", ("measure", "records")),
    ("records", ("measure",)),
    *((module, SUBPACKAGES) for module in FOUNDATION),
    # The plain request path imports no optimization module.
    ("pipeline", ("tuning", "measure", "records", "serving", "s3gen")),
)

def _imports(source: str, module: str, is_package: bool = False):
    """(line, dotted name) of every module the source of `module` imports, relative imports resolved."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            if base == "chatterbox_lab":  # `from chatterbox_lab import decode` imports a subpackage
                for alias in node.names:
                    yield node.lineno, f"{base}.{alias.name}"
            else:
                yield node.lineno, base


def _layer_of(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def _modules_of(layer: str) -> list:
    return [path for path in sorted(PACKAGE.rglob("*.py")) if _layer_of(path) == layer]


def _forbidden_imports(path: Path, forbidden: tuple) -> list:
    """(line, imported) for every import of a `forbidden` subpackage by the module at `path`."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    found = []
    for line, name in _imports(path.read_text(), module.removesuffix(".__init__"), path.name == "__init__.py"):
        parts = name.split(".")
        if parts[0] == "chatterbox_lab" and len(parts) > 1 and parts[1] in forbidden and parts[1] != _layer_of(path):
            found.append((line, name))
    return found


def test_every_layer_a_rule_names_exists_and_has_modules():
    for layer, forbidden in RULES:
        assert _modules_of(layer), layer
        assert set(forbidden) <= set(SUBPACKAGES), forbidden


def test_the_import_reader_sees_every_kind_of_import():
    source = ("import chatterbox_lab.decode.plan\nfrom chatterbox_lab import tuning\n"
              "from chatterbox_lab.measure.bench import run, summary_table\nfrom ..records import results\n"
              "def later():\n    from .. import serving\n")
    assert [name for _, name in _imports(source, "chatterbox_lab.kernels.example")] == [
        "chatterbox_lab.decode.plan", "chatterbox_lab.tuning", "chatterbox_lab.measure.bench",
        "chatterbox_lab.records", "chatterbox_lab.serving"]
    assert [name for _, name in _imports("from . import picks", "chatterbox_lab.kernels", is_package=True)] == \
        ["chatterbox_lab.kernels"]


def _rule_cases() -> list:
    cases = []
    for layer, forbidden in RULES:
        for path in _modules_of(layer):
            where = str(path.relative_to(PACKAGE.parent))
            cases.append(pytest.param(path, forbidden, id=where))
    return cases


@pytest.mark.parametrize("path, forbidden", _rule_cases())
def test_a_module_imports_none_of_the_layers_above_its_own(path, forbidden):
    assert _forbidden_imports(path, forbidden) == []
