"""What the daemon has done, for `GET /metrics` in Prometheus's text format.

The workflows count into plain integers as they work; prometheus_client renders them,
with what is read at scrape time (the unlock's state, the cache's size), only when asked:
importing it costs about 100 ms, which an idle daemon's cold start does not pay. Labels
take values from small fixed sets (sources, outcomes, error codes), never a name, an
address or a credential.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING

from loader import __version__

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from loader.cache import ModelCache
    from loader.unlock import Unlocker

PREFIX = "azaion_loader_"
SOURCES = ("cache", "cdn")
REMOTES = ("api", "cdn")
# Each HTTP request to a remote counts once: ok; refused, the remote answered with an error;
# unreachable, no answer (or an untrusted one); retried, it failed and was tried again.
OUTCOMES = ("ok", "retried", "refused", "unreachable")


class Metrics:
    """The daemon's counters and their registry, one per app."""

    def __init__(self) -> None:
        # Unlocks by outcome: "ready", "already-ready" or the error's code.
        self.unlocks: dict[str, int] = {"ready": 0}
        # Unlocks that ran the workflow, by "ready"/"error": count and seconds.
        self.unlock_runs: dict[str, tuple[int, float]] = {"ready": (0, 0.0), "error": (0, 0.0)}
        self.unlock_bytes = 0
        self.loads = dict.fromkeys(SOURCES, 0)
        self.load_bytes = dict.fromkeys(SOURCES, 0)
        self.uploads = 0
        self.upload_bytes = 0
        self.remote_calls = {(remote, outcome): 0 for remote in REMOTES for outcome in OUTCOMES}
        # Read at scrape time, when the app has them.
        self.unlocker: Unlocker | None = None
        self.cache: ModelCache | None = None
        self._registry: CollectorRegistry | None = None

    def unlock_attempted(self, outcome: str) -> None:
        self.unlocks[outcome] = self.unlocks.get(outcome, 0) + 1

    def unlock_ran(self, outcome: str, seconds: float, sent: int) -> None:
        """An unlock's workflow ended with `outcome` (ready or an error's code)."""
        self.unlock_attempted(outcome)
        result = "ready" if outcome == "ready" else "error"
        count, total = self.unlock_runs[result]
        self.unlock_runs[result] = (count + 1, total + seconds)
        self.unlock_bytes += sent

    def resource_loaded(self, source: str, size: int) -> None:
        self.loads[source] += 1
        self.load_bytes[source] += size

    def resource_uploaded(self, size: int) -> None:
        self.uploads += 1
        self.upload_bytes += size

    def remote_call(self, remote: str, outcome: str) -> None:
        self.remote_calls[(remote, outcome)] += 1

    async def scrape(self) -> tuple[bytes, str]:
        """The text exposition and its content type. In a worker thread: the first import of
        prometheus_client, and the cache's folders read."""
        return await asyncio.to_thread(self._render)

    def _render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        if self._registry is None:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(self)
            self._registry = registry
        return generate_latest(self._registry), CONTENT_TYPE_LATEST

    def collect(self) -> Iterator[Metric]:
        """The metric families, as prometheus_client's registry asks a collector."""
        from prometheus_client.metrics_core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            SummaryMetricFamily,
        )

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> CounterMetricFamily:
            return CounterMetricFamily(PREFIX + name, doc, labels=labels)

        def gauge(name: str, doc: str, value: float | None = None) -> GaugeMetricFamily:
            return GaugeMetricFamily(PREFIX + name, doc, value=value)

        info = GaugeMetricFamily(
            PREFIX + "build_info", "The running daemon's version.", labels=("version",)
        )
        info.add_metric((__version__,), 1)
        yield info

        unlocks = counter(
            "unlock_attempts",
            "Unlocks asked for, by outcome: ready, already-ready (nothing to load) or the "
            "error's code.",
            ("outcome",),
        )
        for outcome, count in sorted(dict(self.unlocks).items()):
            unlocks.add_metric((outcome,), count)
        yield unlocks
        runs = SummaryMetricFamily(
            PREFIX + "unlock_duration_seconds",
            "Time from /unlock to the end of its workflow, by outcome (ready or error).",
            labels=("outcome",),
        )
        for result, (count, seconds) in sorted(dict(self.unlock_runs).items()):
            runs.add_metric((result,), count, seconds)
        yield runs
        sent = counter("unlock_bytes", "Image bytes the unlocks handed to the engine.")
        sent.add_metric((), self.unlock_bytes)
        yield sent
        yield from self._unlock_now()

        loads = counter("resource_loads", "Resources served by /load, by source.", ("source",))
        load_bytes = counter(
            "resource_load_bytes", "Plaintext bytes served by /load, by source.", ("source",)
        )
        for source in SOURCES:
            loads.add_metric((source,), self.loads[source])
            load_bytes.add_metric((source,), self.load_bytes[source])
        yield loads
        yield load_bytes
        uploads = counter("resource_uploads", "Resources published by /upload.")
        uploads.add_metric((), self.uploads)
        yield uploads
        upload_bytes = counter("resource_upload_bytes", "Plaintext bytes published by /upload.")
        upload_bytes.add_metric((), self.upload_bytes)
        yield upload_bytes

        calls = counter(
            "remote_calls",
            "HTTP requests to the Resource API and its CDN, by remote and outcome: ok; "
            "refused (answered with an error); unreachable (no answer, or an untrusted one); "
            "retried (failed, and tried again).",
            ("remote", "outcome"),
        )
        for (remote, outcome), count in dict(self.remote_calls).items():
            calls.add_metric((remote, outcome), count)
        yield calls

        if self.cache is not None:
            entries, size = self.cache.usage()
            yield gauge("cache_entries", "Big parts in the model cache.", entries)
            yield gauge("cache_bytes", "Bytes of the model cache's big parts on disk.", size)

    def _unlock_now(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import GaugeMetricFamily

        unlocker = self.unlocker
        if unlocker is None:
            return
        state = GaugeMetricFamily(
            PREFIX + "unlock_state", "1 for the unlock's current state.", labels=("state",)
        )
        current = unlocker.state
        for each in type(current):  # every state, named by the unlock's own enum
            state.add_metric((each.value,), 1 if each is current else 0)
        yield state
        yield GaugeMetricFamily(
            PREFIX + "images_present",
            "The stack's images in the engine, as the last unlock found or loaded them "
            "(0 until the first unlock since the daemon started).",
            value=unlocker.images_present,
        )
        yield GaugeMetricFamily(
            PREFIX + "images_expected",
            "The images of the stack at API_VERSION.",
            value=unlocker.images_expected,
        )
