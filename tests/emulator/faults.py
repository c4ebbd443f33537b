"""Faults on demand: deterministic rules that fire in order, and seeded random rates."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

FaultKind = Literal[
    "status",
    "drop",
    "truncate",
    "delay",
    "ignore-range",
    "wrong-length",
    "flip-bit",
    "swap-blocks",
    "echo",
]
FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)


def _check_number(name: str, value: object, *, upper: float = math.inf) -> float:
    # bool is an int: refuse it so that a JSON `true` is not read as 1.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or not 0 <= number <= upper:
        raise ValueError(f"{name} must be between 0 and {upper}, got {value!r}")
    return number


def _check_int(name: str, value: object, *, lower: int, upper: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < lower or (upper is not None and value > upper):
        bounds = f"between {lower} and {upper}" if upper is not None else f"at least {lower}"
        raise ValueError(f"{name} must be an integer {bounds}, got {value!r}")
    return value


@dataclass(frozen=True)
class FaultRule:
    """One misbehaviour for the requests that match ``method`` and ``path_prefix``.

    ``count`` is how many requests it spoils (None: all of them). ``delay`` is added
    before the answer whatever the kind. An ``ignore-range`` rule only matches
    requests that carry a ``Range`` header, so that it is not spent on others.

    ``flip-bit`` and ``swap-blocks`` alter a CDN file in transit, as a hostile or
    damaged CDN would, and leave the stored file and the length as they are.
    ``flip-bit`` flips the lowest bit of the byte at absolute file offset ``offset``;
    ``swap-blocks`` swaps the 16-byte block holding ``offset`` with the next one, or
    the file's last two whole blocks when there is no next one. ``offset`` None means
    the middle of the file. Both touch only bytes a response sends, so a ``Range`` that
    misses the spot comes back clean; they do nothing to answers other than a CDN
    file's (a 404 still counts as a spoiled request), nor past the end of the file.

    ``echo`` answers 422 without calling the handler, the way FastAPI refuses a body
    that fails validation: it echoes the body (its JSON, else its text) in
    ``detail[0].input``, password included. ``status`` is ignored.
    """

    method: str | None
    path_prefix: str
    kind: FaultKind
    status: int = 503
    count: int | None = 1
    delay: float = 0.0
    truncate_at: int | None = None
    offset: int | None = None

    def __post_init__(self) -> None:
        if self.method is not None and not (isinstance(self.method, str) and self.method):
            raise ValueError(f"method must be a non-empty string or null, got {self.method!r}")
        if not isinstance(self.path_prefix, str) or not self.path_prefix.startswith("/"):
            raise ValueError(f"path_prefix must start with '/', got {self.path_prefix!r}")
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"kind must be one of {', '.join(FAULT_KINDS)}, got {self.kind!r}")
        _check_int("status", self.status, lower=100, upper=599)
        if self.count is not None:
            _check_int("count", self.count, lower=1)
        _check_number("delay", self.delay)
        if self.truncate_at is not None:
            _check_int("truncate_at", self.truncate_at, lower=0)
        if self.offset is not None:
            _check_int("offset", self.offset, lower=0)

    def matches(self, method: str, path: str, *, has_range: bool) -> bool:
        if self.method is not None and self.method.upper() != method.upper():
            return False
        if self.kind == "ignore-range" and not has_range:
            return False
        return path.startswith(self.path_prefix)

    @classmethod
    def from_json(cls, data: object) -> FaultRule:
        """A rule from its JSON form; a missing ``method`` means any method."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a rule must be a JSON object, got {data!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown rule fields: {', '.join(sorted(map(str, unknown)))}")
        fields: dict[str, Any] = {"method": None, **{str(k): v for k, v in data.items()}}
        try:
            return cls(**fields)
        except TypeError as exc:  # a required field is missing
            raise ValueError(f"bad rule {dict(data)!r}: {exc}") from None

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FaultRates:
    """Random faults: each request gets a 503, a dropped connection or a cut body with
    these probabilities (at most one of them), and always ``delay`` seconds of lag."""

    error_rate: float = 0.0
    delay: float = 0.0
    drop_rate: float = 0.0
    truncate_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("error_rate", "drop_rate", "truncate_rate"):
            _check_number(name, getattr(self, name), upper=1.0)
        _check_number("delay", self.delay)
        if self.error_rate + self.drop_rate + self.truncate_rate > 1.0:
            raise ValueError("error_rate + drop_rate + truncate_rate must not exceed 1")

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Fault:
    """What to do to one request: ``kind`` None means answer it normally."""

    kind: FaultKind | None = None
    delay: float = 0.0
    status: int = 503
    truncate_at: int | None = None
    offset: int | None = None


@dataclass
class _ArmedRule:
    rule: FaultRule
    remaining: int | None


class FaultInjector:
    """Decides, request by request, which fault to inflict.

    The first matching rule fires and is used up; only when none fires are the
    random rates rolled, once per request, so that a seed replays the same faults.
    """

    def __init__(
        self, rates: FaultRates, rules: Iterable[FaultRule] = (), *, seed: int | None = None
    ) -> None:
        self._rates = rates
        self._armed: list[_ArmedRule] = []
        self._random = random.Random(seed)
        self.add_rules(rules)

    @property
    def rates(self) -> FaultRates:
        return self._rates

    def add_rules(self, rules: Iterable[FaultRule]) -> None:
        self._armed.extend(_ArmedRule(rule, rule.count) for rule in rules)

    def set_rates(self, rates: FaultRates) -> None:
        self._rates = rates

    def reseed(self, seed: int | None) -> None:
        self._random.seed(seed)

    def clear(self) -> None:
        self._armed.clear()
        self._rates = FaultRates()

    def draw(self, method: str, path: str, *, has_range: bool) -> Fault:
        rates = self._rates
        for armed in self._armed:
            rule = armed.rule
            if not rule.matches(method, path, has_range=has_range):
                continue
            if armed.remaining is not None:
                armed.remaining -= 1
                if armed.remaining == 0:
                    self._armed.remove(armed)
            kind = None if rule.kind == "delay" else rule.kind
            delay = rule.delay + rates.delay
            return Fault(kind, delay, rule.status, rule.truncate_at, rule.offset)
        roll = self._random.random()
        if roll < rates.error_rate:
            return Fault("status", rates.delay)
        if roll < rates.error_rate + rates.drop_rate:
            return Fault("drop", rates.delay)
        if roll < rates.error_rate + rates.drop_rate + rates.truncate_rate:
            return Fault("truncate", rates.delay)
        return Fault(None, rates.delay)

    def to_json(self) -> dict[str, object]:
        rules = [{**armed.rule.to_json(), "remaining": armed.remaining} for armed in self._armed]
        return {**self._rates.to_json(), "rules": rules}
