"""The import graph of the agent: the CLI imports the daemon (lazily, for `jobsyncd daemon`),
never the other way round, and the daemon's start-up imports neither Click nor the CLI."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "jobsyncd"


def _imports_of(path: Path, module: str) -> set[str]:
    """The jobsyncd modules `path` imports, at module level or inside functions."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.startswith("jobsyncd"):
                if node.module:  # `from . import log` names a module, not the package
                    found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("jobsyncd"))
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        graph[".".join(parts)] = set()
    for name in graph:
        path = PACKAGE.parent.joinpath(*name.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        graph[name] = {m for m in _imports_of(path, name) if m in graph and m != name}
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for child in graph[todo.pop()]:
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def test_nothing_the_daemon_may_import_even_lazily_imports_the_cli():
    graph = _graph()
    assert "jobsyncd.daemon" in _reachable(graph, "jobsyncd.cli") | {
        m for c in graph if c.startswith("jobsyncd.commands") for m in _reachable(graph, c)
    }
    reached = _reachable(graph, "jobsyncd.daemon")
    assert "jobsyncd.cli" not in reached
    assert not {m for m in reached if m.startswith("jobsyncd.commands")}


def test_importing_the_daemon_loads_neither_the_cli_nor_click():
    code = "import sys, jobsyncd.daemon; print(' '.join(sorted(sys.modules)))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert "jobsyncd.daemon" in loaded
    assert "jobsyncd.cli" not in loaded
    assert "click" not in loaded


def test_no_module_imports_a_private_helper_of_the_store():
    """The file-system helpers live in fsutil.py; the store's private names stay its own."""
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("store"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from the store"


def test_no_lock_of_the_agent_needs_the_filelock_package():
    """Every lock is fsutil.FileLock (flock): the filelock package's import cost 20-40 ms."""
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert "filelock" not in names, f"{path.name} imports filelock"


def test_the_lifecycle_and_the_file_system_helpers_import_only_what_the_readme_allows():
    graph = _graph()
    assert graph["jobsyncd.lifecycle"] <= {"jobsyncd.errors", "jobsyncd.model"}
    assert graph["jobsyncd.fsutil"] <= {"jobsyncd.errors"}
    assert graph["jobsyncd.jobtable"] <= {
        "jobsyncd.errors",
        "jobsyncd.model",
        "jobsyncd.storeformat",
    }
    assert graph["jobsyncd.checked"] <= {
        "jobsyncd",
        "jobsyncd.errors",
        "jobsyncd.fsutil",
        "jobsyncd.jobtable",
    }
    assert graph["jobsyncd.runtime"] <= {
        "jobsyncd.log",
        "jobsyncd.config",
        "jobsyncd.fsutil",
        "jobsyncd.store",
        "jobsyncd.wakeup",
    }
    assert "jobsyncd.cli" not in _reachable(graph, "jobsyncd.sync")


def test_the_sync_packages_pure_layers_import_no_store_no_server_and_no_clock_of_their_own():
    graph = _graph()
    pure = {"jobsyncd.model", "jobsyncd.lifecycle", "jobsyncd.api", "jobsyncd.errors"}
    assert graph["jobsyncd.sync.rules"] <= pure
    assert graph["jobsyncd.sync.outcomes"] <= pure | {"jobsyncd.sync.rules"}
    for layer in ("journal", "push", "pull", "run", ""):
        name = f"jobsyncd.sync.{layer}".rstrip(".")
        assert not graph[name] & {"jobsyncd.remote", "jobsyncd.cli", "jobsyncd.config"}, name
