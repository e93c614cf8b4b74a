"""The import rules of ARCHITECTURE.md ("The parts"), checked on every import statement, those inside functions
included: a lazy import breaks a layer as surely as a top-level one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
MUST_NOT_IMPORT = {
    "schemas": {"torch", "bots", "consumer", "trainer"},
    "bots": {"torch", "diffusers"},
    "consumer": {"bots"},
    "trainer": {"bots"},
}


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("folder", sorted(MUST_NOT_IMPORT))
def test_each_part_imports_only_what_the_architecture_allows(folder):
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files
    broken = {str(f.relative_to(ROOT)): sorted(imported(f) & MUST_NOT_IMPORT[folder]) for f in files}
    assert {f: names for f, names in broken.items() if names} == {}
