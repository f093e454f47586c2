"""The package's shape, checked: no import cycle between files, one place that builds the
run context, one settings module naming the environment, mini a leaf plugin, no probes of
the backend, small graph file and functions."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

from medloupe.config import ENV_VARS, FOREIGN_VARS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "medloupe"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """Every medloupe module ``module`` imports, function-level imports included."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            if base.startswith("medloupe"):
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.append(full if full in MODULES else base)
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.startswith("medloupe")]
        for t in targets:
            resolved = _resolve(t)
            if resolved and resolved != module:
                found.add(resolved)
    return found


def test_no_import_cycle_between_files() -> None:
    graph = {m: imports_of(m) for m in MODULES}
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return [*path[path.index(n) :], n]
            if n not in state and (cycle := visit(n)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_nothing_but_the_cli_imports_mini() -> None:
    users = {
        m
        for m in MODULES
        if not m.startswith("medloupe.mini")
        and any(i.startswith("medloupe.mini") for i in imports_of(m))
    }
    assert users <= {"medloupe.cli"}, users


def _sources() -> dict[Path, str]:
    return {p: p.read_text() for p in PACKAGE.rglob("*.py")}


def test_run_context_is_built_in_one_module() -> None:
    builders = {p.name for p, src in _sources().items() if re.search(r"\bRunContext\(", src)}
    assert builders == {"context.py"}, builders


def test_no_probe_of_the_backend() -> None:
    probe = re.compile(r"\b(getattr|hasattr)\((ctx\.)?(vlm|backend|self\.vlm)\b")
    found = [f"{p}: {m.group(0)}" for p, src in _sources().items() for m in probe.finditer(src)]
    assert not found, found


def test_only_settings_and_cli_name_environment_variables() -> None:
    allowed = {PACKAGE / "config.py", PACKAGE / "cli.py"}
    found = {
        f"{p.relative_to(ROOT)}: {name}"
        for p, src in _sources().items()
        if p not in allowed
        for name in re.findall(r"MEDLOUPE_[A-Z0-9_]+", src)
    }
    assert not found, sorted(found)


def test_every_setting_is_in_the_readme_table_and_back() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    first_cells = [row.split("|")[1] for row in rows]
    documented = {name for cell in first_cells for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", cell)}
    for name in [*ENV_VARS, *FOREIGN_VARS]:
        assert name in documented, f"{name} is read by medloupe but not in the README table"
    # names in the table that medloupe does not read: the checkpoint paths (weight_env),
    # and variables of the test suite (tests/) or of third parties
    tests_src = "".join(p.read_text() for p in (ROOT / "tests").rglob("*.py"))
    for name in documented - set(ENV_VARS) - set(FOREIGN_VARS):
        assert name.startswith(("MEDLOUPE_SAM_", "MEDLOUPE_MEDSAM_", "HF_")) or (
            name in tests_src
        ), f"{name} is in the README table but nothing reads it"


def test_graph_file_and_function_sizes() -> None:
    graph_lines = (PACKAGE / "graphs" / "diagnose.py").read_text().count("\n")
    assert graph_lines <= 250, graph_lines
    long: dict[str, int] = defaultdict(int)
    for p, src in _sources().items():
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > 100:
                    long[f"{p.relative_to(ROOT)}:{node.name}"] = n
    assert len(long) <= 2, dict(long)
