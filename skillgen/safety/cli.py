"""`skillgen safety check`: prompts one per line on stdin, `allow` or `block<TAB>reason` per line on stdout.

A line may carry a negative prompt after a tab, `prompt<TAB>negative`; a line without a tab has none.
"""

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


def policy_from(args: argparse.Namespace, command: str) -> PromptPolicy | None:
    """The policy the settings and `--extra-terms` ask for; None (after one line on stderr) when it cannot load."""
    try:
        settings = SafetySettings()
        return PromptPolicy(extra_terms=[*settings.extra_terms, *args.extra_terms], audit_log=settings.audit_log)
    except SafetyError as exc:
        print(f"skillgen safety {command}: {exc}", file=sys.stderr)
        return None


def utf8_stdio() -> None:
    # Prompts are UTF-8 by contract, whatever the locale or PYTHONIOENCODING say.
    for stream in (sys.stdin, sys.stdout):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(encoding="utf-8", errors="replace")


def run(args: argparse.Namespace) -> int:
    policy = policy_from(args, "check")
    if policy is None:
        return 2
    utf8_stdio()
    for line in sys.stdin:
        prompt, _, negative = line.rstrip("\r\n").partition("\t")
        decision = policy.check(prompt, negative)
        print("allow" if decision.allowed else f"block\t{decision.reason}", flush=True)
    return 0
