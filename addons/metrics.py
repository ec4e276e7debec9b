"""The metrics page, by prometheus-client: one CollectorRegistry per edge (tests run several edges
in one process, one after another; the library's global registry would mix them).

Two kinds of series. What happens to each request (latency, time to the origin's first byte,
bytes) is observed into histograms and counters as the access log line is written; what the
edge holds anyway (request counts by status class and cache verdict, per origin, origin health,
shield refusals, cache bytes, open connections, sites) is read from it when /metrics is asked
for, by a collector, so no count is kept twice.

Labels are bounded: status classes (1xx..5xx, `error` for no answer), configured site and pool
names, cache verdicts, refusal kinds; never a URL, a client or a raw status. prometheus_client is
imported only when a registry is made (an edge with an admin endpoint, or the first /metrics):
its import costs start-up time that `edge --help` and `edge check` do not need."""

from __future__ import annotations

from collections.abc import Callable

# seconds: the client's whole exchange (streams included) and the origin's first byte
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
UPSTREAM_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def status_class(status: int | None) -> str:
    return f"{status // 100}xx" if status and 100 <= status <= 599 else "error"


class EdgeMetrics:
    """`facts()` answers the edge's held state for the collector: {"snapshot": Edge.snapshot(),
    "answered", "served_by", "cache_bytes", "tier_bytes", "connections"}."""

    def __init__(self, facts: Callable[[], dict]) -> None:
        import prometheus_client as pc

        pc.disable_created_metrics()        # no `_created` twin of every series: half the lines
        self.registry = registry = pc.CollectorRegistry(auto_describe=True)
        self.duration = pc.Histogram(
            "edge_request_duration_seconds", "Time from a request's first byte to the end of its answer, "
            "by site, pool and status class (pool none: answered without an origin).",
            ("site", "pool", "status"), buckets=REQUEST_BUCKETS, registry=registry)
        self.upstream = pc.Histogram(
            "edge_upstream_ttfb_seconds", "Time from sending a request to an origin to its response head, "
            "by pool and the origin's status class.", ("pool", "status"), buckets=UPSTREAM_BUCKETS,
            registry=registry)
        self.received = pc.Counter("edge_received_bytes", "Request bytes received from clients (head and body).",
                                   ("site",), registry=registry)
        self.sent = pc.Counter("edge_sent_bytes", "Response bytes sent to clients (head and body).",
                               ("site",), registry=registry)
        self.streamed = pc.Counter("edge_streamed_responses", "Responses relayed as they arrived (not held whole).",
                                   ("site",), registry=registry)
        registry.register(_Held(facts))
        self._generate = pc.generate_latest

    def observe(self, facts: dict) -> None:
        """One finished request (`trace.request_facts`)."""
        site = facts["site"]
        self.duration.labels(site, facts["pool"], status_class(facts["status"])).observe(facts["seconds"])
        if facts["upstream_status"] is not None and facts["upstream_seconds"] is not None:
            self.upstream.labels(facts["pool"], status_class(facts["upstream_status"])).observe(facts["upstream_seconds"])
        self.received.labels(site).inc(facts["bytes_in"])
        self.sent.labels(site).inc(facts["bytes_out"])
        if facts["streamed"]:
            self.streamed.labels(site).inc()

    def exposition(self) -> str:
        return self._generate(self.registry).decode()


class _Held:
    """Series read from what the edge holds, at each scrape."""

    def __init__(self, facts: Callable[[], dict]) -> None:
        self.facts = facts

    def describe(self):
        return []               # names vary with the config: nothing to check at registration

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        facts = self.facts()
        snapshot = facts["snapshot"]
        requests = CounterMetricFamily("edge_requests", "Requests answered, by status class and cache verdict.",
                                       labels=("status", "cache"))
        for (status, cache), n in sorted(facts["answered"].items()):
            requests.add_metric((status, cache), n)
        yield requests
        served = CounterMetricFamily("edge_origin_requests", "Requests an origin answered.", labels=("pool", "origin"))
        for (pool, origin), n in sorted(facts["served_by"].items()):
            served.add_metric((pool, origin), n)
        yield served
        for name, key, text in (("edge_origin_available", "available", "1 if the origin is in rotation."),
                                ("edge_origin_weight", "weight", "The origin's weight now."),
                                ("edge_origin_in_flight", "in_flight", "Requests in flight to the origin.")):
            family = GaugeMetricFamily(name, text, labels=("pool", "origin"))
            for pool, body in snapshot["pools"].items():
                for o in body["origins"]:
                    family.add_metric((pool, o["url"]), int(o[key]))
            yield family
        refusals = CounterMetricFamily("edge_shield_refusals", "What the shield refused, by kind.", labels=("kind",))
        for kind, n in sorted(snapshot.get("shield", {}).items()):
            refusals.add_metric((kind,), n)
        yield refusals
        yield GaugeMetricFamily("edge_cache_bytes", "Bytes held by the cache.", value=facts["cache_bytes"])
        tiers = GaugeMetricFamily("edge_cache_tier_bytes", "Bytes held by each tier of the cache "
                                  "(disk: the directory's index and files).", labels=("tier",))
        for tier, n in sorted(facts["tier_bytes"].items()):
            tiers.add_metric((tier,), n)
        yield tiers
        connections = GaugeMetricFamily("edge_client_connections", "Open client connections, by protocol.",
                                        labels=("protocol",))
        for protocol, n in sorted(facts["connections"].items()):
            connections.add_metric((protocol,), n)
        yield connections
        if "sites" in snapshot:
            sites = CounterMetricFamily("edge_site_requests", "Requests a site took (its host matched).",
                                        labels=("site",))
            for name, body in sorted(snapshot["sites"].items()):
                sites.add_metric((name,), body["requests"])
            yield sites
            yield CounterMetricFamily("edge_misdirected_requests", "Requests for a host no site has (answered 421).",
                                      value=snapshot["misdirected"])
            yield CounterMetricFamily("edge_route_rate_refusals", "Requests a site route's rate limit refused (429).",
                                      value=snapshot["route_rate_refusals"])


# -- the workers of one machine (addons/workers/snapshots.py) -------------------------------------------

def families_of(registry) -> list[dict]:
    """A registry's samples in the form a worker's snapshot keeps them (JSON)."""
    return [{"name": f.name, "type": f.type, "help": f.documentation,
             "samples": [[s.name, s.labels, s.value] for s in f.samples]} for f in registry.collect()]


def exposition_of(families: list[dict]) -> str:
    """Prometheus text of families in snapshot form (the machine's sums)."""
    import prometheus_client as pc
    from prometheus_client.metrics_core import Metric

    class Families:
        def collect(self):
            for family in families:
                metric = Metric(family["name"], family["help"], family["type"])
                for name, labels, value in family["samples"]:
                    metric.add_sample(name, labels, value)
                yield metric

    return pc.generate_latest(Families()).decode()
