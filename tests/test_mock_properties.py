"""Property-based: whatever JSON reaches the mock channel's webhook, the answer is not a
5xx, and everything published decodes with the gateway's own decoder (issue 9.8)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.wire import message_decoder
from gateway.testing import GatewayProcess, stream_messages

# Lone surrogates are valid JSON escapes (json.dumps writes "\ud800") but not Unicode.
surrogates = st.sampled_from(["\ud800", "a\udfffb", "\udbff\udbff"])
strings = st.one_of(st.text(max_size=60), surrogates, st.sampled_from(["", " ", "\x00", "null", "\u2028"]))
values = st.one_of(strings, st.none(), st.booleans(), st.integers(-2**70, 2**70),
                   st.floats(allow_nan=True, allow_infinity=True), st.lists(st.integers(), max_size=3),
                   st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
bodies = st.one_of(
    st.fixed_dictionaries({"text": strings},
                          optional={"sender": strings, "id": strings, "thread": strings, "name": strings}),
    st.fixed_dictionaries({"text": values},
                          optional={"sender": values, "id": values, "thread": values, "name": values,
                                    "extra": values}),
).map(lambda d: json.dumps(d).encode())
raw = st.one_of(bodies, st.binary(max_size=200), st.sampled_from([b"", b"{", b"[]", b'{"text": "x"}' * 2]))


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    gp = GatewayProcess(tmp_path_factory.mktemp("mock-props"))
    gp.start()
    state = {"http": httpx.Client(base_url=f"http://127.0.0.1:{gp.http_port}", timeout=10), "checked": 0, "gp": gp}
    try:
        yield state
    finally:
        state["http"].close()
        gp.signal(15)
        gp.wait(60)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(body=b'{"text": "a\\ud800b", "id": "s1"}')
@example(body=b'{"text": "x", "id": 12345678901234567890}')
@example(body=b'{"text": "x", "sender": null}')
@given(body=raw)
def test_mock_webhook_never_gives_5xx_and_what_is_published_decodes(gateway, body):
    r = gateway["http"].post("/channels/demo/inbound", content=body)
    assert r.status_code < 500, (r.status_code, r.text)
    for m in asyncio.run(stream_messages(gateway["gp"].bus_url, "GW_IN", after=gateway["checked"])):
        message_decoder.decode(m.data)
        gateway["checked"] = m.seq
