"""The package's import directions (ARCHITECTURE.md's never-arrows), checked on the source.

Every ``import`` and ``from ... import`` in ``kachery_fs/`` is read, at any depth (an
import inside a function counts too), and resolved to a module name:

- the hub (``kachery_fs.hub``, ``kachery_fs.localbucket``) never imports the mount
  (``kachery_fs.fs``) nor the command line (``kachery_fs.cli``);
- the core (everything but ``fs`` and ``cli``) knows no FUSE (``pyfuse3``) and no command
  line, and does not reach into the hub's server modules;
- the mount's pure modules hold no pyfuse3 code, and the mount never imports the command
  line;
- the modules import one another without cycles (module-level imports, and those made
  for type checking only).
"""

from __future__ import annotations

import ast
from pathlib import Path

import kachery_fs

ROOT = Path(kachery_fs.__file__).parent
#: fs/ modules that must stay free of pyfuse3: the mount's logic, testable without FUSE.
PURE_FS = {"kachery_fs.fs.staging", "kachery_fs.fs.attrs", "kachery_fs.fs.namespace",
           "kachery_fs.fs.vnodes"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    """The modules ``path`` imports (``from X import y`` gives X, and X.y when that is a
    module of ours)."""
    name = _module_name(path)
    package = name if _is_package(path) else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    if top_level_only:  # and in `if TYPE_CHECKING:` blocks: a cycle of types is one too
        nodes = [n for top in tree.body
                 for n in ([top] if not isinstance(top, ast.If) else top.body)]
    else:
        nodes = list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            for alias in node.names:
                candidate = f"{module}.{alias.name}"
                if _exists(candidate):
                    found.add(candidate)
    return found


def _exists(module: str) -> bool:
    if not module.startswith("kachery_fs"):
        return False
    rel = Path(*module.split(".")[1:])
    return (ROOT / rel).with_suffix(".py").exists() or (ROOT / rel / "__init__.py").exists()


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _in(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _violations(rule) -> list[str]:
    bad = []
    for name, path in _sources().items():
        for imported in sorted(_imports(path)):
            why = rule(name, imported)
            if why:
                bad.append(f"{name} imports {imported}: {why}")
    return bad


def test_the_hub_never_imports_the_mount_or_the_command_line():
    def rule(name, imported):
        if _in(name, "kachery_fs.hub", "kachery_fs.localbucket") and _in(
                imported, "kachery_fs.fs", "kachery_fs.cli", "pyfuse3"):
            return "the hub is a server of its own"
    assert _violations(rule) == []


def test_the_core_knows_no_fuse_and_no_command_line():
    def rule(name, imported):
        if _in(name, "kachery_fs.fs", "kachery_fs.cli") or name == "kachery_fs.__main__":
            return None
        if _in(imported, "pyfuse3", "kachery_fs.fs"):
            return "the core knows no FUSE"
        if _in(imported, "kachery_fs.cli", "argparse"):
            return "the core knows no command line"
        if not _in(name, "kachery_fs.hub", "kachery_fs.localbucket") and _in(
                imported, "kachery_fs.hub", "kachery_fs.localbucket"):
            return "node-side code talks to the hub over HTTP only (kachery_fs.hub_client)"
    assert _violations(rule) == []


def test_the_mount_keeps_its_logic_free_of_fuse_and_never_imports_the_command_line():
    def rule(name, imported):
        if name in PURE_FS and _in(imported, "pyfuse3"):
            return "a pure module of the mount"
        if _in(name, "kachery_fs.fs") and _in(imported, "kachery_fs.cli"):
            return "the mount never imports the command line"
    assert _violations(rule) == []
    assert all(name in _sources() for name in PURE_FS)


def test_modules_import_one_another_without_cycles():
    sources = _sources()
    graph = {name: {m for m in _imports(path, top_level_only=True) if m in sources and m != name}
             for name, path in sources.items()}
    # A package's __init__ re-exporting its own modules is not a cycle of concerns.
    for name in graph:
        graph[name] = {m for m in graph[name] if not (_is_package(sources[m]) and
                                                      name.startswith(m + "."))}
    cycles = []
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == []


def test_the_checks_see_imports():
    """The reader resolves relative and function-level imports (so the checks can fail)."""
    parse = _imports(ROOT / "fs" / "mount.py")
    assert "pyfuse3" in parse and "kachery_fs.parts" in parse
    assert "kachery_fs.fs.mount" in _imports(ROOT / "cli" / "mount.py")  # inside a function


def _attribute_users(name: str) -> set[str]:
    """The modules whose code reads an attribute called ``name``."""
    users = set()
    for path in ROOT.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        if any(isinstance(node, ast.Attribute) and node.attr == name
               for node in ast.walk(tree)):
            users.add(_module_name(path))
    return users


def test_bucket_reads_take_their_urls_from_readurls():
    """Only ``readurls`` makes a URL of a channel's bucket base (the record's
    ``bucket_base_url``): a read that built one itself would read a private channel
    anonymously, and be refused. (``status`` shows the base.)"""
    assert _attribute_users("bucket_base_url") == {"kachery_fs.readurls", "kachery_fs.status"}
