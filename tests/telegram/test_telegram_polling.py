"""Updates in by long polling: getUpdates from the checkpointed offset, one poller among
several gateway processes (a lease), the webhook removed first."""

from __future__ import annotations

import json
from typing import Any

from tg_fake import TOKEN, USERNAME, FakeTelegram, group_chat, message, tg_config, update

from gateway import Message, Subjects
from gateway.testing import stream_messages, wait_until
from gateway.wire import message_decoder


async def published(url: str) -> list[Message]:
    msgs = await stream_messages(url, Subjects().stream_in, Subjects().inbound("telegram", "tg"))
    return [message_decoder.decode(m.data) for m in msgs]


def polling(fake: FakeTelegram, **over: Any) -> dict[str, Any]:
    return tg_config(fake, mode="polling", secret_token="", poll_timeout="1s", **over)


async def test_polled_updates_are_published_in_order_and_the_offset_survives_a_restart(
        gateway_factory, fake_tg, nats_server):
    fake_tg.webhook = {"url": "https://old.example.com/hook"}  # getUpdates is refused while it is set
    fake_tg.push(*(update(100 + i, message=message(10 + i, f"message {i}")) for i in range(3)))
    gw = await gateway_factory({"tg": polling(fake_tg)})

    async def all_published() -> bool:
        return len(await published(nats_server.url)) == 3

    await wait_until(all_published, timeout=15)
    assert fake_tg.webhook is None
    assert [m.parts[0].text for m in await published(nats_server.url)] == [f"message {i}" for i in range(3)]
    ctx = gw.channels["tg"].ctx
    assert json.loads(await ctx.state.get("poll-offset")) == {"offset": 103}
    await wait_until(lambda: 103 in fake_tg.offsets, timeout=10)  # Telegram hears the updates were taken
    await gw.stop()

    # Telegram hands out 102 again (its confirmation was lost with the process) and a new one.
    fake_tg.updates = [update(102, message=message(12, "message 2")), update(103, message=message(13, "new"))]
    fake_tg.offsets.clear()
    await gateway_factory({"tg": polling(fake_tg)})

    async def four() -> bool:
        return len(await published(nats_server.url)) == 4

    await wait_until(four, timeout=15)
    assert fake_tg.offsets[0] == 103  # asked from the checkpoint: 102 is not read again
    assert (await published(nats_server.url))[-1].parts[0].text == "new"


async def test_only_one_gateway_process_polls_and_another_takes_over(gateway_factory, fake_tg, nats_server):
    cfg = polling(fake_tg, lease_ttl="3s")
    gw1 = await gateway_factory({"tg": cfg})
    gw2 = await gateway_factory({"tg": cfg})
    await wait_until(lambda: len(fake_tg.offsets) >= 4, timeout=15)
    assert fake_tg.max_polling == 1  # two concurrent getUpdates would be Telegram's 409 Conflict
    holders = [gw for gw in (gw1, gw2) if gw.channels["tg"].channel.task.holding]
    assert len(holders) == 1
    other = gw2 if holders[0] is gw1 else gw1
    await holders[0].stop()
    fake_tg.push(update(200, message=message(20, "after the handover")))

    async def taken_over() -> bool:
        return [m.parts[0].text for m in await published(nats_server.url)] == ["after the handover"]

    await wait_until(taken_over, timeout=15)
    assert other.channels["tg"].channel.task.holding
    assert fake_tg.max_polling == 1


async def test_a_group_message_not_for_the_bot_is_skipped_and_the_offset_moves_on(
        gateway_factory, fake_tg, nats_server):
    fake_tg.push(update(300, message=message(30, "chatter", chat=group_chat())),
                 update(301, message=message(31, "for you")))
    gw = await gateway_factory({"tg": polling(fake_tg)})

    async def one() -> bool:
        return len(await published(nats_server.url)) == 1

    await wait_until(one, timeout=15)
    await wait_until(lambda: 302 in fake_tg.offsets, timeout=10)
    assert json.loads(await gw.channels["tg"].ctx.state.get("poll-offset")) == {"offset": 302}


async def test_kill_9_after_publishing_before_the_checkpoint_publishes_once(tmp_path, fake_tg):
    """The poller dies (kill -9) right after the bus took an update, before its offset was
    stored: the restarted gateway reads that update again and the bus has it once."""
    import asyncio
    import signal

    from gateway.testing import GatewayProcess

    section = (f'[channels.tg]\ntype = "telegram"\ntoken = "{TOKEN}"\nmode = "polling"\npoll_timeout = "1s"\n'
               f'lease_ttl = "3s"\nusername = "{USERNAME}"\napi_base = "{fake_tg.url}"\n')
    fake_tg.push(update(500, message=message(50, "first")), update(501, message=message(51, "second")))
    gp = GatewayProcess(tmp_path, channels=section, env={"GATEWAY_FAILPOINTS": "inbound.after_ack"})
    try:
        await asyncio.to_thread(gp.start)
    except AssertionError:
        pass  # it may die before /healthz first answers: the update came at once
    assert await asyncio.to_thread(gp.wait) == -signal.SIGKILL
    assert fake_tg.offsets == [None]  # it died before asking again: nothing was confirmed
    gp.env.pop("GATEWAY_FAILPOINTS")
    await asyncio.to_thread(gp.start)  # it polls once the dead process's lease expired
    try:
        async def both() -> bool:
            return [m.parts[0].text for m in await published(gp.bus_url)] == ["first", "second"]

        await wait_until(both, timeout=20)
        await wait_until(lambda: 502 in fake_tg.offsets, timeout=10)
        assert fake_tg.offsets[1] is None  # nothing was checkpointed before the kill
    finally:
        gp.signal(signal.SIGTERM)
        await asyncio.to_thread(gp.wait)


async def test_an_update_the_library_cannot_read_is_skipped_not_polled_forever(gateway_factory, fake_tg, nats_server,
                                                                               capfd):
    fake_tg.push(update(600, message=message(60, "before")))
    gw = await gateway_factory({"tg": polling(fake_tg)})

    async def texts() -> list[str]:
        return [m.parts[0].text for m in await published(nats_server.url)]

    async def first() -> bool:
        return await texts() == ["before"]

    await wait_until(first, timeout=15)
    unreadable = message(61, "secret words of Wang Fang")
    unreadable["from"] = "not a user object"
    fake_tg.push(update(601, message=unreadable), update(602, message=message(62, "after")))

    async def after() -> bool:
        return await texts() == ["before", "after"]

    await wait_until(after, timeout=15)
    assert json.loads(await gw.channels["tg"].ctx.state.get("poll-offset")) == {"offset": 603}
    out, err = capfd.readouterr()
    assert "update unreadable by python-telegram-bot; skipped" in out + err
    assert "secret words" not in out + err


async def test_the_librarys_own_log_reaches_no_application_handler(gateway_factory, fake_tg):
    """python-telegram-bot logs a batch it cannot read, raw updates and all, on the standard
    logger ``telegram.Bot``: an application's root handler must not receive it."""
    import logging

    class Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    await gateway_factory({"tg": polling(fake_tg)})
    keep = Keep()
    logging.getLogger().addHandler(keep)
    try:
        logging.getLogger("telegram.Bot").critical("Error while parsing updates! Received data was %r", ["words"])
    finally:
        logging.getLogger().removeHandler(keep)
    assert keep.records == []
