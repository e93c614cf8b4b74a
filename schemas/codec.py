"""The one wire format for Kafka records: a JSON value plus a few headers.

Headers carry what a router needs without decoding the body (type, schema version, request id); the value is
the pydantic model's JSON. Decoding never executes anything from the record.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError

from schemas.messages import SCHEMA_VERSION

M = TypeVar("M", bound=BaseModel)
Headers = list[tuple[str, bytes]]

CONTENT_TYPE = "application/json"
MAX_RECORD_BYTES = 64 * 1024


class CodecError(ValueError):
    """A record that cannot be decoded into the expected message: it belongs in the DLQ, not in a crash."""


def encode(msg: BaseModel, extra_headers: Headers | None = None) -> tuple[bytes, Headers]:
    value = msg.model_dump_json().encode()
    if len(value) > MAX_RECORD_BYTES:
        raise CodecError(f"{type(msg).__name__} is {len(value)} bytes, over the {MAX_RECORD_BYTES}-byte record limit")
    headers: Headers = [
        ("content-type", CONTENT_TYPE.encode()),
        ("type", type(msg).__name__.encode()),
        ("schema-version", str(SCHEMA_VERSION).encode()),
    ]
    rid = getattr(msg, "request_id", None)
    if rid:
        headers.append(("request-id", rid.encode()))
    return value, headers + list(extra_headers or [])


def header(headers: Headers | None, name: str) -> str | None:
    for k, v in headers or ():
        if k == name:
            return v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v)
    return None


def decode(value: bytes | None, model: type[M], headers: Headers | None = None) -> M:
    if value is None:
        raise CodecError("record has no value")
    declared = header(headers, "type")
    if declared is not None and declared != model.__name__:
        raise CodecError(f"record type {declared!r} where {model.__name__} was expected")
    if len(value) > MAX_RECORD_BYTES:
        raise CodecError(f"record is {len(value)} bytes, over the {MAX_RECORD_BYTES}-byte limit")
    try:
        return model.model_validate_json(value)
    except ValidationError as exc:
        raise CodecError(f"invalid {model.__name__}: {describe(exc)}") from exc


def describe(exc: ValidationError) -> str:
    """One line a person can read: each failing field and why."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(whole record)"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)
