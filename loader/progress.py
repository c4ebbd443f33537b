"""An unlock's progress, as /unlock/status and systemd's STATUS= tell it.

The loading threads write it, the event loop reads it, under one lock. `percent` is honest:
it weighs each image's bytes by where the engine's time goes (receiving, then registering
in silence), and while the engine registers it moves on only at the rate the engine has
shown, never past what has been seen.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field

from loader.images import gigabytes

# Of an image's time in the engine, the share spent receiving its tar; the rest goes to
# registering its layers, during which the engine says nothing (measured here on Docker 20.10
# and Podman 4.3: a quarter to 30% receiving). `percent` weighs the two phases so.
SEND_SHARE = 0.25
# While the engine registers an image, `percent` moves on at the rate the engine has shown
# so far, up to this share of that image's part: it never claims what has not been seen.
ESTIMATE_CAP = 0.95


class UnlockState(str, enum.Enum):
    IDLE = "idle"
    AUTHENTICATING = "authenticating"
    DOWNLOADING_KEY = "downloading_key"
    DECRYPTING = "decrypting"
    LOADING_IMAGES = "loading_images"
    READY = "ready"
    ERROR = "error"


@dataclass
class Flight:
    """An image on its way into the engine: `sent` of its `size` bytes handed over (the
    loading thread alone writes it); `registered` bytes of them registered by the engine;
    the current load, of `load_size` bytes, registering since `registering_since`."""

    tag: str
    size: int
    sent: int = 0
    registered: int = 0
    load_size: int = 0
    registering_since: float | None = None


@dataclass
class Progress:
    """Written by the loading threads, read by the event loop, under `lock`.

    Of `bytes_total`, `sent` bytes were handed to the engine by images no longer in flight,
    and `loaded` bytes registered by it, which is where most of an unlock's time goes. The
    engine has registered `rate` bytes a second so far (each image over its own time), or
    is assumed to take SEND_SHARE's complement of the time it took to receive.
    """

    state: UnlockState = UnlockState.IDLE
    error: str | None = None
    bytes_total: int = 0
    sent: int = 0
    loaded: int = 0
    flights: dict[str, Flight] = field(default_factory=dict)
    rate: float = 0.0
    registered_bytes: int = 0
    registered_seconds: float = 0.0
    images: list[str] = field(default_factory=list)
    images_total: int = 0
    # The engine refused a thin tar and took the same image whole: the rest go whole.
    whole_only: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def bytes_done(self) -> int:
        """Bytes handed to the engine in this unlock (the tars' own headers not counted)."""
        with self.lock:
            return self.sent + sum(flight.sent for flight in self.flights.values())

    @property
    def image(self) -> str | None:
        """The image being loaded (the first started, when two are)."""
        if self.state is not UnlockState.LOADING_IMAGES:
            return None
        with self.lock:
            return next(iter(self.flights), None)


def status_line(p: Progress) -> str:
    if p.state is UnlockState.LOADING_IMAGES and p.bytes_total:
        return (
            f"Unlocking: loading image {min(len(p.images) + 1, p.images_total)} of "
            f"{p.images_total}, {percent_done(p):.0f}% ({p.bytes_done / 1e9:.1f} of "
            f"{gigabytes(p.bytes_total)})"
        )
    return f"Unlocking: {p.state.value.replace('_', ' ')}"


def take_off(p: Progress, tag: str, size: int) -> Flight:
    flight = Flight(tag, size)
    with p.lock:
        p.flights[tag] = flight
    return flight


def grow(p: Progress, flight: Flight, size: int) -> None:
    """The image is sent once more, `size` bytes (whole, after an incomplete thin load)."""
    with p.lock:
        flight.size += size
        p.bytes_total += size


def handed_over(p: Progress, flight: Flight, size: int, seconds: float) -> None:
    """The engine has the whole of a load of `size` bytes, received in `seconds`."""
    with p.lock:
        if not p.rate:
            # Nothing registered yet: assume registering takes what SEND_SHARE says.
            p.rate = size / max(seconds, 1e-3) * SEND_SHARE / (1 - SEND_SHARE)
        flight.load_size = size
        flight.registering_since = time.monotonic()


def registered(p: Progress, flight: Flight) -> None:
    """The engine answered the load: registered; learn the engine's rate."""
    with p.lock:
        if flight.registering_since is not None:
            p.registered_bytes += flight.load_size
            p.registered_seconds += max(time.monotonic() - flight.registering_since, 1e-3)
            p.rate = p.registered_bytes / p.registered_seconds
            flight.registered += flight.load_size
        flight.registering_since = None


def land(p: Progress, flight: Flight, *, loaded: bool) -> None:
    """The image is out of flight: loaded and checked, or failed."""
    with p.lock:
        p.flights.pop(flight.tag, None)
        p.sent += flight.sent
        if loaded:
            p.loaded += flight.size
            p.images.append(flight.tag)


def percent_done(p: Progress) -> float:
    """The share of the engine's work done. An image's bytes weigh SEND_SHARE while handed
    over and the rest once registered; while the engine registers one (silently), its part
    moves on at the rate seen so far, never past ESTIMATE_CAP of it."""
    if not p.bytes_total:
        return 100.0 if p.state is UnlockState.READY else 0.0
    now = time.monotonic()
    with p.lock:
        sent, registered, estimated = p.sent, p.loaded, 0.0
        for flight in p.flights.values():
            sent += flight.sent
            registered += flight.registered
            since, size = flight.registering_since, flight.load_size
            if since is not None and size and p.rate:
                estimated += size * min(ESTIMATE_CAP, (now - since) * p.rate / size)
    done = SEND_SHARE * sent + (1 - SEND_SHARE) * (registered + estimated)
    return min(100.0, round(100 * done / p.bytes_total, 1))
