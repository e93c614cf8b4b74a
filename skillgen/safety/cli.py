"""`skillgen safety check`: prompts one per line on stdin, `allow` or `block<TAB>reason` per line on stdout."""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from skillgen.safety.errors import SafetyError
from skillgen.safety.prompt import PromptPolicy
from skillgen.safety.settings import SafetySettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--extra-terms",
        type=Path,
        action="append",
        default=[],
        metavar="PATH",
        help="another term list, on top of SKILL_SAFETY_EXTRA_TERMS (repeatable)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        policy = PromptPolicy(extra_terms=[*SafetySettings().extra_terms, *args.extra_terms])
    except SafetyError as exc:
        print(f"skillgen safety check: {exc}", file=sys.stderr)
        return 2
    # Prompts are UTF-8 by contract, whatever the locale or PYTHONIOENCODING say.
    for stream in (sys.stdin, sys.stdout):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(encoding="utf-8", errors="replace")
    for line in sys.stdin:
        decision = policy.check(line.rstrip("\r\n"))
        print("allow" if decision.allowed else f"block\t{decision.reason}", flush=True)
    return 0
