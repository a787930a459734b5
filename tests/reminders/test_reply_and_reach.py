"""Cancel on reply, and the channel's reach checked at scheduling and at firing with the
fallback (a template, another conversation) or a failure carrying the reach code."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from gateway import Fallback, Template
from gateway.testing import make_config, post_inbound, wait_for_status

from .helpers import reminder, reminder_statuses, soon, wait_reminder_state
from .test_scheduling import start, store_of


async def test_customer_writing_cancels_reminders_marked_cancel_on_reply_at_once(gateway_factory, nats_server, bus):
    gw, conv = await start(gateway_factory)
    store = store_of(bus)
    await store.schedule(reminder("c1", conv, due=soon(3600)))
    await store.schedule(reminder("c2", conv, due=soon(3600), cancel_on_reply=False))
    await wait_reminder_state(nats_server.url, "c2", "scheduled")
    await post_inbound(gw.http.port, "demo", text="never mind, it works now", sender="alice")
    sts = await wait_reminder_state(nats_server.url, "c1", "cancelled")
    assert sts[-1].reason == "reply"
    assert await store.get("c1") is None
    assert await store.get("c2") is not None  # not marked cancel_on_reply: kept


async def test_a_reminder_created_after_the_customers_message_is_not_cancelled_by_it(gateway_factory, nats_server, bus):
    gw, conv = await start(gateway_factory)
    store = store_of(bus)
    await store.schedule(reminder("c3", conv, due=soon(3600), created_at=datetime.now(timezone.utc) + timedelta(hours=1)))
    await wait_reminder_state(nats_server.url, "c3", "scheduled")
    await post_inbound(gw.http.port, "demo", text="hello again", sender="alice")
    # Another reminder of the conversation, cancellable, shows the reply was processed.
    await store.schedule(reminder("c3-witness", conv, due=soon(3600), created_at=datetime.now(timezone.utc) - timedelta(hours=1)))
    await wait_reminder_state(nats_server.url, "c3-witness", "scheduled")
    await post_inbound(gw.http.port, "demo", text="and again", sender="alice")
    await wait_reminder_state(nats_server.url, "c3-witness", "cancelled")
    assert await store.get("c3") is not None


async def test_a_reply_the_inbound_hook_missed_still_cancels_when_it_fires(gateway_factory, nats_server, bus):
    gw, conv = await start(gateway_factory)
    # A second gateway process without reminders takes the customer's message: the first
    # never hears of it, and only the check at firing can cancel.
    other = await gateway_factory({"demo": {"type": "mock"}}, reminders={"enabled": False})
    await store_of(bus).schedule(reminder("c4", conv, due=soon(2)))
    await wait_reminder_state(nats_server.url, "c4", "scheduled")
    await post_inbound(other.http.port, "demo", text="solved, thanks", sender="alice")
    sts = await wait_reminder_state(nats_server.url, "c4", "cancelled")
    assert sts[-1].reason == "reply" and "fired" not in [s.state for s in sts]


async def test_unreachable_at_the_due_time_without_fallback_fails_early_with_the_reach_code(gateway_factory, nats_server, bus):
    gw, conv = await start(gateway_factory, channels={"demo": {"type": "mock", "reply_window": "1h"}})
    store = store_of(bus)
    await store.schedule(reminder("w1", conv, due=soon(3 * 3600)))  # the window closes in an hour
    sts = await wait_reminder_state(nats_server.url, "w1", "failed")
    assert sts[-1].reason == "outside_window" and sts[-1].error.code == "outside_window"
    assert await store.get("w1") is None  # failed at scheduling, not three hours later


async def test_unreachable_with_a_template_fallback_is_scheduled_to_send_the_template(gateway_factory, nats_server, bus):
    gw, conv = await start(gateway_factory, channels={"demo": {"type": "mock", "reply_window": "1s"}})
    template = Template(id="tpl-followup", data={"first": "回访"})
    await store_of(bus).schedule(reminder("w2", conv, due=soon(2), fallback=Fallback(template=template)))
    sts = await wait_reminder_state(nats_server.url, "w2", "scheduled")
    assert sts[-1].fallback == "template"
    await wait_for_status(nats_server.url, "out-w2", "sent")
    [(out, _)] = [d for d in gw.channels["demo"].channel.deliveries if d[0].id == "out-w2"]
    assert out.template == template
    sts = await wait_reminder_state(nats_server.url, "w2", "fired")
    assert sts[-1].fallback == "template"


async def test_fallback_to_another_conversation_is_decided_at_scheduling_and_sent_there(gateway_factory, nats_server, bus):
    gw, conv = await start(gateway_factory, channels={"demo": {"type": "mock", "reply_window": "1s"},
                                                      "sms": {"type": "mock"}})
    await post_inbound(gw.http.port, "sms", text="hi", sender="+8613800000000")
    sms_conv = gw.channels["sms"].ctx.conversation_key("+8613800000000")
    fb = Fallback(conversation=sms_conv, channel_type="mock", channel="sms")
    await store_of(bus).schedule(reminder("w3", conv, due=soon(2), fallback=fb))
    sts = await wait_reminder_state(nats_server.url, "w3", "scheduled")
    assert sts[-1].fallback == "conversation"
    await wait_for_status(nats_server.url, "out-w3", "sent")
    [(out, c)] = [d for d in gw.channels["sms"].channel.deliveries if d[0].id == "out-w3"]
    assert out.conversation == sms_conv and c.route["to"] == "+8613800000000"
    assert not [d for d in gw.channels["demo"].channel.deliveries if d[0].id == "out-w3"]


async def test_a_move_past_the_reply_window_fails_at_once_with_the_code(gateway_factory, nats_server, bus):
    gw, conv = await start(gateway_factory, channels={"demo": {"type": "mock", "reply_window": "1h"}})
    await store_of(bus).schedule(reminder("w4", conv, due=soon(600)))
    await wait_reminder_state(nats_server.url, "w4", "scheduled")
    await store_of(bus).move("w4", soon(2 * 3600), reason="operator")
    sts = await wait_reminder_state(nats_server.url, "w4", "failed")
    assert sts[-1].reason == "outside_window"
    assert [s.state for s in sts] == ["scheduled", "failed"]


async def test_reach_lost_between_scheduling_and_firing_fails_at_firing_with_the_code(gateway_factory, nats_server, bus):
    gw, conv = await start(gateway_factory, channels={"demo": {"type": "mock", "reply_window": "1h"}})
    await store_of(bus).schedule(reminder("w5", conv, due=soon(2)))
    await wait_reminder_state(nats_server.url, "w5", "scheduled")
    # The channel's window shrinks meanwhile (a reload): only the check at firing sees it.
    assert await gw.reload(make_config(nats_server.url, {"demo": {"type": "mock", "reply_window": "1ms"}}))
    sts = await wait_reminder_state(nats_server.url, "w5", "failed")
    assert sts[-1].reason == "outside_window"
    assert [s.state for s in sts] == ["scheduled", "failed"]
    assert not [d for d in gw.channels["demo"].channel.deliveries if d[0].id == "out-w5"]
