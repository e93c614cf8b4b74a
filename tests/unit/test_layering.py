"""The floor plan of docs/architecture.md, checked on the import closure.

    floor 4  skillgen.cli, skillgen.tools                  anything
    floor 3  bots, consumer, trainer                        peer services: never one another
    floor 2  skillgen.inference, skillgen.safety, skillgen.adapters
    floor 1  skillgen.runtime
    floor 0  schemas                                        contracts only: no client library

Every import statement counts, those inside functions included (a lazy import breaks a floor as surely as a
top-level one), and a module is judged by everything it reaches through our own modules, not by its own file
alone: a bot that imports a shared module which imports torch would import torch too. The last test imports the
modules the bot processes really run, in a fresh interpreter, and looks at what got loaded.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("schemas", "bots", "consumer", "trainer", "skillgen")

# Each part, by module prefix (the longest prefix decides), and which of our parts its closure may reach.
SHARED = {"schemas", "skillgen.runtime"}
ALLOWED = {
    "schemas": {"schemas"},
    "skillgen.runtime": {"schemas", "skillgen.runtime"},
    "skillgen.inference": SHARED | {"skillgen.inference"},
    "skillgen.safety": SHARED | {"skillgen.safety"},
    "skillgen.adapters": SHARED | {"skillgen.adapters"},
    "bots": SHARED | {"skillgen.safety", "skillgen.adapters", "bots"},
    "consumer": SHARED | {"skillgen.inference", "skillgen.safety", "skillgen.adapters", "consumer"},
    "trainer": SHARED | {"skillgen.inference", "skillgen.safety", "skillgen.adapters", "trainer"},
}
TOP = {"skillgen.cli", "skillgen.tools", "skillgen"}  # floor 4: may import anything
CLIENTS = {"aiokafka", "redis", "aiohttp", "fsspec", "s3fs", "prometheus_client", "requests", "httpx",
           "torch", "diffusers", "transformers", "onnxruntime", "discord", "slack_sdk", "slack_bolt"}
ML = {"torch", "diffusers", "transformers", "onnxruntime", "peft", "nudenet"}


def part_of(module: str) -> str:
    names = sorted(set(ALLOWED) | TOP, key=len, reverse=True)
    return next(p for p in names if module == p or module.startswith(p + "."))


def module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def all_modules() -> list[str]:
    out = []
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out.append(".".join(parts))
    return sorted(out)


@cache
def direct_imports(module: str) -> frozenset[str]:
    """Absolute module names imported anywhere in `module`'s file; `from a import b` counts a.b where that is
    a module of ours."""
    path = module_file(module)
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:
                pkg = module.split(".")[: len(module.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join([*pkg, node.module])
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names if module_file(f"{base}.{a.name}")}
    return frozenset(names)


@cache
def closure(module: str) -> frozenset[str]:
    """Every module reachable from `module` through imports of our own modules (third-party names included,
    but not followed)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        for name in direct_imports(current):
            if name in seen:
                continue
            seen.add(name)
            ours = name.split(".")[0] in PACKAGES and module_file(name) is not None
            if ours:
                todo.append(name)
            # importing a.b.c runs a/__init__ and a/b/__init__ too
            parts = name.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                if parent not in seen and parent.split(".")[0] in PACKAGES and module_file(parent):
                    seen.add(parent)
                    todo.append(parent)
    return frozenset(seen)


def ours(names) -> set[str]:
    return {n for n in names if n.split(".")[0] in PACKAGES and module_file(n) is not None}


MODULES = [m for m in all_modules() if part_of(m) in ALLOWED]


@pytest.mark.parametrize("module", MODULES)
def test_a_modules_closure_stays_on_its_floor_or_below(module):
    allowed = ALLOWED[part_of(module)]
    outside = sorted(n for n in ours(closure(module)) if part_of(n) not in allowed and n not in ("skillgen",))
    assert outside == [], f"{module} reaches {outside}"


@pytest.mark.parametrize("module", [m for m in MODULES if part_of(m) == "schemas"])
def test_contracts_reach_no_client_library(module):
    reached = {n.split(".")[0] for n in closure(module)}
    assert reached & CLIENTS == set()


def test_no_service_imports_another():
    services = {"bots", "consumer", "trainer"}
    crossings = sorted(
        f"{m} -> {n}" for m in MODULES if part_of(m) in services
        for n in ours(closure(m)) if part_of(n) in services and part_of(n) != part_of(m)
    )
    assert crossings == []


def test_the_checker_sees_a_lazy_import_deep_in_the_closure():
    # consumer.worker imports the engine only inside a function, and the ONNX backend only through
    # skillgen.inference's own lazy imports: the closure must still see both.
    assert {"skillgen.inference.engine", "skillgen.inference.onnx_backend"} <= closure("consumer.worker")
    assert part_of("bots.train_commands") == "bots"


def test_no_shipped_module_is_over_450_lines():
    long = {m: n for m in all_modules() if (n := module_file(m).read_text().count("\n")) > 450}
    assert long == {}


BOT_PROCESSES = ["bots.discord_bot", "bots.slack_bot", "bots.delivery", "bots.console", "bots.training",
                 "bots.training_discord", "bots.training_slack", "skillgen.cli"]


def test_a_bot_process_loads_no_ml_library():
    code = (
        "import sys, importlib\n"
        f"for m in {BOT_PROCESSES!r}: importlib.import_module(m)\n"
        f"print(sorted({{n.split('.')[0] for n in sys.modules}} & set({sorted(ML)!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
