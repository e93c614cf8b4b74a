"""Transparency: a reference id on every refusal, and an audit log of refusals (JSON lines, off by default).

    ref = reference("nude woman")          # "3fa9c2d1": 8 hex characters, new each time
    with_ref("Your prompt was blocked: ...", ref)   # "... (ref 3fa9c2d1)"
    AuditLog(Path("/var/log/skillgen/safety.jsonl")).write({"ref": ref, ...})

SKILL_SAFETY_AUDIT_LOG names the file; each refusal appends one line: the time (UTC, ISO 8601), the ref, the
category, the layer that fired, what matched, and the normalised text (prompt and negative prompt) it matched in.
The person sees only the ref; an operator greps the log for it. The log is appended to from any thread; a line
that cannot be written is logged as a warning and never turns a refusal into an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)


def reference(text: str) -> str:
    """A short id for one refusal: a hash of the normalised text, the time and the process."""
    seed = f"{text}\0{time.time_ns()}\0{os.getpid()}\0{threading.get_ident()}".encode()
    return hashlib.sha256(seed).hexdigest()[:8]


def with_ref(reason: str, ref: str) -> str:
    return f"{reason} (ref {ref})"


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def write(self, record: dict) -> None:
        line = json.dumps({"time": datetime.now(UTC).isoformat(timespec="milliseconds"), **record},
                          ensure_ascii=False, sort_keys=True)
        try:
            with self._lock, open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError as exc:
            log.warning("cannot write the safety audit log %s: %s", self.path, exc)


def from_setting(path: Path | None) -> AuditLog | None:
    return AuditLog(path) if path else None
