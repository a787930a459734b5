"""Outbound delivery: the dispatcher (fetch, lanes, retries, receipts, dead letters) and dead letters as data."""
