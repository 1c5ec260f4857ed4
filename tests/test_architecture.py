"""The house rules, read from the source: no import circle, imports only go down the layers,
the model and tokenizer stay light, and the docs name only files and modules that exist.

Imports are read with ``ast``, function-level ones and ``if TYPE_CHECKING:`` blocks included, so
neither a lazy import nor a type-only one can hide a circle or a layering violation.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# top-level folders installed inside the package (pyproject.toml's package-dir)
SOURCE_DIRS = {"mvar_dist": ROOT / "mvar_dist", "mvar_dist.kernels": ROOT / "kernels", "mvar_dist.data_prep": ROOT / "data_prep"}

# Concern -> layer. A module may import its own concern, or a concern of a lower layer.
# Layer 0 has an order of its own: the run directory's layout (0.2) reads the run-state format
# (0.1), which writes through atomic (0).
LAYERS: dict[str, float] = {
    "mvar_dist": 0, "mvar_dist.atomic": 0, "mvar_dist.scales": 0, "mvar_dist.state_files": 0,
    "mvar_dist.image_decoding": 0, "mvar_dist.kernels": 0, "mvar_dist.run_state": 0.1, "mvar_dist.run_dir": 0.2,
    "mvar_dist.model": 1, "mvar_dist.tokenizer": 1, "mvar_dist.shards": 1,
    "mvar_dist.attention": 2,  # the documented re-export of mvar_dist.model.attention
    "mvar_dist.data": 2, "mvar_dist.images": 2, "mvar_dist.data_prep": 2, "mvar_dist.tracking": 2,
    "mvar_dist.sampling": 2,
    "mvar_dist.evaluation": 2.5,  # Inception features and the ADM statistics; samples exports to score them
    "mvar_dist.config": 3,
    "mvar_dist.runtime": 4,
    "mvar_dist.training": 5, "mvar_dist.tokenizer_training": 5,  # the two tasks; neither imports the other
    "mvar_dist.memory": 5.5,  # exact activation memory: runs the model with the trainer's loss
    "mvar_dist.tasks": 6,
    "mvar_dist.launch": 7,
    "mvar_dist.quickstart": 8,
    "mvar_dist.commands": 9, "mvar_dist.cli": 10, "mvar_dist.__main__": 11,
}
# what a user who only samples from an exported model must not have to install
HEAVY = ("deepspeed", "mlflow", "submitit", "webdataset")


def module_files() -> dict[str, Path]:
    modules = {}
    for package, directory in SOURCE_DIRS.items():
        for path in directory.rglob("*.py"):
            if any(part in ("configs",) for part in path.relative_to(directory).parts):
                continue
            parts = list(path.relative_to(directory).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


MODULES = module_files()


def imports_of(module: str) -> set[str]:
    """Package-internal modules ``module`` imports anywhere in its source, ``if TYPE_CHECKING:``
    blocks included (resolved to the module that runs)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in MODULES and name != module)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def concern(module: str) -> str:
    return max((c for c in LAYERS if module == c or module.startswith(c + ".")), key=len)


def test_every_module_belongs_to_a_layer():
    assert all(concern(m) in LAYERS for m in MODULES)


def test_no_import_circle():
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(GRAPH[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert circles == []


def test_imports_only_go_down_the_layers():
    upward = [
        f"{source} -> {target}"
        for source, targets in GRAPH.items()
        for target in targets
        if concern(source) != concern(target) and LAYERS[concern(target)] >= LAYERS[concern(source)]
    ]
    assert upward == []


@pytest.mark.parametrize("rule, sources, forbidden", [
    ("model and tokenizer never import training, data, tracking, launch or commands",
     ("mvar_dist.model", "mvar_dist.tokenizer"),
     ("mvar_dist.training", "mvar_dist.data", "mvar_dist.data_prep", "mvar_dist.tracking", "mvar_dist.launch",
      "mvar_dist.commands", "mvar_dist.config", "mvar_dist.quickstart", "mvar_dist.sampling")),
    ("kernels import nothing from the package", ("mvar_dist.kernels",), ("mvar_dist",)),
    ("the data loader never imports training", ("mvar_dist.data",), ("mvar_dist.training", "mvar_dist.config")),
    ("the runtime knows no task", ("mvar_dist.runtime",), ("mvar_dist.training", "mvar_dist.tokenizer_training")),
    ("the transformer's task never imports the tokenizer's", ("mvar_dist.training",), ("mvar_dist.tokenizer_training",)),
    ("the tokenizer's task never imports the transformer's", ("mvar_dist.tokenizer_training",), ("mvar_dist.training",)),
    ("library modules never import commands",
     tuple(c for c in LAYERS if c not in ("mvar_dist.commands", "mvar_dist.cli", "mvar_dist.__main__", "mvar_dist")),
     ("mvar_dist.commands", "mvar_dist.cli")),
])
def test_nevers(rule, sources, forbidden):
    def within(module: str, prefixes: tuple[str, ...]) -> bool:
        return any(module == p or module.startswith(p + ".") for p in prefixes)

    bad = [
        f"{s} -> {t}" for s, targets in GRAPH.items() if within(s, sources)
        for t in targets if within(t, forbidden) and not within(t, sources)
    ]
    assert bad == [], rule


def test_model_and_tokenizer_import_without_the_training_stack():
    code = (
        "import sys, mvar_dist.model, mvar_dist.tokenizer, mvar_dist.attention;"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == ""


def test_no_source_file_is_over_the_size_limit():
    too_long = {str(p.relative_to(ROOT)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > 420}
    assert too_long == {}


# ----- the docs name only what exists -----

DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_PATH = re.compile(r"(?<![\w./-])((?:mvar_dist|kernels|data_prep|configs|docs|tests|benchmarks|slurm|\.ci)/[\w./-]*[\w/])")
_MODULE = re.compile(r"(?<![\w./-])(mvar_dist(?:\.\w+)+)")
_LINK = re.compile(r"\]\((?!https?:|#|mailto:)([^)#\s]+)(?:#[^)]*)?\)")


def _exists_as_module_or_attribute(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent is a plain module: ``name`` is an attribute path
            found = False
        if found:
            if cut == len(parts):
                return True
            obj = importlib.import_module(name)
            for attribute in parts[cut:]:
                if not hasattr(obj, attribute):
                    return False
                obj = getattr(obj, attribute)
            return True
    return False


def _references(pattern: re.Pattern[str]) -> list[tuple[str, str]]:
    return [(doc.name, match) for doc in DOC_FILES for match in pattern.findall(doc.read_text())]


def test_docs_exist():
    assert (ROOT / "docs").is_dir() and len(DOC_FILES) > 1


@pytest.mark.parametrize("doc, path", _references(_PATH))
def test_named_paths_exist(doc, path):
    assert any(ROOT.joinpath(path.rstrip("/")).exists() for _ in [0]), f"{doc} names {path}, which does not exist"


@pytest.mark.parametrize("doc, name", sorted(set(_references(_MODULE))))
def test_named_modules_exist(doc, name):
    assert _exists_as_module_or_attribute(name), f"{doc} names {name}, which cannot be imported"


@pytest.mark.parametrize("doc, link", _references(_LINK))
def test_relative_links_resolve(doc, link):
    base = ROOT if doc == "README.md" else ROOT / "docs"
    assert (base / link).exists(), f"{doc} links to {link}, which does not exist"


def test_pyproject_installs_every_package():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    assert packages - listed == set()


def _config_fields() -> set[str]:
    """Every field of every section of the experiment file, as ``section.field``."""
    import dataclasses

    from mvar_dist.config import ExperimentConfig

    fields = set()
    for section in dataclasses.fields(ExperimentConfig):
        for field_ in dataclasses.fields(section.default_factory()):
            if field_.init:
                fields.add(f"{section.name}.{field_.name}")
    return fields


def test_config_reference_is_complete():
    """docs/config.md documents every field in a table row starting with `section.field`."""
    rows = set(re.findall(r"^\|\s*`(\w+\.\w+)`", (ROOT / "docs" / "config.md").read_text(), re.M))
    assert sorted(_config_fields() - rows) == [], "fields missing from docs/config.md"
    assert sorted(rows - _config_fields()) == [], "docs/config.md documents fields that do not exist"
