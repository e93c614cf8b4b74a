"""The one post-processing step every image passes before it leaves the system.

    outcome = release(images, seeds, image_policy, blobs)
    if isinstance(outcome, Decision): ...   # withheld: nothing was stored, say outcome.reason
    else: ...                               # outcome: one BlobRef per image, in order

The consumer (generated images) and replay (reprocessed ones) call it, and the trainer `screen`s every cell of
its sample grid before composing it, as diffusers' pipelines all end in `run_safety_checker`: no caller can skip
the check or re-word it.
Every image is checked before anything is stored, and one blocked image withholds the whole request: a person
never gets the allowed part of a request whose other images were blocked. When a check could not run, the
decision says so (category "check_failed"), so the caller answers "failed, try again" rather than "blocked".
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from schemas.messages import BlobRef
from skillgen.runtime.blobstore import BlobStore
from skillgen.safety.decision import CHECK_FAILED, Decision
from skillgen.safety.errors import SafetyError

if TYPE_CHECKING:
    from PIL import Image

# Bump when the rule of this step changes (which images are checked, how a verdict is reached, what is stored):
# it is part of the safety policy's fingerprint (fingerprint.py), so cached images made under the old rule
# become misses instead of being served for the rest of their TTL.
POSTPROCESS_VERSION = 1


class ImageChecker(Protocol):
    def check(self, images: Sequence[Image.Image]) -> list[Decision]: ...


def verdict(decisions: Sequence[Decision]) -> Decision | None:
    """The decision that withholds a set of images, or None when every image is allowed. A failed check wins
    over a block: nothing vouched for that image, so the person is told to try again rather than refused."""
    blocked = [d for d in decisions if not d.allowed]
    if not blocked:
        return None
    return next((d for d in blocked if d.category == CHECK_FAILED), blocked[0])


def screen(images: Sequence[Image.Image], policy: ImageChecker) -> Decision | None:
    """Check every image; the decision that withholds them all, or None when each one is allowed. For callers
    that store something other than the images themselves (the trainer stores one grid of its cells)."""
    decisions = policy.check(list(images))
    if len(decisions) != len(images):  # an image without a decision was vouched for by nothing
        raise SafetyError(
            f"the image checker answered {len(decisions)} decisions for {len(images)} images; "
            "its check must return one decision per image, in order"
        )
    return verdict(decisions)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def release(images: Sequence[Image.Image], seeds: Sequence[int | None], policy: ImageChecker,
            blobs: BlobStore) -> list[BlobRef] | Decision:
    """Check every image, then store each as a PNG; the withholding Decision instead when any is not allowed.
    Blocking, CPU-bound work (the checks and PNG encoding): call it from a worker thread."""
    if len(images) != len(seeds):
        raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
    withheld = screen(images, policy)
    if withheld is not None:
        return withheld
    return [
        blobs.put(png_bytes(img), width=img.width, height=img.height, seed=seed)
        for img, seed in zip(images, seeds)
    ]
