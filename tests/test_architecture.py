"""The layout docs/architecture.md draws is the code's: every module is on the map, and
the rules of the map hold (one gateway to Kubernetes, one speaker of DNS, imports that
point one way, with no cycle)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "exporter"


def modules() -> dict[str, Path]:
    """Dotted name (below exporter) -> file, packages' faces left out."""
    return {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p
            for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}


def mapped() -> set[str]:
    """The modules docs/architecture.md names in its map (the first code block)."""
    text = (REPO / "docs" / "architecture.md").read_text()
    block = text.split("```", 2)[1]
    names, folder = set(), ""
    for line in block.splitlines():
        top = re.match(r"^(\w+)/", line)
        if top:
            folder = top.group(1) + "."
            names |= {folder + n for n in re.findall(r"\b(\w+)\.py\b", line[len(top.group(0)):])}
        elif re.match(r"^\w+\.py", line):
            folder = ""
            names.add(line.split(".py", 1)[0])
        else:
            entry = re.match(r"^\s{2}(\w+)\.py\b", line)
            if entry:
                names.add(folder + entry.group(1))
    return names


def imports(path: Path, name: str) -> set[str]:
    """What a module imports: project modules (dotted, below exporter) and top-level
    third-party names."""
    package = name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.add((node.module or "").split(".")[0])
                continue
            base = package[: len(package) - (node.level - 1)]
            target = [*base, *(node.module.split(".") if node.module else [])]
            for alias in node.names:
                full = ".".join([*target, alias.name])
                found.add("exporter:" + (full if full in modules() else ".".join(target)))
    return found


def test_every_module_is_on_the_map_and_every_mapped_one_exists() -> None:
    assert mapped() == set(modules())


def test_one_gateway_to_kubernetes_and_one_speaker_of_dns() -> None:
    for name, path in modules().items():
        used = imports(path, name)
        if "kubernetes" in used or "urllib3" in used:
            assert name.startswith("kube."), name
        if "dns" in used:
            assert name.startswith("dns."), name


def test_imports_point_one_way_without_a_cycle() -> None:
    graph = {name: {i.removeprefix("exporter:") for i in imports(path, name)
                    if i.startswith("exporter:")} for name, path in modules().items()}
    # The shared vocabulary imports nothing of the project.
    assert not {i for i in graph["model"] if i}, graph["model"]
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            assert state.get(nxt) != 1, " -> ".join([*trail, node, nxt])
            if nxt in graph and nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])
