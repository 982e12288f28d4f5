"""The layout rules of ARCHITECTURE.md, checked from the source (ast only: no Spark, no imports of
the code under test except spark_jobs.cli for its stage list).

- no import circle between modules of udfs/, spark_jobs/, serving/, reporting/ (imports at module
  level and inside functions alike: a lazy import still ties two modules together);
- nothing imports upward: udfs/ is pure (no pyspark, no spark_jobs/serving/reporting), and its
  stage packages import only the packages before them in UDFS_ORDER; serving/ and reporting/ never
  import spark_jobs/ or pyspark; spark_jobs' shared layer never imports a stage module, and a
  stage module imports no other stage (except `run`, which chains them);
- every stage module is thin (at most STAGE_MAX_LINES lines).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOTS = ("udfs", "spark_jobs", "serving", "reporting")
STAGE_MAX_LINES = 250
# Stage modules still over the limit, each with why. Keep this short; a module that is under the
# limit again fails the test until it is taken off.
PENDING: set[str] = set()
# udfs' stage packages, lowest first: each may import udfs' top modules (fsio, ids), its own package
# and those before it, never one after it.
UDFS_ORDER = ("extract", "dedup", "download", "clip", "image_dedup", "filter", "index", "export", "takedown")
UDFS_TOP_SHARED = ("udfs.fsio", "udfs.ids")
STAGE_ORCHESTRATORS = ("spark_jobs.run",)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    out = {}
    for root in ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            if "__pycache__" not in path.parts:
                out[_module_name(path)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file, at any depth. `from pkg import x`
    names the module pkg.x when that is a module of ours, else pkg."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in MODULES else target, node.lineno))
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _ours(target: str) -> str | None:
    """The module of ours an import lands in (a submodule import lands in that submodule)."""
    while target:
        if target in MODULES:
            return target
        target = target.rpartition(".")[0]
    return None


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for name, imports in GRAPH.items():
        for target, _ in imports:
            dest = _ours(target)
            # importing pkg.mod runs pkg/__init__.py too; ours hold docstrings only, so an edge to
            # the package itself is counted only when the package is imported for its own sake.
            if dest and dest != name:
                edges.setdefault(name, set()).add(dest)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle (a path a -> ... -> a) per strongly connected component of more than one
    module (Tarjan's algorithm, then a breadth-first walk inside the component)."""
    nodes = sorted(set(edges).union(*edges.values()) if edges else ())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in nodes:
        if v not in index:
            visit(v)
    cycles = []
    for comp in sorted(comps, key=min):
        start = min(comp)
        back = {start: None}
        frontier = [start]
        while start not in back or back[start] is None:
            nxt = []
            for v in frontier:
                for w in sorted(edges.get(v, ())):
                    if w == start:
                        back[start] = v
                        break
                    if w in comp and w not in back:
                        back[w] = v
                        nxt.append(w)
                if back[start] is not None:
                    break
            frontier = nxt
        path = [start]
        v = back[start]
        while v != start:
            path.append(v)
            v = back[v]
        path.append(start)
        cycles.append(path[::-1])
    return cycles


def test_the_import_walk_sees_every_kind_of_import():
    """The walk itself: function-level imports, `from pkg import module` and relative imports."""
    edges = _edges()
    assert "spark_jobs.export" in edges["spark_jobs.run"]            # inside a function
    assert "udfs.extract.warc_html" in edges["udfs.extract.wat"]      # inside a function
    assert "udfs.index.layout" in edges["udfs.index.tuning"]          # from udfs.index import layout
    assert "spark_jobs.schemas" in edges["spark_jobs.datasets"]
    assert all(name.split(".")[0] in ROOTS for name in MODULES) and len(MODULES) > 60


def test_cycle_finder_names_the_circle():
    two = {"udfs.extract.wat": {"udfs.extract.warc_html", "udfs.fsio"}, "udfs.extract.warc_html": {"udfs.extract.wat"}}
    assert _cycles(two) == [["udfs.extract.warc_html", "udfs.extract.wat", "udfs.extract.warc_html"]]
    three = {"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": set(), "e": {"e2"}, "e2": {"e"}}
    assert _cycles(three) == [["a", "b", "c", "a"], ["e", "e2", "e"]]
    assert _cycles({"a": {"b"}, "b": {"c"}}) == []


def test_no_import_circles():
    cycles = _cycles(_edges())
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def _violations(rule) -> list[str]:
    out = []
    for name, imports in sorted(GRAPH.items()):
        for target, line in imports:
            why = rule(name, target)
            if why:
                out.append(f"{MODULES[name].relative_to(REPO)}:{line} imports {target}: {why}")
    return out


def _udfs_rank(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) >= 3 and parts[0] == "udfs" and parts[1] in UDFS_ORDER:
        return UDFS_ORDER.index(parts[1])
    return None


def _udfs_rule(name: str, target: str) -> str | None:
    if not name.startswith("udfs"):
        return None
    top = target.split(".")[0]
    if top in ("pyspark", "spark_jobs", "serving", "reporting", "tests", "bench", "demo"):
        return "udfs is pure and below every other layer"
    if top != "udfs" or _ours(target) is None:
        return None
    dest = _ours(target)
    if name in UDFS_TOP_SHARED and dest != name:
        return "fsio and ids are the bottom of udfs and import none of it"
    mine, theirs = _udfs_rank(name), _udfs_rank(dest)
    if theirs is not None and mine is not None and theirs > mine:
        return f"udfs.{UDFS_ORDER[mine]} comes before udfs.{UDFS_ORDER[theirs]} (UDFS_ORDER)"
    return None


def _side_rule(name: str, target: str) -> str | None:
    top, dest = target.split(".")[0], _ours(target)
    if name.startswith("serving") and (top in ("pyspark", "spark_jobs", "reporting")):
        return "serving runs without Spark and below reporting and the stages"
    if name.startswith("reporting") and top in ("pyspark", "spark_jobs"):
        return "reporting runs without Spark and below the stages"
    if name.startswith(("udfs", "serving", "reporting")) and top in ("tests", "bench", "demo"):
        return "the code never imports its tests, benchmarks or demo"
    if name.startswith("spark_jobs") and dest and dest.startswith("spark_jobs") and dest != name:
        stages = set(_stage_modules())
        if dest in stages and name not in stages:
            return "the shared layer of spark_jobs never imports a stage"
        if dest in stages and name in stages and name not in STAGE_ORCHESTRATORS:
            return "a stage imports the shared layer, not another stage"
    if name.startswith("spark_jobs") and top in ("tests", "bench", "demo"):
        return "the code never imports its tests, benchmarks or demo"
    return None


def _stage_modules() -> tuple[str, ...]:
    from spark_jobs.cli import STAGE_MODULES

    return tuple(STAGE_MODULES)


def test_udfs_imports_nothing_above_it_and_its_stage_packages_only_downward():
    assert not _violations(_udfs_rule), "\n".join(_violations(_udfs_rule))


def test_serving_reporting_and_stages_import_only_downward():
    assert not _violations(_side_rule), "\n".join(_violations(_side_rule))


def test_layer_rules_catch_upward_imports():
    """The rules themselves, on imports that would break them."""
    assert _udfs_rule("udfs.fsio", "pyspark.sql")
    assert _udfs_rule("udfs.download.fetch", "spark_jobs.config")
    assert _udfs_rule("udfs.extract.wat", "udfs.download.fetch")       # a later stage package
    assert _udfs_rule("udfs.ids", "udfs.extract.urls")
    assert _udfs_rule("udfs.filter.subset_filter", "udfs.clip.embeddings") is None
    assert _side_rule("serving.service", "spark_jobs.datasets")
    assert _side_rule("reporting.report", "pyspark.sql")
    assert _side_rule("spark_jobs.datasets", "spark_jobs.dedup")      # shared layer -> stage
    assert _side_rule("spark_jobs.filter", "spark_jobs.dedup")        # stage -> stage
    assert _side_rule("spark_jobs.run", "spark_jobs.export") is None  # the chain runs them all
    assert _side_rule("spark_jobs.dedup", "spark_jobs.datasets") is None


def test_every_udfs_stage_package_says_what_it_holds():
    for pkg in UDFS_ORDER:
        init = REPO / "udfs" / pkg / "__init__.py"
        assert init.exists(), f"udfs/{pkg}/ has no __init__.py (setup.py and the --py-files zip need it)"
        assert ast.get_docstring(ast.parse(init.read_text())), f"udfs/{pkg}/__init__.py has no docstring"
    folders = {p.parent.name for p in (REPO / "udfs").glob("*/*.py")}
    assert folders <= set(UDFS_ORDER), f"udfs packages missing from UDFS_ORDER: {folders - set(UDFS_ORDER)}"


def test_stage_modules_are_thin():
    sizes = {}
    for module in _stage_modules():
        rel = module.replace(".", "/") + ".py"
        sizes[rel] = len((REPO / rel).read_text(encoding="utf-8").splitlines())
    assert len(sizes) >= 10
    over = {rel: n for rel, n in sizes.items() if n > STAGE_MAX_LINES and rel not in PENDING}
    assert not over, (f"stage modules over {STAGE_MAX_LINES} lines (move what is not read/transform/write/"
                      f"stats into udfs/<stage>/ or the shared layer): {over}")
    done = {rel for rel in PENDING if sizes.get(rel, 0) <= STAGE_MAX_LINES}
    assert not done, f"take these off PENDING, they are thin now: {sorted(done)}"


def test_roots_found_from_a_modules_own_path_are_still_the_repository():
    """A moved module moves its __file__: a repository root computed from it must follow."""
    from spark_jobs import package
    from udfs.clip import clip_model

    assert clip_model._REPO_ROOT == REPO
    assert package.REPO == REPO
