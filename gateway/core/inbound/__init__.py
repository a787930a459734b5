"""Inbound: dedup, enrich, publish and ack; dedup records restored after a crash."""
