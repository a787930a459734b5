"""Twilio: the signed incoming-message webhook, replies through the Messages API (a local
server speaking it), status callbacks as statuses, MessageSid dedup."""

from __future__ import annotations

from gateway import ImagePart, Outbound, TextPart
from gateway.testing import stream_messages

from .conftest import (
    CUSTOMER,
    OUR_NUMBER,
    PUBLIC,
    inbound,
    send,
    statuses,
    twilio_config,
    twilio_inbound,
    twilio_post,
    wait_state,
    wait_until,
)


async def customer_writes(gw, body: str = "Hello", sid: str = "SM" + "b" * 32) -> str:
    r = await twilio_post(gw.http.port, "inbound", twilio_inbound(sid=sid, body=body))
    assert r.status_code == 200, r.text
    return (await gw.channels["sms"].ctx.get_conversation(
        gw.channels["sms"].ctx.conversation_key(f"{OUR_NUMBER}|{CUSTOMER}"))).key


async def test_inbound_sms_is_published_with_e164_numbers_and_answered_with_empty_twiml(gateway_factory, nats_server):
    gw = await gateway_factory({"sms": twilio_config()})
    r = await twilio_post(gw.http.port, "inbound", twilio_inbound(body="Where is my order?"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/xml") and "<Response>" in r.text
    [msg] = await inbound(nats_server.url)
    assert msg.sender.id == CUSTOMER and msg.recipient.id == OUR_NUMBER
    assert msg.parts == [TextPart(text="Where is my order?")] and msg.provider_id == "twilio:SM" + "a" * 32
    assert msg.conversation == gw.channels["sms"].ctx.conversation_key(f"{OUR_NUMBER}|{CUSTOMER}")
    assert msg.meta["provider"] == "twilio" and msg.meta["segments"] == 1


async def test_twilio_retry_of_one_message_sid_is_published_once(gateway_factory, nats_server):
    gw = await gateway_factory({"sms": twilio_config()})
    for _ in range(3):
        r = await twilio_post(gw.http.port, "inbound", twilio_inbound(sid="SM" + "c" * 32))
        assert r.status_code == 200
    assert len(await inbound(nats_server.url)) == 1


async def test_wrong_or_missing_signature_is_refused_and_nothing_published(gateway_factory, nats_server):
    gw = await gateway_factory({"sms": twilio_config()})
    r = await twilio_post(gw.http.port, "inbound", twilio_inbound(), token="not-the-token")
    assert r.status_code == 403 and "signature" in r.text.lower()
    r = await twilio_post(gw.http.port, "inbound", twilio_inbound(), headers={"X-Twilio-Signature": ""})
    assert r.status_code == 403
    assert await inbound(nats_server.url) == []


async def test_behind_a_proxy_the_signature_over_the_public_url_is_checked(gateway_factory, nats_server):
    # Twilio signed https://sms.example.com/...; the request reaches us at 127.0.0.1.
    gw = await gateway_factory({"sms": twilio_config()})
    local = f"http://127.0.0.1:{gw.http.port}/channels/sms/twilio/inbound"
    r = await twilio_post(gw.http.port, "inbound", twilio_inbound(), signed_url=local)
    assert r.status_code == 403  # signed over the local URL: not what Twilio signs
    r = await twilio_post(gw.http.port, "inbound", twilio_inbound())
    assert r.status_code == 200


async def test_forwarded_headers_give_the_signed_url_only_when_trusted(gateway_factory, nats_server):
    cfg = twilio_config(public_url="", trust_forwarded=True)
    gw = await gateway_factory({"sms": cfg})
    fwd = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "sms.example.com"}
    r = await twilio_post(gw.http.port, "inbound", twilio_inbound(), headers=fwd)
    assert r.status_code == 200


async def test_mms_media_is_referenced_in_the_message(gateway_factory, nats_server):
    gw = await gateway_factory({"sms": twilio_config()})
    media = "https://api.twilio.com/2010-04-01/Accounts/AC/Messages/MM1/Media/ME1"
    r = await twilio_post(gw.http.port, "inbound", twilio_inbound(body="photo", NumMedia="1", MediaUrl0=media,
                                                                  MediaContentType0="image/jpeg"))
    assert r.status_code == 200
    [msg] = await inbound(nats_server.url)
    assert msg.parts == [TextPart(text="photo"), ImagePart(url=media, content_type="image/jpeg")]


async def test_malformed_numbers_are_refused_with_a_reason_naming_the_field(gateway_factory, nats_server):
    gw = await gateway_factory({"sms": twilio_config()})
    r = await twilio_post(gw.http.port, "inbound", twilio_inbound(frm="not-a-number"))
    assert r.status_code == 400 and "From" in r.text and "not-a-number" not in r.text
    r = await twilio_post(gw.http.port, "inbound", {"From": CUSTOMER, "To": OUR_NUMBER})
    assert r.status_code == 400 and "MessageSid" in r.text


async def test_reply_goes_through_the_messages_api_with_status_callback_and_segments_in_sent(
        gateway_factory, fake_sms, nats_server, nc):
    gw = await gateway_factory({"sms": twilio_config(fake_sms)})
    conv = await customer_writes(gw)
    await send(nc, Outbound(id="o-1", conversation=conv, parts=[TextPart(text="x" * 161)]))
    sts = await wait_state(nats_server.url, "o-1", "sent")
    [form] = fake_sms.twilio
    assert form["To"] == [CUSTOMER] and form["From"] == [OUR_NUMBER] and form["Body"] == ["x" * 161]
    assert form["StatusCallback"] == [f"{PUBLIC}/channels/sms/twilio/status"]
    assert sts[-1].provider_id.startswith("SM")
    assert sts[-1].meta == {"provider": "twilio", "segments": 2, "encoding": "GSM-7"}


async def test_template_goes_as_content_sid_with_variables(gateway_factory, fake_sms, nats_server, nc):
    from gateway import Template

    gw = await gateway_factory({"sms": twilio_config(fake_sms)})
    conv = await customer_writes(gw)
    await send(nc, Outbound(id="o-t", conversation=conv, template=Template(id="HX123", data={"1": "Alice"})))
    sts = await wait_state(nats_server.url, "o-t", "sent")
    [form] = fake_sms.twilio
    assert form["ContentSid"] == ["HX123"] and form["ContentVariables"] == ['{"1": "Alice"}'] and "Body" not in form
    assert sts[-1].meta == {"provider": "twilio", "template": "HX123"}


async def test_status_callbacks_become_delivered_and_dead_statuses_once(gateway_factory, fake_sms, nats_server, nc):
    gw = await gateway_factory({"sms": twilio_config(fake_sms)})
    conv = await customer_writes(gw)
    await send(nc, Outbound(id="o-d", conversation=conv, parts=[TextPart(text="one")]))
    await send(nc, Outbound(id="o-f", conversation=conv, parts=[TextPart(text="two")]))
    sid_d = (await wait_state(nats_server.url, "o-d", "sent"))[-1].provider_id
    sid_f = (await wait_state(nats_server.url, "o-f", "sent"))[-1].provider_id
    for _ in range(2):  # Twilio retries a callback it got no 2xx for
        for sid, status, extra in ((sid_d, "sent", {}), (sid_d, "delivered", {}),
                                   (sid_f, "undelivered", {"ErrorCode": "30003"})):
            r = await twilio_post(gw.http.port, "status", {"MessageSid": sid, "MessageStatus": status,
                                                           "AccountSid": "AC", "To": CUSTOMER, **extra})
            assert r.status_code == 204
    sts_d = await wait_state(nats_server.url, "o-d", "delivered")
    sts_f = await wait_state(nats_server.url, "o-f", "dead")
    assert [s.state for s in sts_d] == ["accepted", "sent", "delivered"]
    assert [s.state for s in sts_f] == ["accepted", "sent", "dead"]
    dead = sts_f[-1]
    assert dead.error.code == "twilio_30003" and dead.provider_id == sid_f
    assert (dead.attempt, dead.error.permanent, dead.next_attempt_at) == (0, True, None)
    assert await stream_messages(nats_server.url, "GW_DEAD") == []


async def test_status_callback_with_a_bad_signature_is_refused(gateway_factory, nats_server):
    gw = await gateway_factory({"sms": twilio_config()})
    r = await twilio_post(gw.http.port, "status", {"MessageSid": "SM1", "MessageStatus": "delivered"}, token="x")
    assert r.status_code == 403


async def test_invalid_number_answer_is_permanent_and_dead_lettered(gateway_factory, fake_sms, nats_server, nc):
    gw = await gateway_factory({"sms": twilio_config(fake_sms)})
    conv = await customer_writes(gw)
    fake_sms.fail_next("twilio", 400, 21211)
    await send(nc, Outbound(id="o-bad", conversation=conv, parts=[TextPart(text="hi")]))
    sts = await wait_state(nats_server.url, "o-bad", "dead")
    assert sts[-1].error.code == "twilio_21211" and sts[-1].error.permanent
    assert fake_sms.twilio == []


async def test_rate_limited_send_is_retried_then_sent(gateway_factory, fake_sms, nats_server, nc):
    gw = await gateway_factory({"sms": twilio_config(fake_sms)}, outbound={"backoff": ["50ms"]})
    conv = await customer_writes(gw)
    fake_sms.fail_next("twilio", 429, 20429)
    await send(nc, Outbound(id="o-429", conversation=conv, parts=[TextPart(text="hi")]))
    sts = await wait_state(nats_server.url, "o-429", "sent")
    assert [s.state for s in sts] == ["accepted", "failed", "sent"] and sts[1].error.code == "twilio_20429"
    await wait_until(lambda: len(fake_sms.twilio) == 1)
    assert len(await statuses(nats_server.url, "o-429")) == 3


async def test_twilio_21610_marks_the_number_opted_out(gateway_factory, fake_sms, nats_server, nc):
    gw = await gateway_factory({"sms": twilio_config(fake_sms)})
    conv = await customer_writes(gw)
    fake_sms.fail_next("twilio", 400, 21610)
    await send(nc, Outbound(id="o-21610", conversation=conv, parts=[TextPart(text="hi")]))
    sts = await wait_state(nats_server.url, "o-21610", "dead")
    assert sts[-1].error.code == "opted_out"
    assert await gw.channels["sms"].channel.opted_out(CUSTOMER) is not None
    await send(nc, Outbound(id="o-after", conversation=conv, parts=[TextPart(text="hi")]))
    await wait_state(nats_server.url, "o-after", "dead")
    assert fake_sms.calls["twilio"] == 1


async def test_a_message_to_our_short_code_is_accepted(gateway_factory, nats_server):
    gw = await gateway_factory({"sms": twilio_config()})
    r = await twilio_post(gw.http.port, "inbound", twilio_inbound(to="89898"))
    assert r.status_code == 200
    [msg] = await inbound(nats_server.url)
    assert msg.recipient.id == "89898"


async def test_hostile_bodies_get_4xx_and_hurt_nothing(gateway_factory, nats_server):
    import httpx

    gw = await gateway_factory({"sms": twilio_config(max_body=4096)})
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.http.port}") as c:
        r = await c.post("/channels/sms/twilio/inbound", content=b"Body=\xff\xfe", headers={"X-Twilio-Signature": "x"})
        assert r.status_code == 400 and "UTF-8" in r.text
        r = await c.post("/channels/sms/twilio/inbound", content=b"Body=" + b"a" * 5000,
                         headers={"X-Twilio-Signature": "x"})
        assert r.status_code == 413
    # A signed message claiming a million media parts: published with what it carries.
    r = await twilio_post(gw.http.port, "inbound", twilio_inbound(NumMedia="1000000"))
    assert r.status_code == 200
    assert len(await inbound(nats_server.url)) == 1


async def test_images_go_as_media_urls_and_an_image_without_url_is_refused(gateway_factory, fake_sms, nats_server, nc):
    gw = await gateway_factory({"sms": twilio_config(fake_sms)})
    conv = await customer_writes(gw)
    url = "https://cdn.example.com/receipt.png"
    await send(nc, Outbound(id="o-mms", conversation=conv, parts=[TextPart(text="receipt"), ImagePart(url=url)]))
    await wait_state(nats_server.url, "o-mms", "sent")
    assert fake_sms.twilio[0]["MediaUrl"] == [url]
    await send(nc, Outbound(id="o-inline", conversation=conv, parts=[ImagePart(data=b"\x89PNG")]))
    sts = await wait_state(nats_server.url, "o-inline", "dead")
    assert sts[-1].error.code == "unsupported_content" and len(fake_sms.twilio) == 1


async def test_webhooks_signed_by_a_webhooks_rule_shared_key_with_hmac_sha256_are_checked(gateway_factory, nats_server):
    cfg = twilio_config()
    cfg["twilio"]["webhook_shared_key"] = "shared-key-secret"
    gw = await gateway_factory({"sms": cfg})
    settings = {"X-Twilio-Webhooks-Signature-Settings": "key=webhooks_sharedkey_1,algorithm=HMAC_SHA256"}
    r = await twilio_post(gw.http.port, "inbound", twilio_inbound(sid="SM" + "d" * 32), token="shared-key-secret",
                          algorithm="HMAC_SHA256", headers=settings)
    assert r.status_code == 200
    # The Auth Token's signature does not pass when the header says a shared key signed.
    r = await twilio_post(gw.http.port, "inbound", twilio_inbound(sid="SM" + "e" * 32), headers=settings)
    assert r.status_code == 403
    assert len(await inbound(nats_server.url)) == 1


async def test_shared_key_webhooks_are_refused_when_no_key_is_configured(gateway_factory, nats_server):
    gw = await gateway_factory({"sms": twilio_config()})
    settings = {"X-Twilio-Webhooks-Signature-Settings": "key=k,algorithm=HMAC_SHA256"}
    r = await twilio_post(gw.http.port, "inbound", twilio_inbound(), token="anything", algorithm="HMAC_SHA256",
                          headers=settings)
    assert r.status_code == 403 and "shared key" in r.text


async def test_a_lowercase_default_region_reads_national_numbers_as_its_uppercase(gateway_factory, nats_server):
    # check-config accepts "us" (it compares case-insensitively); so must the numbers.
    gw = await gateway_factory({"sms": twilio_config(default_region="us")})
    r = await twilio_post(gw.http.port, "inbound", twilio_inbound(frm="(415) 555-0123"))
    assert r.status_code == 200, r.text
    [msg] = await inbound(nats_server.url)
    assert msg.sender.id == CUSTOMER


async def test_signed_counts_in_unicode_digits_are_ignored_not_a_5xx(gateway_factory, nats_server):
    # "²".isdigit() is True but int("²") fails: a count Twilio would never send, still no 500.
    gw = await gateway_factory({"sms": twilio_config()})
    r = await twilio_post(gw.http.port, "inbound", twilio_inbound(NumMedia="²", NumSegments="²"))
    assert r.status_code == 200, r.text
    [msg] = await inbound(nats_server.url)
    assert "segments" not in msg.meta


async def test_an_unsupported_signature_algorithm_is_refused_without_repeating_it(gateway_factory, nats_server,
                                                                                   caplog):
    # Unsigned, so anyone can send it: twilio's validator would log the header's value.
    cfg = twilio_config()
    cfg["twilio"]["webhook_shared_key"] = "shared-key-secret"
    gw = await gateway_factory({"sms": cfg})
    settings = {"X-Twilio-Webhooks-Signature-Settings": "key=k,algorithm=INJECTED-" + "x" * 4000}
    r = await twilio_post(gw.http.port, "inbound", twilio_inbound(), headers=settings)
    assert r.status_code == 403 and "INJECTED" not in r.text
    assert "INJECTED" not in caplog.text
