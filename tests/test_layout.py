"""The house in order: the library map names every module, and nothing imports in a circle.

Read with ``ast`` only (nothing is imported), so these run in well under a second:

- ``nblib/__init__.py``'s docstring, the library map, names each module of nblib once and
  no module that is gone;
- nblib's modules import each other without a cycle, and neither model family (``gpt``,
  ``llama``) imports the other: what both need lives in a module both import;
- the scripts in tools/ import each other without a cycle, counting imports made inside
  a function (``course.py grade`` imports grade.py lazily; that is still an edge).
"""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBLIB = ROOT / "nblib"
TOOLS = ROOT / "tools"


def nblib_modules() -> set[str]:
    """nblib's modules and packages, by the name the map uses (``gpt``, ``checks``)."""
    files = {p.stem for p in NBLIB.glob("*.py") if p.stem != "__init__"}
    packages = {p.parent.name for p in NBLIB.glob("*/__init__.py")}
    return files | packages


def map_entries() -> list[str]:
    """The module names the library map lists: its lines ``- ``name``: ...``."""
    doc = ast.get_docstring(ast.parse((NBLIB / "__init__.py").read_text()))
    return re.findall(r"^- ``(\w+)``:", doc, flags=re.MULTILINE)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``path`` imports, wherever the import statement is (top
    level or inside a function). ``from a import b`` imports ``a.b`` if that is a module
    (``from nblib import engine``), else it takes the name ``b`` from ``a``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & known
            found |= submodules
            if len(submodules) < len(node.names):  # some names are a module's contents
                found.add(node.module)
    return found & known


def import_graph(paths: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the modules of ``paths`` it imports (imports from outside ``paths`` are left out)."""
    return {name: imported_modules(path, set(paths)) - {name} for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None: depth-first search for an edge back
    to a module still on the path."""
    done, path = set(), []

    def visit(node):
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for nxt in sorted(graph[node]):
            cycle = visit(nxt)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    return next((cycle for node in sorted(graph) if (cycle := visit(node))), None)


def nblib_graph() -> dict[str, set[str]]:
    paths = {f"nblib.{p.stem}": p for p in NBLIB.glob("*.py") if p.stem != "__init__"}
    paths |= {f"nblib.checks.{p.stem}": p for p in (NBLIB / "checks").glob("*.py") if p.stem != "__init__"}
    paths |= {"nblib": NBLIB / "__init__.py", "nblib.checks": NBLIB / "checks" / "__init__.py"}
    return import_graph(paths)


def test_library_map_names_every_module_once_and_nothing_else():
    listed = map_entries()
    modules = nblib_modules()
    assert sorted(modules - set(listed)) == [], "add these to the library map in nblib/__init__.py's docstring"
    assert sorted(set(listed) - modules) == [], "the library map in nblib/__init__.py names modules that do not exist"
    assert sorted(n for n in listed if listed.count(n) > 1) == [], "the library map names a module twice"


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_lazy_imports_are_edges(tmp_path):
    (tmp_path / "one.py").write_text("import two\n")
    (tmp_path / "two.py").write_text("def main():\n    import one\n    from three import x\n")
    (tmp_path / "three.py").write_text("")
    graph = import_graph({p.stem: p for p in tmp_path.glob("*.py")})
    assert graph == {"one": {"two"}, "two": {"one", "three"}, "three": set()}
    assert find_cycle(graph) == ["one", "two", "one"]


def test_nblib_imports_have_no_cycle():
    graph = nblib_graph()
    assert graph["nblib.llama"] and graph["nblib.ppo"], "the graph lost nblib's own imports: the parser is broken"
    assert find_cycle(graph) is None, f"nblib imports in a circle: {' -> '.join(find_cycle(graph))}"


def test_neither_model_family_imports_the_other():
    graph = nblib_graph()
    assert "nblib.llama" not in graph["nblib.gpt"], "nblib.gpt imports nblib.llama: move what both need to nblib.lm"
    assert "nblib.gpt" not in graph["nblib.llama"], "nblib.llama imports nblib.gpt: move what both need to nblib.lm"


def test_tools_imports_have_no_cycle():
    graph = import_graph({p.stem: p for p in TOOLS.glob("*.py")})
    assert graph["grade"], "the graph lost grade.py's imports: the parser is broken"
    assert find_cycle(graph) is None, f"tools/ imports in a circle: {' -> '.join(find_cycle(graph))}"
