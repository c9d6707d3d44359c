"""The package's import structure: no module imports one that (directly or not) imports it
back, at the top of a file or inside a function."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("fcmae", "sparse_ops")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (``from . import x`` of a
    submodule counts as importing that submodule, not the package)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + [node.module] if node.module else base) if node.level else node.module
            submodules = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in known]
            found |= set(submodules) if submodules and len(submodules) == len(node.names) else {target}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {module for module in found if module in known and module != name}


def test_no_import_cycles():
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            current = todo.pop()
            for following in graph[current] - seen:
                if following == goal:
                    return True
                seen.add(following)
                todo.append(following)
        return False
    cycles = sorted(f"{a} -> {b} -> … -> {a}" for a in graph for b in graph[a] if reaches(b, a))
    assert not cycles, cycles
