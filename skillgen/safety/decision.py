from __future__ import annotations

from pydantic import BaseModel, ConfigDict, model_validator

CHECK_FAILED = "check_failed"


class Decision(BaseModel):
    """The verdict on one prompt or one image.

    `reason` is a sentence written for the person who asked, safe to post in the chat.
    `detail` says what matched (the normalized text that hit a term list, a detector's class and
    score, an error): for operators' logs, never for the chat.
    `category` is the term list's category ("sexual", "violence", a team's own), or "check_failed"
    when an image checker raised and the image was blocked because nothing vouched for it.
    """

    model_config = ConfigDict(frozen=True)

    allowed: bool
    reason: str | None = None
    category: str | None = None
    detail: str | None = None

    @model_validator(mode="after")
    def _blocked_says_why(self) -> Decision:
        if self.allowed and (self.reason or self.category or self.detail):
            raise ValueError("an allowed decision carries no reason, category or detail")
        if not self.allowed and not (self.reason and self.category):
            raise ValueError("a blocked decision needs a reason and a category")
        return self
