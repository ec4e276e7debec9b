"""The worker's side of the machine-wide /status and /metrics (addons/workers/snapshots.py):
publishes this worker's snapshot every INTERVAL seconds while an admin endpoint is configured,
and answers the admin's two pages with the sum of every worker's."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

from addons.tasks import Throttle, every, report
from addons.workers import snapshots
from addons.workers.runtime import Runtime


class Machine:
    def __init__(self, runtime: Runtime, status: Callable[[], dict], families: Callable[[], list[dict]],
                 load: Callable[[], tuple[int, int]], health_checks: Callable[[], bool],
                 wanted: Callable[[], bool]) -> None:
        """`status`: this worker's /status; `families`: its metrics (snapshot form); `load`:
        (requests in flight to origins, client connections); `health_checks`: it runs the
        machine's checks; `wanted`: an admin endpoint is configured (else nobody reads them)."""
        self.runtime = runtime
        self.status_of, self.families, self.workload = status, families, load
        self.health_checks, self.wanted = health_checks, wanted
        self.started = time.time()
        self.run = os.getppid()             # the supervisor: snapshots of another run are not this one's
        self.publisher: asyncio.Task | None = None
        self.failures = Throttle()

    def running(self) -> None:
        if self.publisher is None:
            self.publish()              # the other workers list this one from its start
            self.publisher = asyncio.get_running_loop().create_task(
                every(snapshots.INTERVAL, self.publish, "publishing the worker's snapshot"))

    def done(self) -> None:
        if self.publisher is not None:
            self.publisher.cancel()
            self.publisher = None
            self.publish()              # the last counts, for the workers that stay

    def publish(self) -> None:
        if not self.wanted():
            return
        try:
            snapshots.write_snapshot(self.runtime.dir, self.record())
        except OSError as e:
            report(self.failures, f"writing the worker's snapshot to {self.runtime.dir}", e)

    def record(self) -> dict:
        in_flight, connections = self.workload()
        return {"pid": os.getpid(), "index": self.runtime.index, "run": self.run, "started": self.started,
                "at": time.time(), "status": self.status_of(), "metrics": self.families(),
                "in_flight": in_flight, "connections": connections, "health_checks": self.health_checks()}

    def _gathered(self) -> tuple[dict, list[dict], dict]:
        own = self.record()
        others, retired = snapshots.gather(self.runtime.dir, own, own["at"])
        return own, others, retired

    def status(self) -> dict:
        """/status for the whole machine."""
        own, others, retired = self._gathered()
        return snapshots.merge_status(own, others, retired["status"], own["at"])

    def metrics(self) -> str:
        """/metrics for the whole machine (Prometheus text)."""
        from addons.metrics import exposition_of
        own, others, retired = self._gathered()
        return exposition_of(snapshots.merge_metrics([own, *others], retired["metrics"], own["at"]))
