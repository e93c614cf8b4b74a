"""What the trainer checks before it trains, and before its sample grid leaves: the same prompt policy and image
policy as every other path (docs/architecture.md), by position.

- Every caption (the request's `--caption`, and each image's final caption: a captions file's line or the
  template, with the trigger word) goes through the prompt policy before anything is trained.
- Every training image goes through the image policy, in one call, before training: one blocked image fails
  the job, naming the image by its position ("image 3"), never by the sender's file name or caption.
- The sample grid is drawn from a fixed neutral prompt (SAMPLE_PROMPT) with the trigger word, never from a
  sender's caption; that prompt is checked too, and each cell goes through postprocess.screen.

A refusal is an IngestError (the person's input): the worker answers it with a failed event that says why.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from skillgen.runtime.fetch import IngestError
from skillgen.safety.decision import CHECK_FAILED, Decision
from skillgen.safety.errors import SafetyError
from skillgen.safety.postprocess import ImageChecker, screen, verdict
from trainer.errors import TrainerError

if TYPE_CHECKING:
    from PIL import Image

    from skillgen.safety.prompt import PromptPolicy
    from trainer.ingest import Example

# The sample grid's prompt: neutral, the trigger word its only input from the sender.
SAMPLE_PROMPT = "a {trigger} picture, simple background"
GRID_UNCHECKED = "the image check could not run on the sample grid, so it was not shown"


def sample_prompt(trigger: str) -> str:
    return SAMPLE_PROMPT.format(trigger=trigger)


def check_captions(policy: PromptPolicy, caption: str | None, examples: Sequence[Example] = ()) -> None:
    """IngestError for the first caption the prompt policy refuses: the request's, then each image's in order."""
    if caption:
        decision = policy.check(caption)
        if not decision.allowed:
            raise IngestError(f"the caption is refused: {decision.reason}")
    for i, example in enumerate(examples, 1):
        decision = policy.check(example.caption)
        if not decision.allowed:
            raise IngestError(f"the caption of image {i} is refused: {decision.reason}")


def check_images(policy: ImageChecker, examples: Sequence[Example]) -> None:
    """Every training image through the image check, in one call; IngestError naming the first withheld image by
    position (TrainerError when the check could not run: nothing vouched for it, so nothing is trained)."""
    images = [e.image for e in examples]
    decisions = policy.check(images)
    if len(decisions) != len(images):
        raise SafetyError(f"the image checker answered {len(decisions)} decisions for {len(images)} images")
    withheld = verdict(decisions)
    if withheld is None:
        return
    position = next(i for i, d in enumerate(decisions, 1) if d is withheld)
    if withheld.category == CHECK_FAILED:
        raise TrainerError(f"the image check could not run on image {position}, so nothing was trained; try again")
    raise IngestError(f"image {position} is refused by the image check: {withheld.reason}")


def prompt_refused(policy: PromptPolicy, prompt: str) -> Decision | None:
    """The decision that withholds the sample grid before it is drawn (its prompt is refused), or None."""
    decision = policy.check(prompt)
    if decision.allowed:
        return None
    return Decision(allowed=False, category=decision.category, detail=decision.detail,
                    reason=f"the sample prompt was refused: {decision.reason}")


def screen_cells(cells: Sequence[Image.Image], policy: ImageChecker) -> Decision | None:
    """postprocess.screen over the grid's cells; a checker that breaks its contract withholds the grid as well
    (fail closed): the decision that withholds it, or None to show it."""
    try:
        return screen(cells, policy)
    except SafetyError as exc:
        return Decision(allowed=False, category=CHECK_FAILED, reason=GRID_UNCHECKED, detail=str(exc))
