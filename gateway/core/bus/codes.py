"""The JetStream API error codes the gateway decides on, named once.

A JetStream error carries an HTTP-like ``code`` (400, 409, 503) and an ``err_code`` that
says which error it is (nats-server's ``server/errors.json``). Several errors share one
``code``, and nats-py maps only a few ``err_code`` values to exception classes, so the
gateway tells these apart by ``err_code``: compare ``exc.err_code`` with a name from here,
never with a number (``tests/test_core_layers.py`` fails on a number anywhere else)."""

from __future__ import annotations

WRONG_LAST_SEQUENCE = 10071
"""A compare-and-set lost its race: a publish with ``Nats-Expected-Last-Subject-Sequence``
(a KV create or update, a lease renewal, a claimed liveness marker) whose subject's last
message is no longer the one expected (400, "wrong last sequence")."""

CONSUMER_NOT_UNIQUE = 10100
"""A consumer whose filter overlaps another consumer's on a work-queue stream (400,
"filtered consumer not unique on workqueue stream"): on ``<prefix>_OUT``, another process
(or a backend) reads that subject now."""

DUPLICATE_IN_PROCESS = 10158
"""A publish whose ``Nats-Msg-Id`` another publish is storing right now (409, "duplicate
message id is in process"): a clustered stream answers so between proposal and commit."""
