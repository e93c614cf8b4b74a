"""What happens to a batch that raised (consumer/gpu.py): which request is to blame is unknown, so a batch of several
is split and each request retried alone at once; a request that fails alone is retried with doubling backoff up to
`max_retries`, then given up; an error that names the request itself (PipelineError) is given up at once, since
retrying changes nothing. A pure function, unit-tested (tests/unit/test_routing.py)."""

from __future__ import annotations

from dataclasses import dataclass

from consumer.flight import Flight
from skillgen.inference.errors import PipelineError

RETRIES_SPENT = "generation failed after retries; the team has been notified"


@dataclass(frozen=True)
class Requeue:
    """Run the flight again in a batch of its own after `delay_s`."""

    flight: Flight
    delay_s: float
    attempts: int


@dataclass(frozen=True)
class GiveUp:
    """Answer the flight's requesters with `message`; `error` goes to the DLQ with their records (None: the
    request itself cannot be served, which is an answer, not an incident)."""

    flight: Flight
    message: str
    error: BaseException | None


def after_failure(flights: list[Flight], exc: BaseException, max_retries: int,
                  retry_backoff_ms: int) -> list[Requeue | GiveUp]:
    if len(flights) > 1:
        return [Requeue(f, 0.0, f.attempts) for f in flights]
    (f,) = flights
    if isinstance(exc, PipelineError):
        return [GiveUp(f, str(exc), None)]
    attempts = f.attempts + 1
    if attempts > max_retries:
        return [GiveUp(f, RETRIES_SPENT, exc)]
    return [Requeue(f, retry_backoff_ms / 1000 * 2 ** (attempts - 1), attempts)]
