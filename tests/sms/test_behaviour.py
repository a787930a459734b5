"""What the SMS channel promises whatever the provider: opt-out round trip, quiet hours
(urgent outbounds excepted), the segment limit, failover after N transient failures,
reach, masked numbers in logs, config errors."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from gateway import ConfigError, Outbound, PluginManager, Template, TextPart, parse_config

from .conftest import (
    CUSTOMER,
    OUR_NUMBER,
    aliyun_section,
    inbound,
    send,
    statuses,
    twilio_config,
    twilio_inbound,
    twilio_post,
    wait_state,
)


async def customer_writes(gw, body: str, n: int) -> str:
    r = await twilio_post(gw.http.port, "inbound", twilio_inbound(sid=f"SM{n:032x}", body=body))
    assert r.status_code == 200, r.text
    return gw.channels["sms"].ctx.conversation_key(f"{OUR_NUMBER}|{CUSTOMER}")


async def test_opt_out_round_trip_stop_refuses_sends_until_start(gateway_factory, fake_sms, nats_server, nc):
    gw = await gateway_factory({"sms": twilio_config(fake_sms)})
    channel = gw.channels["sms"].channel
    conv = await customer_writes(gw, "Stop", 1)
    [stop] = await inbound(nats_server.url)
    assert stop.meta["opt_out"] is True and stop.parts == [TextPart(text="Stop")]  # still published, flagged
    conversation = await gw.get_conversation(conv)
    reach = await channel.reach(conversation, datetime.now(timezone.utc))
    assert (reach.ok, reach.code) == (False, "opted_out")
    await send(nc, Outbound(id="o-stopped", conversation=conv, parts=[TextPart(text="promo")]))
    sts = await wait_state(nats_server.url, "o-stopped", "dead")
    assert sts[-1].error.code == "opted_out" and sts[-1].error.permanent and fake_sms.calls["twilio"] == 0

    await customer_writes(gw, "START", 2)
    assert (await inbound(nats_server.url))[-1].meta["opt_in"] is True
    assert (await channel.reach(conversation, datetime.now(timezone.utc))).ok
    await send(nc, Outbound(id="o-again", conversation=conv, parts=[TextPart(text="welcome back")]))
    await wait_state(nats_server.url, "o-again", "sent")
    assert [f["Body"] for f in fake_sms.twilio] == [["welcome back"]]


@pytest.mark.parametrize("word", ["退订", "TD", "unsubscribe"])
async def test_default_opt_out_keywords_include_chinese_ones(gateway_factory, nats_server, word):
    gw = await gateway_factory({"sms": twilio_config()})
    await customer_writes(gw, word, 3)
    assert (await inbound(nats_server.url))[-1].meta.get("opt_out") is True
    assert await gw.channels["sms"].channel.opted_out(CUSTOMER) is not None


async def test_configured_keywords_replace_the_defaults(gateway_factory, nats_server):
    gw = await gateway_factory({"sms": twilio_config(opt_out_keywords=["ARRET"])})
    await customer_writes(gw, "stop", 4)
    await customer_writes(gw, "arrêt", 5)
    assert await gw.channels["sms"].channel.opted_out(CUSTOMER) is None
    await customer_writes(gw, "ARRET", 6)
    assert await gw.channels["sms"].channel.opted_out(CUSTOMER) is not None


def _quiet_now() -> dict[str, str]:
    now = datetime.now(timezone.utc)
    return {"start": (now - timedelta(hours=1)).strftime("%H:%M"), "end": (now + timedelta(hours=1)).strftime("%H:%M"),
            "tz": "UTC"}


async def test_inside_quiet_hours_the_send_is_deferred_with_a_status_saying_until_when(
        gateway_factory, fake_sms, nats_server, nc):
    gw = await gateway_factory({"sms": twilio_config(fake_sms, quiet_hours=_quiet_now())})
    conv = await customer_writes(gw, "hi", 7)
    await send(nc, Outbound(id="o-quiet", conversation=conv, parts=[TextPart(text="later")]))
    sts = await wait_state(nats_server.url, "o-quiet", "failed")
    failed = sts[-1]
    assert failed.error.code == "quiet_hours" and not failed.error.permanent
    assert failed.next_attempt_at > datetime.now(timezone.utc) + timedelta(minutes=50)
    assert fake_sms.calls["twilio"] == 0


async def test_an_urgent_outbound_is_sent_inside_quiet_hours(gateway_factory, fake_sms, nats_server, nc):
    gw = await gateway_factory({"sms": twilio_config(fake_sms, quiet_hours=_quiet_now())})
    conv = await customer_writes(gw, "hi", 8)
    await send(nc, Outbound(id="o-urgent", conversation=conv, parts=[TextPart(text="your code is 1234")],
                            meta={"urgent": True}))
    sts = await wait_state(nats_server.url, "o-urgent", "sent")
    assert [s.state for s in sts] == ["accepted", "sent"]


async def test_text_over_max_segments_is_a_permanent_error_before_the_provider_is_asked(
        gateway_factory, fake_sms, nats_server, nc):
    gw = await gateway_factory({"sms": twilio_config(fake_sms, max_segments=2)})
    conv = await customer_writes(gw, "hi", 9)
    await send(nc, Outbound(id="o-ok", conversation=conv, parts=[TextPart(text="你" * 134)]))
    await send(nc, Outbound(id="o-long", conversation=conv, parts=[TextPart(text="你" * 135)]))
    ok = await wait_state(nats_server.url, "o-ok", "sent")
    assert ok[-1].meta["segments"] == 2 and ok[-1].meta["encoding"] == "UCS-2"
    sts = await wait_state(nats_server.url, "o-long", "dead")
    assert sts[-1].error.code == "too_long" and "3 UCS-2 segments" in sts[-1].error.message
    assert len(fake_sms.twilio) == 1


def failover_config(fake, **over):
    return twilio_config(fake, failover="aliyun", failover_after=2, aliyun=aliyun_section(fake), **over)


async def test_after_n_transient_failures_in_a_row_the_second_provider_sends_and_the_status_says_so(
        gateway_factory, fake_sms, nats_server, nc):
    gw = await gateway_factory({"sms": failover_config(fake_sms)}, outbound={"backoff": ["50ms"]})
    conv = await customer_writes(gw, "hi", 10)
    fake_sms.fail_next("twilio", 503, count=2)
    out = Outbound(id="o-fo", conversation=conv, parts=[TextPart(text="hello")], template=Template(id="SMS_9"))
    await send(nc, out)
    sts = await wait_state(nats_server.url, "o-fo", "sent")
    assert [s.state for s in sts] == ["accepted", "failed", "failed", "sent"]
    assert sts[-1].meta["provider"] == "aliyun" and fake_sms.calls["twilio"] == 2 and len(fake_sms.aliyun) == 1
    # The next one goes to the second provider at once (failover_for has not passed).
    await send(nc, Outbound(id="o-fo2", conversation=conv, parts=[TextPart(text="again")], template=Template(id="SMS_9")))
    sts = await wait_state(nats_server.url, "o-fo2", "sent")
    assert [s.state for s in sts] == ["accepted", "sent"] and sts[-1].meta["provider"] == "aliyun"
    assert fake_sms.calls["twilio"] == 2


async def test_failures_that_are_not_in_a_row_do_not_switch_provider(gateway_factory, fake_sms, nats_server, nc):
    gw = await gateway_factory({"sms": failover_config(fake_sms)}, outbound={"backoff": ["50ms"]})
    conv = await customer_writes(gw, "hi", 11)
    for i in range(2):
        fake_sms.fail_next("twilio", 503)
        await send(nc, Outbound(id=f"o-s{i}", conversation=conv, parts=[TextPart(text="x")], template=Template(id="T")))
        sts = await wait_state(nats_server.url, f"o-s{i}", "sent")
        assert sts[-1].meta["provider"] == "twilio"
    assert fake_sms.aliyun == []


async def test_an_outbound_the_second_provider_cannot_carry_stays_with_the_first(gateway_factory, fake_sms, nats_server, nc):
    gw = await gateway_factory({"sms": failover_config(fake_sms)}, outbound={"backoff": ["50ms"]})
    conv = await customer_writes(gw, "hi", 12)
    fake_sms.fail_next("twilio", 503, count=2)
    # Free text without a template: Aliyun would refuse it, so Twilio is tried again.
    await send(nc, Outbound(id="o-free", conversation=conv, parts=[TextPart(text="free")]))
    sts = await wait_state(nats_server.url, "o-free", "sent")
    assert sts[-1].meta["provider"] == "twilio" and fake_sms.calls["aliyun"] == 0


async def test_reach_of_a_template_only_provider_says_template_required(gateway_factory, nats_server):
    from .conftest import aliyun_config, aliyun_push, sms_up, SIGN_NAME, CN_CUSTOMER

    gw = await gateway_factory({"sms": aliyun_config()})
    assert (await aliyun_push(gw.http.port, "up", [sms_up(1)])).status_code == 200
    conversation = await gw.get_conversation(gw.channels["sms"].ctx.conversation_key(f"{SIGN_NAME}|{CN_CUSTOMER}"))
    reach = await gw.channels["sms"].channel.reach(conversation, datetime.now(timezone.utc))
    assert (reach.ok, reach.code, reach.template) == (False, "template_required", True)


async def test_phone_numbers_are_masked_in_logs(gateway_factory, fake_sms, nats_server, nc, capsys):
    gw = await gateway_factory({"sms": twilio_config(fake_sms)})
    conv = await customer_writes(gw, "STOP", 13)
    await customer_writes(gw, "START", 14)
    await send(nc, Outbound(id="o-log", conversation=conv, parts=[TextPart(text="hi")]))
    await wait_state(nats_server.url, "o-log", "sent")
    out = capsys.readouterr()
    logs = out.out + out.err
    assert "+14155****0123" in logs and "number opted out" in logs and "sms sent" in logs
    assert "4155550123" not in logs


@pytest.mark.parametrize("section, problem", [
    ({"type": "sms", "provider": "twilio"}, "channels.sms.twilio: missing required table"),
    ({"type": "sms", "provider": "twilio", "failover": "twilio", "twilio": {
        "account_sid": "AC" + "0" * 32, "auth_token": "t", "from_number": "+1"}}, "another provider"),
    ({"type": "sms", "provider": "twilio", "default_region": "XX", "twilio": {
        "account_sid": "AC" + "0" * 32, "auth_token": "t", "from_number": "+1"}}, "default_region"),
    ({"type": "sms", "provider": "twilio", "twilio": {"account_sid": "AC" + "0" * 32, "auth_token": "t"}},
     "from_number or messaging_service_sid"),
    ({"type": "sms", "provider": "twilio", "twilio": {"account_sid": "nope", "auth_token": "t", "from_number": "+1"}},
     "account_sid"),
    ({"type": "sms", "provider": "aliyun", "aliyun": {**aliyun_section(), "push_token": "short"}}, "push_token"),
    # Without a scheme Twilio's signatures could never match: every webhook would be a 403.
    ({"type": "sms", "provider": "twilio", "public_url": "gw.example.com", "twilio": {
        "account_sid": "AC" + "0" * 32, "auth_token": "t", "from_number": "+1"}}, "public_url"),
])
def test_config_mistakes_are_config_errors_naming_the_problem(section, problem):
    with pytest.raises(ConfigError) as exc:
        parse_config({"channels": {"sms": section}}, PluginManager().channel_types, source="<test>")
    assert problem in str(exc.value)


async def test_statuses_of_an_unknown_report_publish_nothing(gateway_factory, nats_server):
    gw = await gateway_factory({"sms": twilio_config()})
    r = await twilio_post(gw.http.port, "status", {"MessageSid": "SM" + "9" * 32, "MessageStatus": "delivered"})
    assert r.status_code == 204
    assert await statuses(nats_server.url) == []


async def test_a_late_retry_of_an_old_start_does_not_lift_a_newer_stop(gateway_factory, nats_server):
    # STOP, START, STOP; then the provider retries the START (a re-pushed batch, a webhook
    # retry): a duplicate changes nothing, and the customer stays opted out.
    gw = await gateway_factory({"sms": twilio_config()})
    for n, word in [(31, "STOP"), (32, "START"), (33, "STOP"), (32, "START")]:
        await customer_writes(gw, word, n)
    assert len(await inbound(nats_server.url)) == 3
    assert await gw.channels["sms"].channel.opted_out(CUSTOMER) is not None


async def test_aliyun_to_tencent_failover_sends_only_templates_mapped_to_tencents_own_ids(
        gateway_factory, fake_sms, nats_server, nc):
    # The two providers' template ids never match (SMS_123 vs 1234567): unmapped, Tencent
    # would refuse it permanently and a passing Aliyun outage would dead-letter it.
    from .conftest import CN_CUSTOMER, SIGN_NAME, aliyun_config, aliyun_push, sms_up, tencent_section

    cfg = aliyun_config(fake_sms, failover="tencent", failover_after=1,
                        tencent=tencent_section(fake_sms, templates={"SMS_MAPPED": "1234567"}))
    gw = await gateway_factory({"sms": cfg}, outbound={"backoff": ["50ms"]})
    assert (await aliyun_push(gw.http.port, "up", [sms_up(1)])).status_code == 200
    conv = gw.channels["sms"].ctx.conversation_key(f"{SIGN_NAME}|{CN_CUSTOMER}")
    fake_sms.fail_next("aliyun", 200, "isp.SYSTEM_ERROR", count=2)
    await send(nc, Outbound(id="o-unmapped", conversation=conv, template=Template(id="SMS_OTHER", data={"code": "1"})))
    sts = await wait_state(nats_server.url, "o-unmapped", "sent")
    assert sts[-1].meta["provider"] == "aliyun" and fake_sms.calls["tencent"] == 0
    await send(nc, Outbound(id="o-mapped", conversation=conv, template=Template(id="SMS_MAPPED", data={"code": "42"})))
    sts = await wait_state(nats_server.url, "o-mapped", "sent")
    assert sts[-1].meta["provider"] == "tencent" and sts[-1].meta["template"] == "SMS_MAPPED"
    [sent] = fake_sms.tencent
    assert sent["TemplateId"] == "1234567" and sent["TemplateParamSet"] == ["42"]


def test_the_documentations_example_is_a_valid_config():
    import re
    import tomllib
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "channels" / "sms.md").read_text(encoding="utf-8")
    [example] = re.findall(r"```toml\n(.*?)```", doc, re.S)
    env = {k: "x" * 16 for k in ("TWILIO_AUTH_TOKEN", "ALIYUN_AK_ID", "ALIYUN_AK_SECRET", "SMS_PUSH_TOKEN",
                                 "TENCENT_SECRET_ID", "TENCENT_SECRET_KEY")}
    config = parse_config({"bus": {"url": "nats://127.0.0.1:4222"}, **tomllib.loads(example)},
                          PluginManager().channel_types, source="sms.md", env=env)
    assert set(config.channels) == {"sms-us", "sms-cn"}


async def test_twilios_opt_out_type_and_its_current_default_keywords_opt_out(gateway_factory, nats_server):
    # Advanced Opt-Out (localized keywords, ARRET ...) says what Twilio did in OptOutType;
    # REVOKE and OPTOUT joined Twilio's defaults in 2025.
    gw = await gateway_factory({"sms": twilio_config()})
    channel = gw.channels["sms"].channel

    async def writes(n: int, body: str, **extra: str) -> None:
        r = await twilio_post(gw.http.port, "inbound", twilio_inbound(sid=f"SM{n:032x}", body=body, **extra))
        assert r.status_code == 200, r.text

    await writes(41, "ARRET", OptOutType="STOP")
    assert await channel.opted_out(CUSTOMER) is not None
    await writes(42, "COMMENCER", OptOutType="START")
    assert await channel.opted_out(CUSTOMER) is None
    await writes(43, "Revoke")
    assert await channel.opted_out(CUSTOMER) is not None
    first, second, _ = await inbound(nats_server.url)
    assert first.meta.get("opt_out") is True and second.meta.get("opt_in") is True
