"""The emulator's state: issued tokens, counters, faults and stored parts."""

from __future__ import annotations

import hmac
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TypedDict

from .config import EmulatorConfig
from .faults import FaultInjector, FaultRates, FaultRule
from .gates import Gate
from .storage import PartStore

Clock = Callable[[], float]


class Stats(TypedDict):
    """Counters since start or the last reset.

    ``requests`` is keyed "METHOD /path" and counts every request but the control
    ones, faults included; ``logins`` counts tokens issued. ``bytes_served`` and
    ``downloads`` (bodies sent in full) are keyed by CDN path, GET only.
    """

    requests: dict[str, int]
    logins: int
    failed_logins: int
    bytes_served: dict[str, int]
    downloads: dict[str, int]


class Emulator:
    """What the HTTP layer works on; tests may also call these methods directly.

    ``clock`` (monotonic seconds) decides token expiry, so tests can move time
    forward instead of sleeping.
    """

    def __init__(self, config: EmulatorConfig, *, clock: Clock = time.monotonic) -> None:
        self.config = config
        self.store = PartStore(config.storage_dir)
        self.faults = FaultInjector(config.rates, config.rules, seed=config.seed)
        self.gates: list[Gate] = []
        self._clock = clock
        self._token_expiry: dict[str, float] = {}
        self._requests: Counter[str] = Counter()
        self._bytes_served: Counter[str] = Counter()
        self._downloads: Counter[str] = Counter()
        self._received: Counter[str] = Counter()
        self._logins = 0
        self._failed_logins = 0
        # Every token ever issued, for tests that look for them where they must not be.
        self.issued_tokens: list[str] = []

    # Authentication

    def login(self, email: str, password: str) -> str | None:
        """A fresh token for good credentials, else None."""
        expected = self.config.users.get(email)
        if expected is None or not hmac.compare_digest(
            expected.encode("utf-8"), password.encode("utf-8")
        ):
            self._failed_logins += 1
            return None
        now = self._clock()
        self._token_expiry = {t: exp for t, exp in self._token_expiry.items() if exp > now}
        token = secrets.token_urlsafe(32)
        self._token_expiry[token] = now + self.config.token_ttl
        self._logins += 1
        self.issued_tokens.append(token)
        return token

    def token_is_valid(self, token: str) -> bool:
        expiry = self._token_expiry.get(token)
        return expiry is not None and self._clock() < expiry

    def revoke_tokens(self) -> int:
        """Forget every issued token; returns how many there were."""
        revoked = len(self._token_expiry)
        self._token_expiry.clear()
        return revoked

    # Faults

    def add_rule(self, rule: FaultRule) -> None:
        self.faults.add_rules([rule])

    def add_rules(self, rules: Iterable[FaultRule]) -> None:
        self.faults.add_rules(rules)

    def set_rates(self, rates: FaultRates) -> None:
        self.faults.set_rates(rates)

    def clear_faults(self) -> None:
        self.faults.clear()

    # Gates

    def hold(self, method: str, path_prefix: str) -> Gate:
        """A gate, shut: matching requests wait at it (counted first) until it opens."""
        gate = Gate(method, path_prefix)
        self.gates.append(gate)
        return gate

    async def pass_gates(self, method: str, path: str) -> None:
        for gate in [g for g in self.gates if g.matches(method, path)]:
            await gate.passage()

    # Counters

    def count_request(self, method: str, path: str) -> None:
        self._requests[f"{method} {path}"] += 1

    def record_download(self, path: str, sent: int, *, complete: bool) -> None:
        self._bytes_served[path] += sent
        if complete:
            self._downloads[path] += 1

    def record_upload(self, path: str, received: int) -> None:
        self._received[path] += received

    def received(self, path: str) -> int:
        """Bytes of big parts PUT at `path`, all attempts together, complete or not."""
        return self._received[path]

    def requests(self, method: str, path: str) -> int:
        return self._requests[f"{method} {path}"]

    def downloads(self, path: str) -> int:
        return self._downloads[path]

    def stats(self) -> Stats:
        return {
            "requests": dict(self._requests),
            "logins": self._logins,
            "failed_logins": self._failed_logins,
            "bytes_served": dict(self._bytes_served),
            "downloads": dict(self._downloads),
        }

    def reset_stats(self) -> None:
        self._requests.clear()
        self._bytes_served.clear()
        self._downloads.clear()
        self._received.clear()
        self._logins = 0
        self._failed_logins = 0
