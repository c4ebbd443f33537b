"""The integrity record of a resource (resource-api.md, "Integrity record").

CBC has no integrity of its own and the CDN serves big parts to anyone, so the API, behind
login, keeps the SHA-256 and the size of each blob (`small || big`) as the small part of the
companion name `NAME.integrity`. An upload writes it after both parts; a load checks the
blob against it before the caller has the last byte.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from loader.errors import IntegrityFailed

RECORD_SUFFIX = ".integrity"
_VERSION = 1


@dataclass(frozen=True)
class IntegrityRecord:
    sha256: bytes
    size: int

    def to_json(self) -> bytes:
        record = {"v": _VERSION, "sha256": self.sha256.hex(), "size": self.size}
        return json.dumps(record, separators=(",", ":")).encode()

    @classmethod
    def parse(cls, raw: bytes, resource: str) -> IntegrityRecord:
        """The record the API keeps for `resource` ("FOLDER/NAME"); IntegrityFailed if it is
        not one this loader can check against."""
        try:
            record = json.loads(raw)
            version, digest, size = record["v"], record["sha256"], record["size"]
        except (ValueError, TypeError, KeyError):
            raise IntegrityFailed(f"the integrity record of {resource} is not valid JSON") from None
        if version != _VERSION:
            raise IntegrityFailed(
                f"the integrity record of {resource} has version {version!r}: this loader "
                f"reads version {_VERSION} only"
            )
        valid_digest = isinstance(digest, str) and len(digest) == 64
        try:
            sha256 = bytes.fromhex(digest) if valid_digest and digest == digest.lower() else b""
        except ValueError:
            sha256 = b""
        if len(sha256) != 32 or isinstance(size, bool) or not isinstance(size, int) or size < 32:
            raise IntegrityFailed(
                f"the integrity record of {resource} does not hold a SHA-256 and a size"
            )
        return cls(sha256, size)
