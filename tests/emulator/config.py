"""The emulator's configuration: who may log in, what the fragments are, where parts live."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .faults import FaultRates, FaultRule

DEV_USER = "dev@azaion.local"
DEV_PASSWORD = "devpass"
DEV_ARCHIVE_FRAGMENT = b"dev-archive-fragment"
DEV_RESOURCE_FRAGMENT = b"dev-resource-fragment"


def _dev_users() -> Mapping[str, str]:
    return {DEV_USER: DEV_PASSWORD}


@dataclass(frozen=True, kw_only=True)
class EmulatorConfig:
    """Everything the emulator needs, fixed at start.

    Secrets are kept out of ``repr`` so that a logged or failing config never shows them.
    """

    storage_dir: Path
    users: Mapping[str, str] = field(default_factory=_dev_users, repr=False)
    archive_fragment: bytes = field(default=DEV_ARCHIVE_FRAGMENT, repr=False)
    resource_fragment: bytes = field(default=DEV_RESOURCE_FRAGMENT, repr=False)
    token_ttl: float = 3600.0
    rates: FaultRates = field(default_factory=FaultRates)
    rules: tuple[FaultRule, ...] = ()
    seed: int | None = None
    # Seconds added to the time in each answer's Date header: a remote whose clock is off
    # (or, as the caller sees it, a device whose clock is).
    clock_offset: float = 0.0
    # Answer a refused request (401, 411, ...) at once, before reading its body, as nginx and
    # most CDNs do; by default the body is read first, so that every client sees the answer.
    refuse_early: bool = False
    # Refuse a big part sent without a Content-Length (chunked) with 411, as S3-like stores do.
    cdn_requires_length: bool = False

    def __post_init__(self) -> None:
        if not math.isfinite(self.token_ttl) or self.token_ttl < 0:
            raise ValueError(f"token_ttl must be a finite number >= 0, got {self.token_ttl!r}")
        if not self.users:
            raise ValueError("users must name at least one account")
