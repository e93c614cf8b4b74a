"""Message contracts, topic names, the wire codec and shared connection settings. Imports no torch."""

from schemas.messages import (
    SCHEMA_VERSION,
    AdapterRef,
    BlobRef,
    EventKind,
    FineTuneRequest,
    GenerateRequest,
    JobEvent,
    Origin,
    Platform,
)
from schemas.topics import Topics

__all__ = [
    "SCHEMA_VERSION",
    "AdapterRef",
    "BlobRef",
    "EventKind",
    "FineTuneRequest",
    "GenerateRequest",
    "JobEvent",
    "Origin",
    "Platform",
    "Topics",
]
