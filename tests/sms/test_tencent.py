"""Tencent Cloud (腾讯云短信): SendSms signed TC3-HMAC-SHA256 (checked against the documented
example and by the local fake), reply and status callbacks in Tencent's format."""

from __future__ import annotations

from gateway import Outbound, Template, TextPart
from gateway.testing import stream_messages
from gateway_plugins.sms._providers import tc3_authorization

from .conftest import CN_CUSTOMER, TC_APP, TC_SIGN, inbound, push, send, statuses, tencent_config, wait_state


def test_tc3_signature_matches_the_documented_example():
    # TencentCloud API "Signature v3" example: CVM DescribeInstances at 1551113065, with
    # the documentation's (masked) SecretId and SecretKey as written there.
    payload = b'{"Limit": 1, "Filters": [{"Values": ["\\u672a\\u547d\\u540d"], "Name": "instance-name"}]}'
    auth = tc3_authorization("AKIDz8krbsJ5yKBZQpn74WFkmLPx3*******", "Gu5t9xGARNpq86cd98joQYCN3*******", "cvm",
                             "cvm.tencentcloudapi.com", 1551113065, payload)
    assert auth == ("TC3-HMAC-SHA256 Credential=AKIDz8krbsJ5yKBZQpn74WFkmLPx3*******/2019-02-25/cvm/tc3_request, "
                    "SignedHeaders=content-type;host, "
                    "Signature=2230eefd229f582d8b1b891af7107b91597240707d778ab3738f756258d7652c")


def reply(text: str = "你好", t: int = 1764554400, mobile: str = "13812345678") -> dict:
    return {"extend": "", "mobile": mobile, "nationcode": "86", "sign": TC_SIGN, "text": text, "time": t}


async def customer_writes(gw) -> str:
    r = await push(gw.http.port, "tencent/reply", reply())
    assert r.status_code == 200 and r.json() == {"result": 0, "errmsg": "OK"}
    return gw.channels["sms"].ctx.conversation_key(f"{TC_SIGN}|{CN_CUSTOMER}")


async def test_reply_callback_is_published_once_across_retries(gateway_factory, nats_server):
    gw = await gateway_factory({"sms": tencent_config()})
    for _ in range(2):
        await customer_writes(gw)
    r = await push(gw.http.port, "tencent/reply", [reply("退订", t=1764554500)])
    assert r.status_code == 200
    msgs = await inbound(nats_server.url)
    assert [m.parts[0].text for m in msgs] == ["你好", "退订"] and msgs[1].meta["opt_out"] is True
    assert msgs[0].sender.id == CN_CUSTOMER and msgs[0].recipient.id == TC_SIGN
    assert msgs[0].sent_at.timestamp() == 1764554400


async def test_callbacks_without_the_token_or_malformed_are_refused(gateway_factory, nats_server):
    gw = await gateway_factory({"sms": tencent_config()})
    assert (await push(gw.http.port, "tencent/reply", reply(), token="wrong-token-123456789")).status_code == 403
    r = await push(gw.http.port, "tencent/reply", {"text": "no mobile"})
    assert r.status_code == 400 and "mobile" in r.text
    assert await inbound(nats_server.url) == []


async def test_send_sms_carries_template_params_in_order_and_fee_as_segments(gateway_factory, fake_sms, nats_server, nc):
    fake_sms.tencent_fee = 2
    gw = await gateway_factory({"sms": tencent_config(fake_sms)})
    conv = await customer_writes(gw)
    await send(nc, Outbound(id="t-1", conversation=conv,
                            template=Template(id="1234", data={"2": "5", "1": "123456", "10": "x"})))
    sts = await wait_state(nats_server.url, "t-1", "sent")
    [body] = fake_sms.tencent
    assert body["PhoneNumberSet"] == [CN_CUSTOMER] and body["SmsSdkAppId"] == TC_APP and body["SignName"] == TC_SIGN
    assert body["TemplateId"] == "1234" and body["TemplateParamSet"] == ["123456", "5", "x"]
    assert sts[-1].provider_id.startswith("2433:")
    assert sts[-1].meta == {"provider": "tencent", "template": "1234", "segments": 2}


async def test_without_template_it_is_a_permanent_template_required_error(gateway_factory, fake_sms, nats_server, nc):
    gw = await gateway_factory({"sms": tencent_config(fake_sms)})
    conv = await customer_writes(gw)
    await send(nc, Outbound(id="t-free", conversation=conv, parts=[TextPart(text="free")]))
    sts = await wait_state(nats_server.url, "t-free", "dead")
    assert sts[-1].error.code == "template_required" and fake_sms.calls["tencent"] == 0


async def test_tencent_error_codes_are_classified(gateway_factory, fake_sms, nats_server, nc):
    gw = await gateway_factory({"sms": tencent_config(fake_sms)}, outbound={"backoff": ["50ms"]})
    conv = await customer_writes(gw)
    fake_sms.script["tencent"].append((0, "InternalError.Timeout"))
    await send(nc, Outbound(id="t-t", conversation=conv, template=Template(id="1")))
    sts = await wait_state(nats_server.url, "t-t", "sent")
    assert [s.state for s in sts] == ["accepted", "failed", "sent"]
    fake_sms.script["tencent"].append((1, "InvalidParameterValue.IncorrectPhoneNumber"))
    await send(nc, Outbound(id="t-p", conversation=conv, template=Template(id="1")))
    sts = await wait_state(nats_server.url, "t-p", "dead")
    assert sts[-1].error.code == "tencent_InvalidParameterValue.IncorrectPhoneNumber"


async def test_a_wrong_secret_key_fails_the_signature_check(gateway_factory, fake_sms, nats_server, nc):
    cfg = tencent_config(fake_sms)
    cfg["tencent"]["secret_key"] = "not-the-key"
    gw = await gateway_factory({"sms": cfg})
    conv = await customer_writes(gw)
    await send(nc, Outbound(id="t-sig", conversation=conv, template=Template(id="1")))
    sts = await wait_state(nats_server.url, "t-sig", "dead")
    assert sts[-1].error.code == "tencent_AuthFailure.SignatureFailure" and fake_sms.tencent == []


async def test_status_callbacks_become_statuses_once(gateway_factory, fake_sms, nats_server, nc):
    gw = await gateway_factory({"sms": tencent_config(fake_sms)})
    conv = await customer_writes(gw)
    for oid in ("t-ok", "t-bad"):
        await send(nc, Outbound(id=oid, conversation=conv, template=Template(id="1")))
    ok = (await wait_state(nats_server.url, "t-ok", "sent"))[-1].provider_id
    bad = (await wait_state(nats_server.url, "t-bad", "sent"))[-1].provider_id
    records = [{"user_receive_time": "2026-12-01 10:00:05", "nationcode": "86", "mobile": "13812345678",
                "report_status": "SUCCESS", "errmsg": "DELIVRD", "description": "ok", "sid": ok},
               {"user_receive_time": "2026-12-01 10:00:05", "nationcode": "86", "mobile": "13812345678",
                "report_status": "FAIL", "errmsg": "MK:0005", "description": "failed", "sid": bad}]
    for _ in range(2):
        r = await push(gw.http.port, "tencent/status", records)
        assert r.status_code == 200 and r.json()["result"] == 0
    assert [s.state for s in await statuses(nats_server.url, "t-ok")] == ["accepted", "sent", "delivered"]
    sts = await statuses(nats_server.url, "t-bad")
    assert [s.state for s in sts] == ["accepted", "sent", "dead"] and sts[-1].error.code == "tencent_MK:0005"
    assert (sts[-1].attempt, sts[-1].error.permanent, sts[-1].next_attempt_at) == (0, True, None)
    assert await stream_messages(nats_server.url, "GW_DEAD") == []


async def test_a_reply_time_out_of_range_is_published_without_it_not_a_5xx(gateway_factory, nats_server):
    gw = await gateway_factory({"sms": tencent_config()})
    r = await push(gw.http.port, "tencent/reply", reply(t=10**15))
    assert r.status_code == 200, r.text
    [msg] = await inbound(nats_server.url)
    assert msg.sent_at is None and msg.sender.id == CN_CUSTOMER
