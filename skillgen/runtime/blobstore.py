"""Content-addressed blob store over fsspec: file:// by default, s3:// (or any fsspec URL) in production.

Blobs are named by their SHA-256, so writing the same bytes twice is a no-op and a redelivered job cannot
produce a second, different object under the same name.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import uuid

import fsspec

from schemas.messages import BlobRef


class BlobError(RuntimeError):
    pass


_EXT = {"image/png": ".png", "application/json": ".json", "application/octet-stream": ".bin"}
# The only names this store writes, so the only names it reads: `ab/ab12...64 hex.ext`. A reference that names
# anything else (`../`, another folder, a name that is not its own digest) is refused before touching the disk.
_NAME = re.compile(r"([0-9a-f]{2})/([0-9a-f]{64})\.(png|json|bin)")


class BlobStore:
    def __init__(self, url: str):
        if url.startswith("file://"):
            url = "file://" + os.path.abspath(url.removeprefix("file://"))
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)

    def put(self, data: bytes, content_type: str = "image/png", **meta) -> BlobRef:
        digest = hashlib.sha256(data).hexdigest()
        rel = f"{digest[:2]}/{digest}{_EXT.get(content_type, '.bin')}"
        path = posixpath.join(self.root, rel)
        if not self.fs.exists(path):
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"  # unique per writer: two threads may race on one blob
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, path)  # readers never see a half-written blob
        return BlobRef(url=f"{self.url}/{rel}", sha256=digest, content_type=content_type, bytes=len(data), **meta)

    def name_of(self, ref: BlobRef) -> str:
        """The blob's name inside this store, or BlobError when the reference is not one of this store's."""
        if not ref.url.startswith(self.url + "/"):
            raise BlobError(f"{ref.url[:200]} is outside this store ({self.url})")
        rel = ref.url[len(self.url) + 1 :]
        m = _NAME.fullmatch(rel)
        if m is None or m.group(2) != ref.sha256 or m.group(1) != ref.sha256[:2]:
            raise BlobError(f"{ref.url[:200]} is not a content-addressed name of this store")
        return rel

    def get(self, ref: BlobRef) -> bytes:
        rel = self.name_of(ref)
        try:
            with self.fs.open(posixpath.join(self.root, rel), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise BlobError(f"blob {ref.url} is missing from the store") from None
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            raise BlobError(f"blob {ref.url} does not match its sha256: refusing corrupt data")
        return data

    def local_path(self, ref: BlobRef) -> str | None:
        """Path on local disk when the store is file://, for printing to a person."""
        if self.fs.protocol in ("file", ("file", "local")) or "file" in self.fs.protocol:
            return posixpath.join(self.root, self.name_of(ref))
        return None
