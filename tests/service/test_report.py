"""`gateway report` against a real bus after a known sequence of messages, replies, a survey
answer, an SLA breach and a missed follow-up; its HTML page opened in Debian's chromium
(Playwright), which finds the same numbers and loads nothing from the network."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from gateway import Outbound, Participant, Survey, TextPart
from gateway.cli import main
from gateway.client import Client
from gateway.testing import post_inbound, statuses, wait_until

from .helpers import followup_events, sla_events

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
SERVICE = {"calendar": "desk", "acknowledge": False, "first_response": "2s", "warn_at": 0.5, "followup_within": "2s"}


def _config(tmp_path: Path, url: str) -> Path:
    p = tmp_path / "report.toml"
    p.write_text(f'[bus]\nurl = "{url}"\n[calendars.desk]\nhours = "24h"\n'
                 f'[channels.demo]\ntype = "mock"\nservice = {{calendar = "desk", first_response = "2s"}}\n',
                 encoding="utf-8")
    return p


async def _sequence(gw, url: str) -> None:
    """alice writes twice and is answered, then resolved and never followed up; bob is
    asked a survey and answers 1 (满意); carol's auto-reply; dave is never answered."""
    port = gw.http.port
    ctx = gw.channels["demo"].ctx
    ids = {}
    for who, text in (("alice", "hello"), ("bob", "where is my parcel"), ("alice", "hello?"), ("dave", "anyone")):
        r = await post_inbound(port, "demo", text=text, sender=who)
        assert r.status_code == 200
        ids.setdefault(who, r.json()["id"])
    await ctx.publish(ctx.message(conversation="carol", sender=Participant(id="carol"),
                                  parts=[TextPart(text="Out of office")], auto=True), route={"thread": "carol", "to": "carol"})
    alice, bob = ctx.conversation_key("alice"), ctx.conversation_key("bob")
    async with Client(url) as client:
        await client.send(Outbound(id="r-alice", conversation=alice, parts=[TextPart(text="hi!")], in_reply_to=ids["alice"]),
                          channel_type="mock", channel="demo")
        await client.send(Outbound(id="s-bob", conversation=bob, parts=[TextPart(text="满意吗？")], survey=Survey()),
                          channel_type="mock", channel="demo")
        await wait_until(lambda: _sent(url, "s-bob"), timeout=10)
        assert (await post_inbound(port, "demo", text="1", sender="bob")).status_code == 200
        await client.mark(alice, "resolved")

    async def settled() -> bool:
        sla = await sla_events(url)
        fus = await followup_events(url)
        return any(e.state == "breach" for e in sla) and any(f.state == "missed" for f in fus)

    await wait_until(settled, timeout=15)


async def _sent(url: str, oid: str) -> bool:
    return any(s.state == "sent" for s in await statuses(url, oid))


def _report(config: Path, *args: str) -> int:
    return main(["report", "-c", str(config), "--since", "1h", *args])


EXPECTED = {"inbound": 6, "inbound_auto": 1, "inbound_human": 5, "conversations": 4, "replies": 2,
            "replies_backend": 2, "replies_auto": 0}


async def test_report_counts_a_known_sequence_and_its_html_page_shows_them_in_chromium(gateway_factory, nats_server,
                                                                                      tmp_path):
    gw = await gateway_factory({"demo": {"type": "mock", "service": SERVICE}}, calendars={"desk": {"hours": "24h"}})
    await _sequence(gw, nats_server.url)
    config = _config(tmp_path, nats_server.url)
    out_json, out_html = tmp_path / "report.json", tmp_path / "report.html"
    assert await asyncio.to_thread(_report, config, "--format", "json", "--out", str(out_json)) == 0
    rep = json.loads(out_json.read_text(encoding="utf-8"))
    total = rep["total"]
    assert {k: total[k] for k in EXPECTED} == EXPECTED
    fr = total["first_response"]
    assert (fr["count"], fr["unanswered"]) == (2, 1)  # alice, bob answered; dave not
    assert 0 < fr["median_s"] <= fr["p90_s"] and fr["median_business_s"] == pytest.approx(fr["median_s"], abs=0.01)
    assert total["sla"] == {"warning": 1, "breach": 1}
    alice = gw.channels["demo"].ctx.conversation_key("alice")
    assert total["followups"] == {"due": 1, "sent": 0, "answered": 0, "missed": 1, "missed_conversations": [alice]}
    assert total["survey"] == {"满意": {"count": 1, "share": 1.0}}

    assert await asyncio.to_thread(_report, config, "--format", "html", "--out", str(out_html)) == 0
    seen = await asyncio.to_thread(_read_page, out_html)
    assert seen["requests"] == [out_html.as_uri()]  # one self-contained page
    assert seen["cells"] == {k: str(v) for k, v in EXPECTED.items()}
    assert seen["sla"] == ("1", "1") and seen["missed"] == [alice]
    assert seen["bars"] >= 3 and seen["survey"] == "1 (100%)"


def _read_page(path: Path) -> dict:
    if not Path(CHROMIUM).exists():
        pytest.fail("this test needs Debian's chromium at /usr/bin/chromium (.ci/run installs it)", pytrace=False)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(path.as_uri())
            total = page.locator('tr[data-key="total"]')
            cells = {k: total.locator(f'td[data-col="{k}"]').inner_text() for k in EXPECTED}
            sla = (total.locator('td[data-col="sla.warning"]').inner_text(),
                   total.locator('td[data-col="sla.breach"]').inner_text())
            return {"requests": requests, "cells": cells, "sla": sla,
                    "missed": page.locator("#missed li").all_inner_texts(),
                    "bars": page.locator("svg rect").count(),
                    "survey": page.locator('#chart-survey text.value[data-label="满意"]').text_content()}
        finally:
            browser.close()
