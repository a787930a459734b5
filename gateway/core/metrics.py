"""Prometheus metrics, one registry per gateway instance (tests run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """The gateway's counters and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["channel_type", "channel"]
        self.inbound = Counter("gateway_inbound_total", "Inbound messages published to the bus", labels, registry=self.registry)
        self.inbound_duplicates = Counter("gateway_inbound_duplicates_total", "Inbound provider retries recognized and not published again", labels, registry=self.registry)
        self.inbound_rejected = Counter("gateway_inbound_rejected_total", "Inbound requests rejected (bad signature, malformed, too large, bus down)", labels + ["reason"], registry=self.registry)
        self.outbound = Counter("gateway_outbound_total", "Outbound messages accepted by the provider", labels, registry=self.registry)
        self.failed = Counter("gateway_outbound_failed_total", "Outbound delivery attempts that failed", labels + ["permanent"], registry=self.registry)
        self.channel_events = Counter("gateway_channel_events_total", "Events a channel counts itself (ChannelContext.count): messages a filter dropped, ...", labels + ["event"], registry=self.registry)
        self.dead = Counter("gateway_outbound_dead_total", "Outbound messages dead-lettered", labels, registry=self.registry)
        self.publish_latency = Histogram(
            "gateway_publish_seconds", "Inbound publish latency until the JetStream ack", ["channel_type"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.delivery_latency = Histogram(
            "gateway_delivery_seconds", "Time from taking an outbound off the bus to provider acceptance", ["channel_type"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.http_closed = Counter("gateway_http_connections_closed_total", "HTTP connections the server closed or refused on its own (max_connections, evicted, header_timeout)", ["reason"], registry=self.registry)
        self.bus_connected = Gauge("gateway_bus_connected", "1 when the bus is connected", registry=self.registry)
        self.channel_up = Gauge("gateway_channel_up", "1 when the channel is running", labels, registry=self.registry)
