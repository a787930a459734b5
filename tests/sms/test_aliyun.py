"""Aliyun (阿里云短信): SmsUp / SmsReport HTTP batch pushes (answered only after every record
is on the bus; repeated records and batches never double) and SendSms with templates,
against a local server that checks the request signature."""

from __future__ import annotations

import json

from gateway import Outbound, Template, TextPart
from gateway.testing import stream_messages

from .conftest import (
    CN_CUSTOMER,
    SIGN_NAME,
    aliyun_config,
    aliyun_push,
    inbound,
    send,
    sms_report,
    sms_up,
    statuses,
    wait_state,
    wait_until,
)


async def customer_writes(gw, seq: int = 1) -> str:
    r = await aliyun_push(gw.http.port, "up", [sms_up(seq)])
    assert r.status_code == 200, r.text
    return gw.channels["sms"].ctx.conversation_key(f"{SIGN_NAME}|{CN_CUSTOMER}")


async def test_a_batch_of_replies_is_published_in_order_then_answered_with_the_documented_success(
        gateway_factory, nats_server):
    gw = await gateway_factory({"sms": aliyun_config()})
    r = await aliyun_push(gw.http.port, "up", [sms_up(1, "一"), sms_up(2, "二"), sms_up(3, "三", phone="13900000001")])
    assert r.status_code == 200 and r.json() == {"code": 0, "msg": "接收成功"}
    msgs = await inbound(nats_server.url)
    assert [m.parts[0].text for m in msgs] == ["一", "二", "三"]
    assert msgs[0].sender.id == CN_CUSTOMER and msgs[0].recipient.id == SIGN_NAME
    assert msgs[2].sender.id == "+8613900000001" and msgs[0].provider_id == "aliyun:1"
    # Beijing time as sent, in UTC on the bus (the bus contract's times are UTC).
    assert msgs[0].sent_at.isoformat() == "2026-12-01T02:00:00+00:00" and msgs[0].meta["dest_code"] == "1234"


async def test_a_repushed_batch_and_repeated_records_are_published_once(gateway_factory, nats_server):
    gw = await gateway_factory({"sms": aliyun_config()})
    batch = [sms_up(10), sms_up(11), sms_up(10)]
    for _ in range(3):
        r = await aliyun_push(gw.http.port, "up", batch)
        assert r.status_code == 200
    r = await aliyun_push(gw.http.port, "up", [sms_up(11), sms_up(12)])
    assert r.status_code == 200
    assert sorted(m.provider_id for m in await inbound(nats_server.url)) == ["aliyun:10", "aliyun:11", "aliyun:12"]


async def test_with_the_bus_down_the_push_is_not_answered_success_and_its_repush_publishes_once(
        gateway_factory, nats_server):
    gw = await gateway_factory({"sms": aliyun_config()}, bus={"publish_timeout": "1s"})
    batch = [sms_up(20), sms_up(21)]
    await nats_server.stop()
    r = await aliyun_push(gw.http.port, "up", batch)
    assert r.status_code == 503 and "接收成功" not in r.text
    await nats_server.start()

    async def repushed() -> bool:
        return (await aliyun_push(gw.http.port, "up", batch)).status_code == 200

    await wait_until(repushed, timeout=20, interval=0.3)
    assert sorted(m.provider_id for m in await inbound(nats_server.url)) == ["aliyun:20", "aliyun:21"]


async def test_a_push_without_the_token_is_refused(gateway_factory, nats_server):
    gw = await gateway_factory({"sms": aliyun_config()})
    r = await aliyun_push(gw.http.port, "up", [sms_up(1)], token="wrong-token-000000")
    assert r.status_code == 403
    assert await inbound(nats_server.url) == []


async def test_a_malformed_batch_is_refused_whole_with_a_reason(gateway_factory, nats_server):
    gw = await gateway_factory({"sms": aliyun_config()})
    r = await aliyun_push(gw.http.port, "up", [sms_up(1), {"content": "no number"}])
    assert r.status_code == 400 and "phone_number" in r.text
    r = await aliyun_push(gw.http.port, "up", [sms_up(1), sms_up(2, phone="12")])
    assert r.status_code == 400 and "record 1" in r.text
    r = await aliyun_push(gw.http.port, "up", b"{not json")
    assert r.status_code == 400
    assert await inbound(nats_server.url) == []


async def test_send_sms_carries_the_template_the_sign_name_and_the_national_number(
        gateway_factory, fake_sms, nats_server, nc):
    gw = await gateway_factory({"sms": aliyun_config(fake_sms)})
    conv = await customer_writes(gw)
    await send(nc, Outbound(id="a-1", conversation=conv, parts=[TextPart(text="ignored")],
                            template=Template(id="SMS_71390007", data={"code": "1234"})))
    sts = await wait_state(nats_server.url, "a-1", "sent")
    [p] = fake_sms.aliyun
    assert p["PhoneNumbers"] == "13812345678" and p["SignName"] == SIGN_NAME and p["TemplateCode"] == "SMS_71390007"
    assert json.loads(p["TemplateParam"]) == {"code": "1234"} and p["OutId"] == "a-1"
    assert sts[-1].provider_id == "900619746936498441^0"
    assert sts[-1].meta == {"provider": "aliyun", "template": "SMS_71390007"}


async def test_an_outbound_without_template_is_a_permanent_template_required_error(
        gateway_factory, fake_sms, nats_server, nc):
    gw = await gateway_factory({"sms": aliyun_config(fake_sms)})
    conv = await customer_writes(gw)
    await send(nc, Outbound(id="a-free", conversation=conv, parts=[TextPart(text="free text")]))
    sts = await wait_state(nats_server.url, "a-free", "dead")
    assert sts[-1].error.code == "template_required" and fake_sms.calls["aliyun"] == 0


async def test_aliyun_error_codes_are_classified(gateway_factory, fake_sms, nats_server, nc):
    gw = await gateway_factory({"sms": aliyun_config(fake_sms)}, outbound={"backoff": ["50ms"]})
    conv = await customer_writes(gw)
    fake_sms.fail_next("aliyun", 200, "isp.SYSTEM_ERROR")
    await send(nc, Outbound(id="a-t", conversation=conv, template=Template(id="SMS_1")))
    sts = await wait_state(nats_server.url, "a-t", "sent")
    assert [s.state for s in sts] == ["accepted", "failed", "sent"] and sts[1].error.code == "aliyun_isp.SYSTEM_ERROR"
    fake_sms.fail_next("aliyun", 200, "isv.MOBILE_NUMBER_ILLEGAL")
    await send(nc, Outbound(id="a-p", conversation=conv, template=Template(id="SMS_1")))
    sts = await wait_state(nats_server.url, "a-p", "dead")
    assert sts[-1].error.code == "aliyun_isv.MOBILE_NUMBER_ILLEGAL" and sts[-1].error.permanent


async def test_a_wrong_access_key_secret_is_refused_by_the_signature_check(gateway_factory, fake_sms, nats_server, nc):
    cfg = aliyun_config(fake_sms)
    cfg["aliyun"]["access_key_secret"] = "not-the-secret"
    gw = await gateway_factory({"sms": cfg})
    conv = await customer_writes(gw)
    await send(nc, Outbound(id="a-sig", conversation=conv, template=Template(id="SMS_1")))
    sts = await wait_state(nats_server.url, "a-sig", "dead")
    assert sts[-1].error.code == "aliyun_SignatureDoesNotMatch" and fake_sms.aliyun == []


async def test_delivery_reports_become_statuses_once_across_repushed_batches_with_the_billed_segments(
        gateway_factory, fake_sms, nats_server, nc):
    gw = await gateway_factory({"sms": aliyun_config(fake_sms)})
    conv = await customer_writes(gw)
    for oid in ("r-ok", "r-bad"):
        await send(nc, Outbound(id=oid, conversation=conv, template=Template(id="SMS_1")))
    ok = (await wait_state(nats_server.url, "r-ok", "sent"))[-1].provider_id
    bad = (await wait_state(nats_server.url, "r-bad", "sent"))[-1].provider_id
    batch = [sms_report(ok, sms_size="2"), sms_report(bad, success=False, err_code="MK:0001"), sms_report("unknown-biz")]
    for _ in range(3):
        r = await aliyun_push(gw.http.port, "report", batch + [sms_report(ok, sms_size="2")])
        assert r.status_code == 200 and r.json()["code"] == 0
    sts = await statuses(nats_server.url, "r-ok")
    assert [s.state for s in sts] == ["accepted", "sent", "delivered"]
    # Aliyun's send answer has no count: the segments it billed come with the report.
    assert sts[-1].meta == {"provider": "aliyun", "segments": 2}
    sts = await statuses(nats_server.url, "r-bad")
    assert [s.state for s in sts] == ["accepted", "sent", "dead"]
    # A provider's late "undelivered" is final (dead), reported once, without a dead letter.
    assert (sts[-1].attempt, sts[-1].error.permanent, sts[-1].next_attempt_at) == (0, True, None)
    assert sts[-1].error.code == "aliyun_MK:0001" and sts[-1].provider_id == bad and sts[-1].meta["provider"] == "aliyun"
    assert await stream_messages(nats_server.url, "GW_DEAD") == []


async def test_a_report_repushed_after_the_brokers_duplicate_window_is_still_reported_once(
        gateway_factory, fake_sms, nats_server, nc):
    import asyncio

    # JetStream only drops a repeated status id within duplicate_window; the channel's own
    # record of reports it handled covers the provider's much longer retry horizon.
    gw = await gateway_factory({"sms": aliyun_config(fake_sms)}, bus={"duplicate_window": "1s"})
    conv = await customer_writes(gw)
    await send(nc, Outbound(id="r-late", conversation=conv, template=Template(id="SMS_1")))
    biz = (await wait_state(nats_server.url, "r-late", "sent"))[-1].provider_id
    assert (await aliyun_push(gw.http.port, "report", [sms_report(biz)])).status_code == 200
    await asyncio.sleep(1.5)  # a time window must pass: there is no condition to await
    assert (await aliyun_push(gw.http.port, "report", [sms_report(biz)])).status_code == 200
    assert [s.state for s in await statuses(nats_server.url, "r-late")] == ["accepted", "sent", "delivered"]
