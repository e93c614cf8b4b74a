"""The bots package's exceptions: one root, and the few kinds a front-end or delivery acts on differently."""

from __future__ import annotations


class BotError(RuntimeError):
    """Root of every error the bots raise on purpose."""


class Refusal(BotError):
    """A command that will not run, with the message for the person who sent it (shown only to them). One made
    with `of(key, ...)` comes from the catalogues (bots/locales) and can be said in the sender's language."""

    def __init__(self, message: str, key: str | None = None, **params: object):
        super().__init__(message)
        self.key = key
        self.params = params

    @classmethod
    def of(cls, key: str, **params: object) -> Refusal:
        from bots.locales import t

        return cls(t(key, **params), key, **params)

    def say(self, lang: str = "en") -> str:
        """The message in `lang` when it is a catalogue's; as raised otherwise."""
        if self.key is None:
            return str(self)
        from bots.locales import t

        return t(self.key, lang, **self.params)


class RateLimited(Refusal):
    """Over a rate limit or quota; `retry_at_s` (epoch seconds) is when the person can try again."""

    def __init__(self, message: str, retry_at_s: float, key: str | None = None, **params: object):
        super().__init__(message, key, **params)
        self.retry_at_s = retry_at_s

    @classmethod
    def of(cls, key: str, retry_at_s: float, **params: object) -> RateLimited:
        from bots.locales import t

        return cls(t(key, **params), retry_at_s, key, **params)


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
