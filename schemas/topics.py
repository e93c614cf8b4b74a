"""Topic names. A prefix (SKILL_TOPIC_PREFIX) lets tests and staging share one broker without sharing data."""

from __future__ import annotations

from dataclasses import dataclass

GENERATE = "skill.generate"
FINETUNE = "skill.finetune"
FINETUNE_CANCEL = "skill.finetune.cancel"
GENERATE_CANCEL = "skill.generate.cancel"
EVENTS = "skill.events"
DLQ_SUFFIX = ".dlq"

CONSUMER_GROUP = "consumers"
TRAINER_GROUP = "trainers"
DELIVERY_GROUP = "delivery"


def dlq(topic: str) -> str:
    return topic + DLQ_SUFFIX


@dataclass(frozen=True)
class Topics:
    prefix: str = ""

    @property
    def generate(self) -> str:
        return self.prefix + GENERATE

    @property
    def finetune(self) -> str:
        return self.prefix + FINETUNE

    @property
    def finetune_cancel(self) -> str:
        """Cancels, read by every trainer from its end (no group, no DLQ: an undecodable cancel is skipped)."""
        return self.prefix + FINETUNE_CANCEL

    @property
    def generate_cancel(self) -> str:
        """Image cancels, read by every consumer from its end (no group, no DLQ), like `finetune_cancel`."""
        return self.prefix + GENERATE_CANCEL

    @property
    def events(self) -> str:
        return self.prefix + EVENTS

    def dlq(self, topic: str) -> str:
        return dlq(topic)

    def all(self) -> list[str]:
        base = [self.generate, self.finetune, self.events]
        return base + [dlq(t) for t in base] + [self.finetune_cancel, self.generate_cancel]

    def group(self, name: str) -> str:
        """Consumer group ids get the prefix too, so isolated test runs never share offsets."""
        return self.prefix + name
