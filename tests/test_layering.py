"""Dependencies point one way: a module imports only its own layer and the layers below it.

    cli -> api -> evaluate/peers -> runtime -> engines -> export -> calib -> core

Every .py under the stage folders (calib/, export/, engines/, runtime/) and the front door
(qdiff/) is parsed with `ast`; every import is checked, at module level and inside functions
(lazy imports are still dependencies), `from qdiff.x import y` and relative imports included.
The stage folders install as `qdiff.<folder>` (pyproject `package-dir`), so the test maps them
the same way. A module of the package that is in no layer fails too: new modules get a place
in LAYERS, which is the table docs/architecture.md shows.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Folders on disk and the package they install as.
FOLDERS = {"qdiff": "qdiff", "calib": "qdiff.calib", "export": "qdiff.export", "engines": "qdiff.engines", "runtime": "qdiff.runtime"}

# Lowest first. A module is in the layer of the longest prefix that names it (whole dotted
# parts); "qdiff" alone is the package's __init__, the front door.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # The ground every stage uses (qdiff/core/): errors, artifacts, metrics, progress, the
    # version, and conditioning, because calib, export and runtime all take a `Conditioning`.
    ("core", ("qdiff.core",)),
    ("calib", ("qdiff.calib",)),
    ("export", ("qdiff.export",)),
    ("engines", ("qdiff.engines",)),
    ("runtime", ("qdiff.runtime",)),
    ("evaluate/peers", ("qdiff.evaluate", "qdiff.eval_harness", "qdiff.harness_settings", "qdiff.quest", "qdiff.harness_report", "qdiff.peers", "qdiff.report", "qdiff.plots", "qdiff.models", "qdiff.datasets")),
    ("api", ("qdiff.api",)),
    ("cli", ("qdiff.cli",)),
    ("front door", ()),  # qdiff/__init__.py: re-exports the API lazily
]
RANK = {name: rank for rank, (name, _) in enumerate(LAYERS)}


def layer_of(module: str) -> str | None:
    """The layer a `qdiff...` module belongs to, or None when the table does not place it."""
    if module == "qdiff":
        return "front door"
    best: tuple[int, str] | None = None
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), name)
    return best[1] if best else None


def module_name(path: Path) -> tuple[str, bool]:
    """The dotted name `path` is imported as, and whether it is a package's __init__."""
    rel = path.relative_to(ROOT)
    parts = [FOLDERS[rel.parts[0]].replace(".", "/"), *rel.parts[1:]]
    dotted = "/".join(parts).removesuffix(".py").replace("/", ".")
    is_package = dotted.endswith(".__init__")
    return dotted.removesuffix(".__init__"), is_package


def known_modules() -> set[str]:
    return {module_name(path)[0] for path in source_files()}


def source_files() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))


@dataclass(frozen=True)
class Violation:
    where: str  # file:line
    importer: str
    imported: str
    detail: str

    def __str__(self) -> str:
        return f"{self.where}: {self.importer} imports {self.imported}: {self.detail}"


def imported_modules(tree: ast.AST, module: str, is_package: bool, modules: set[str]) -> list[tuple[int, str, str]]:
    """(line, qdiff module, name taken from it or "") for every import of the package in `tree`,
    however nested."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, "") for alias in node.names if alias.name.split(".")[0] == "qdiff"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "qdiff":
                continue
            for alias in node.names:
                # `from qdiff.x import y`: y is a module when the package has one by that name.
                candidate = f"{base}.{alias.name}"
                found.append((node.lineno, candidate, "") if candidate in modules else (node.lineno, base, alias.name))
    return found


def check_source(rel_path: str, source: str, modules: set[str] | None = None) -> list[Violation]:
    """The layering violations of one file's source (`rel_path` relative to the repository)."""
    modules = known_modules() if modules is None else modules
    module, is_package = module_name(ROOT / rel_path)
    own = layer_of(module)
    if own is None:
        return [Violation(f"{rel_path}:1", module, "-", "the module is in no layer; add it to LAYERS in tests/test_layering.py and docs/architecture.md")]
    violations = []
    seen = set()
    for line, imported, name in imported_modules(ast.parse(source, filename=rel_path), module, is_package, modules):
        if name.startswith("_") and not name.startswith("__") and imported != module:
            violations.append(Violation(f"{rel_path}:{line}", module, f"{imported}.{name}", "a private name of another module; make it public"))
        if (line, imported) in seen:
            continue
        seen.add((line, imported))
        theirs = layer_of(imported)
        if theirs is None:
            violations.append(Violation(f"{rel_path}:{line}", module, imported, "the imported module is in no layer"))
        elif RANK[theirs] > RANK[own]:
            violations.append(Violation(f"{rel_path}:{line}", module, imported, f"layer {own!r} may not import layer {theirs!r} above it"))
    return violations


def test_every_import_points_down():
    modules = known_modules()
    violations = [v for path in source_files() for v in check_source(str(path.relative_to(ROOT)), path.read_text(), modules)]
    assert not violations, "imports against the layering (cli -> api -> evaluate/peers -> runtime -> engines -> export -> calib -> core):\n" + "\n".join(map(str, violations))


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in known_modules() if layer_of(m) is None)
    assert not unplaced, f"modules in no layer (add them to LAYERS): {unplaced}"


MODULES = {"qdiff", "qdiff.api", "qdiff.core.errors", "qdiff.core.artifacts", "qdiff.calib", "qdiff.calib.trajectories", "qdiff.runtime", "qdiff.runtime.sampler", "qdiff.engines", "qdiff.engines.runner"}


@pytest.mark.parametrize(
    "path, source, line, imported",
    [
        ("calib/trajectories.py", "import torch\n\ndef f():\n    from qdiff.runtime.sampler import denoise\n", 4, "qdiff.runtime.sampler"),
        ("calib/trajectories.py", "from qdiff.runtime import sampler\n", 1, "qdiff.runtime.sampler"),
        ("calib/trajectories.py", "import qdiff.api\n", 1, "qdiff.api"),
        ("engines/runner.py", "from ..runtime.sampler import denoise\n", 1, "qdiff.runtime.sampler"),
        ("qdiff/core/artifacts.py", "def v():\n    from qdiff import __version__\n", 2, "qdiff"),
        ("qdiff/core/errors.py", "from .. import api\n", 1, "qdiff.api"),
    ],
)
def test_the_checker_names_file_line_and_import(path, source, line, imported):
    (violation,) = check_source(path, source, MODULES)
    assert (violation.where, violation.imported) == (f"{path}:{line}", imported)
    assert f"{path}:{line}" in str(violation) and imported in str(violation)


def test_the_checker_refuses_private_names_of_other_modules():
    (violation,) = check_source("runtime/sampler.py", "from qdiff.runtime.backends import _timestep_batch\n", MODULES | {"qdiff.runtime.backends"})
    assert violation.imported == "qdiff.runtime.backends._timestep_batch" and "private" in violation.detail


def test_the_checker_allows_imports_down_and_sideways():
    source = "from qdiff.core.errors import X\nfrom qdiff.calib import trajectories\nfrom . import runner\nimport numpy\n"
    assert check_source("engines/runner.py", source, MODULES) == []
    assert layer_of("qdiff.core.errors") == "core" and layer_of("qdiff.calib.reconstruct.engine") == "calib"
    assert layer_of("qdiff.cli") == "cli" and layer_of("qdiff.newthing") is None
