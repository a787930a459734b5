"""回访 coverage: a conversation marked resolved needs a follow-up within the channel's
promise; the gateway records scheduled, sent, answered, failed, cancelled and missed, and a
follow-up that fails or is missing becomes a desk task (a real bus, real seconds)."""

from __future__ import annotations

from datetime import timedelta

from gateway.client import Client
from gateway.testing import post_inbound, wait_until

from .helpers import followup_events, seconds_from_now, tasks

CHANNELS = {"demo": {"type": "mock", "reply_window": "20s",
                     "service": {"calendar": "desk", "acknowledge": False, "followup_within": "5s"}}}
CALENDARS = {"desk": {"hours": "24h"}}


def states(evs, conv) -> list[str]:
    return [e.state for e in evs if e.conversation == conv]


async def test_every_resolved_conversation_is_followed_up_or_becomes_a_desk_task(gateway_factory, nats_server):
    gw = await gateway_factory(CHANNELS, calendars=CALENDARS)
    ctx = gw.channels["demo"].ctx
    names = ("kept", "forgotten", "unreachable", "reopened")
    for n in names:
        assert (await post_inbound(gw.http.port, "demo", text="help", sender=n)).status_code == 200
    kept, forgotten, unreachable, reopened = (ctx.conversation_key(n) for n in names)
    url = nats_server.url
    async with Client(url) as client:
        for conv in (kept, forgotten, unreachable, reopened):
            await client.mark(conv, "resolved")
        await wait_until(lambda: _all_due(url, 4), timeout=10)
        await client.remind(kept, "您对我们的处理满意吗？", id="fu-kept", due_at=seconds_from_now(1), cancel_on_reply=False)
        # Due after the channel's 20 s reply window: it can reach nobody then, and fails now.
        await client.remind(unreachable, "回访", id="fu-unreachable", due_at=seconds_from_now(40))
        await client.mark(reopened, "reopened")

        async def kept_sent() -> bool:
            return "sent" in states(await followup_events(url), kept)

        await wait_until(kept_sent, timeout=10)
        assert (await post_inbound(gw.http.port, "demo", text="满意", sender="kept")).status_code == 200

    async def settled() -> bool:
        evs = await followup_events(url)
        return ("answered" in states(evs, kept) and "missed" in states(evs, forgotten)
                and "failed" in states(evs, unreachable) and "cancelled" in states(evs, reopened))

    await wait_until(settled, timeout=20)
    evs = await followup_events(url)
    assert states(evs, kept) == ["due", "scheduled", "sent", "answered"]
    assert states(evs, forgotten) == ["due", "missed"]
    assert states(evs, unreachable) == ["due", "failed"]
    assert states(evs, reopened) == ["due", "cancelled"]
    [failed] = [e for e in evs if e.conversation == unreachable and e.state == "failed"]
    assert failed.reason == "outside_window" and failed.reminder_id == "fu-unreachable"
    [missed] = [e for e in evs if e.state == "missed"]
    assert missed.due_by - missed.resolved_at == timedelta(seconds=5)
    # The two that need a human are desk tasks; nothing else is.
    desk = await tasks(url)
    assert sorted((t.conversation, t.action, t.data["state"]) for t in desk) == sorted(
        [(forgotten, "followup", "missed"), (unreachable, "followup", "failed")])
    assert {t.id for t in desk} == {e.task_id for e in evs if e.task_id}


async def _all_due(url: str, n: int) -> bool:
    return len([e for e in await followup_events(url) if e.state == "due"]) >= n
