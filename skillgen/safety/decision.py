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
    `ref` is a short reference id (8 hex characters) that the reason ends with, "(ref 3fa9c2d1)", so a person
    can quote it and an operator find the refusal in the audit log; `layer` names the check that refused
    ("lexicon", "semantic", "negative", "nudenet", "sd_checker", "image").
    """

    model_config = ConfigDict(frozen=True)

    allowed: bool
    reason: str | None = None
    category: str | None = None
    detail: str | None = None
    ref: str | None = None
    layer: str | None = None

    @model_validator(mode="after")
    def _blocked_says_why(self) -> Decision:
        if self.allowed and (self.reason or self.category or self.detail or self.ref or self.layer):
            raise ValueError("an allowed decision carries no reason, category, detail, ref or layer")
        if not self.allowed and not (self.reason and self.category):
            raise ValueError("a blocked decision needs a reason and a category")
        return self
