"""The bots package's exceptions: one root, and the few kinds a front-end or delivery acts on differently."""

from __future__ import annotations


class BotError(RuntimeError):
    """Root of every error the bots raise on purpose."""


class Refusal(BotError):
    """A command that will not run, with the message for the person who sent it (shown only to them)."""


class RateLimited(Refusal):
    """Over a rate limit or quota; `retry_at_s` (epoch seconds) is when the person can try again."""

    def __init__(self, message: str, retry_at_s: float):
        super().__init__(message)
        self.retry_at_s = retry_at_s


class DeliveryError(BotError):
    """A chat post that did not happen."""


class RetryAfter(DeliveryError):
    """The platform answered 429: try again in `after_s` seconds."""

    def __init__(self, message: str, after_s: float):
        super().__init__(message)
        self.after_s = after_s


class Transient(DeliveryError):
    """A 5xx or a broken connection: the same post may succeed later."""


class Undeliverable(DeliveryError):
    """The platform refused the post for good (unknown channel, missing access): retrying changes nothing."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status
