"""Image checkers that decide by position, for tests of the callers of `skillgen.safety.postprocess`: the model's
pictures are noise to a real detector, so a test that needs a blocked image says which one."""

from __future__ import annotations

from collections.abc import Sequence

from skillgen.safety import Decision
from skillgen.safety.decision import CHECK_FAILED

NUDITY = "Your image was blocked: it appears to show nudity."
UNCHECKED = "Your image was withheld: the safety check could not run, so nothing was shown. Please try again."


class BlockAt:
    """Blocks the images at `blocked` (indexes into each `check` call), fails the check at `failed`, allows the
    rest; remembers how many images each call was shown."""

    def __init__(self, blocked: Sequence[int] = (), failed: Sequence[int] = ()):
        self.blocked, self.failed = frozenset(blocked), frozenset(failed)
        self.calls: list[int] = []

    def check(self, images: Sequence) -> list[Decision]:
        self.calls.append(len(images))
        return [self._one(i) for i in range(len(images))]

    def _one(self, index: int) -> Decision:
        if index in self.failed:
            return Decision(allowed=False, category=CHECK_FAILED, reason=UNCHECKED, detail="RuntimeError: test")
        if index in self.blocked:
            return Decision(allowed=False, category="sexual", reason=NUDITY, detail=f"test: image {index}")
        return Decision(allowed=True)
