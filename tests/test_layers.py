"""The layering of ARCHITECTURE.md, checked on the source: a lower layer never imports a higher one.

ingest <- producers, twin_store <- stream_processors <- bench <- nettwin (the command line, which runs the
benchmarks as ``nettwin bench``). Product code never imports bench. Inside the twin store: models <-
federation <- adapters <- services. Algorithms (the twin models, federation, the pure
stream logic) import no Kafka, Faust or InfluxDB client. Every import counts, also those inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("ingest", "producers", "twin_store", "stream_processors", "nettwin", "bench")

# what each layer may import from the project (itself included)
ALLOWED: dict[str, set[str]] = {
    "ingest": {"ingest"},
    "producers": {"ingest", "producers"},
    "twin_store": {"ingest", "twin_store"},
    "stream_processors": {"ingest", "twin_store", "stream_processors"},
    "bench": {"ingest", "producers", "twin_store", "stream_processors", "bench"},
    "nettwin": {"ingest", "producers", "twin_store", "stream_processors", "bench", "nettwin"},
}
TWIN_STORE_ORDER = ("models", "federation", "adapters", "services")
SERVICE_CLIENTS = ("kafka", "aiokafka", "faust", "mode", "requests", "aiohttp", "paho")
# modules that must stay plain algorithms: no broker, stream runtime or database client
PURE = (
    "twin_store/models",
    "twin_store/federation",
    "stream_processors/processor.py",
    "stream_processors/windows.py",
    "stream_processors/bs_agents.py",
    "stream_processors/multimodal_live.py",
    "stream_processors/sensor_screening.py",
)


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def _imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


@pytest.mark.parametrize("path", _modules(), ids=_rel)
def test_layers(path: Path) -> None:
    layer = path.relative_to(REPO).parts[0]
    wrong = sorted(
        {n for n in _imports(path) if n.split(".")[0] in PACKAGES and n.split(".")[0] not in ALLOWED[layer]}
    )
    assert not wrong, f"{_rel(path)} ({layer}) imports a higher layer: {wrong}"


@pytest.mark.parametrize("path", sorted((REPO / "twin_store").rglob("*.py")), ids=_rel)
def test_twin_store_roles(path: Path) -> None:
    parts = path.relative_to(REPO / "twin_store").parts
    if len(parts) < 2:
        return
    rank = TWIN_STORE_ORDER.index(parts[0])
    higher = {f"twin_store.{r}" for r in TWIN_STORE_ORDER[rank + 1 :]}
    wrong = sorted({n for n in _imports(path) if ".".join(n.split(".")[:2]) in higher})
    assert not wrong, f"{_rel(path)} ({parts[0]}) imports a higher role: {wrong}"


@pytest.mark.parametrize("path", [p for p in _modules() if _rel(p).startswith(PURE)], ids=_rel)
def test_algorithms_free_of_services(path: Path) -> None:
    wrong = sorted({n for n in _imports(path) if n.split(".")[0] in SERVICE_CLIENTS})
    wrong += sorted(
        {n for n in _imports(path) if n.startswith(("twin_store.adapters", "twin_store.services"))}
    )
    assert not wrong, f"{_rel(path)} is an algorithm but imports {wrong}"


def test_no_package_cycle() -> None:
    edges: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for path in _modules():
        src = path.relative_to(REPO).parts[0]
        edges[src] |= {n.split(".")[0] for n in _imports(path) if n.split(".")[0] in PACKAGES} - {src}
    seen: set[str] = set()

    def visit(node: str, stack: tuple[str, ...]) -> None:
        assert node not in stack, f"package cycle: {' -> '.join((*stack, node))}"
        if node in seen:
            return
        for nxt in edges[node]:
            visit(nxt, (*stack, node))
        seen.add(node)

    for p in PACKAGES:
        visit(p, ())
