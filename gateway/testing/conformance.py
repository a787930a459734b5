"""The channel conformance suite: the promises every channel keeps, checked against a real
nats-server, the gateway's real listeners and a local fake of the provider's API.

A channel author subclasses :class:`ChannelConformance` in a test module, names the class
``Test...`` so pytest collects it, and fills in the adapter: how to fake the provider, a
minimal config, how the provider sends one inbound message and what it retries::

    from gateway.testing.conformance import ChannelConformance, InboundAnswer

    class TestFaxConformance(ChannelConformance[FakeFaxAPI]):
        channel_type = "fax"

        async def start_provider(self) -> FakeFaxAPI: ...
        async def stop_provider(self, provider: FakeFaxAPI) -> None: ...
        def channel_config(self, provider: FakeFaxAPI) -> dict[str, Any]: ...
        async def send_inbound(self, gw, provider, provider_id, *, attempt) -> InboundAnswer: ...
        def fail_next_delivery(self, gw, provider, *, permanent) -> None: ...
        def delivered(self, gw, provider) -> int: ...

Each ``test_*`` method below is one promise; a channel that cannot keep one yet marks it
in its subclass (override the method, call ``super()``, decorate it with
``pytest.mark.xfail(strict=True, reason=...)`` and, for an async check,
``pytest.mark.asyncio``). The checks carry their own ``asyncio`` mark: they run in
pytest-asyncio's default strict mode, no ``asyncio_mode = "auto"`` needed.

This module imports pytest: it is for test environments only (``pip install
'omnichannel-gateway[test]'``), which is why it is not re-exported by ``gateway.testing``
(the mock channel, loaded in production, lives there too)."""

from __future__ import annotations

import asyncio
import gc
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar, cast

import msgspec
import nats
import pytest

from .. import ConfigError, Gateway, Outbound, Part, PluginManager, Subjects, TextPart
from ..wire import dead_letter_decoder, encode, message_decoder, outbound_headers
from . import NatsServer, make_config, statuses, stream_messages, wait_for_status, wait_until

_F = TypeVar("_F", bound=Callable[..., Any])

try:
    import pytest_asyncio
    _fixture: Any = pytest_asyncio.fixture
except ImportError:  # the fixtures then need asyncio_mode = "auto"
    _fixture = pytest.fixture


_async_test = pytest.mark.asyncio
"""Every async check is marked, so the suite runs in pytest-asyncio's default strict mode:
a plugin's tests need no ``asyncio_mode = "auto"``. (An override of a check in a subclass
replaces the function and its marks: mark it ``@pytest.mark.asyncio`` too.)"""


def _async_fixture(fn: _F) -> _F:
    """An async fixture (pytest-asyncio's decorator where installed), typed as what it wraps."""
    return cast(_F, _fixture(fn))

__all__ = ["ChannelConformance", "InboundAnswer", "UNKNOWN_KEY"]

P = TypeVar("P")

UNKNOWN_KEY = "conformance_unknown_key"
"""The key the suite adds to a channel's config, which the channel must refuse."""


@dataclass(frozen=True)
class InboundAnswer:
    """What the gateway answered the provider, as the provider understands it.

    ``outcome`` is ``"accepted"`` (HTTP 200, SMTP 250: the provider will not send it
    again), ``"try_again"`` (the provider's retry-later answer: HTTP 503, SMTP 451) or
    ``"refused"`` (anything else). ``detail`` is the raw answer, shown when a check fails."""

    outcome: Literal["accepted", "try_again", "refused"]
    detail: str = ""


class ChannelConformance(Generic[P]):
    """Base class of a channel's conformance tests; ``P`` is the type of the provider fake.

    Subclass it as ``Test<Channel>Conformance``, set :attr:`channel_type` and implement the
    adapter methods (those that raise ``NotImplementedError``). Every check starts its own
    gateway on the test's ``nats_server`` with the channel named :attr:`channel_name`."""

    channel_type: ClassVar[str]
    """The ``type = "..."`` of the channel under test."""
    channel_name: ClassVar[str] = "conf"
    """The channel's name in the gateway config (``[channels.<name>]``)."""
    doc: ClassVar[str | None] = None
    """The channel's documentation, relative to pytest's rootdir; by default
    ``docs/channels/<channel_type>.md``."""
    retry_wait: ClassVar[float] = 1.0
    """How long the provider waits before its last retry in the dedup check (seconds)."""
    stop_deadline: ClassVar[float] = 5.0
    """The gateway with this channel must stop within this many seconds."""
    status_timeout: ClassVar[float] = 15.0
    """How long an outbound may take to reach ``sent`` or ``dead``."""

    # --- the adapter ---------------------------------------------------------------

    async def start_provider(self) -> P:
        """Start the fake of the provider's API (a local server speaking its wire format)
        that accepts every outbound until told otherwise; return it. (Or override the
        :meth:`provider` fixture to take the fake from a fixture of your conftest.)"""
        raise NotImplementedError("implement start_provider/stop_provider or override the provider fixture")

    async def stop_provider(self, provider: P) -> None:
        """Stop what :meth:`start_provider` started."""

    def channel_config(self, provider: P) -> dict[str, Any]:
        """A minimal valid ``[channels.<name>]`` section (with ``type``) that receives on
        the gateway's listeners and sends to ``provider``."""
        raise NotImplementedError

    async def send_inbound(self, gw: Gateway, provider: P, provider_id: str, *, attempt: int = 1) -> InboundAnswer:
        """Send one customer message with ``provider_id`` as the provider does: the bytes it
        puts on the wire, to the gateway's real port. ``attempt`` > 1 is the provider's
        retry of the same message, built as the provider builds retries (a new signature or
        a new SMTP session, the same message). Connection errors may propagate."""
        raise NotImplementedError

    def fail_next_delivery(self, gw: Gateway, provider: P, *, permanent: bool) -> None:
        """Make the provider refuse the next outbound send: permanently (an invalid
        recipient) or transiently (busy, rate limited)."""
        raise NotImplementedError

    def delivered(self, gw: Gateway, provider: P) -> int:
        """How many outbound messages the provider has accepted so far."""
        raise NotImplementedError

    def outbound_parts(self) -> list[Part]:
        """The parts of the outbound messages the suite sends (text by default)."""
        return [TextPart(text="conformance reply")]

    # --- fixtures ------------------------------------------------------------------

    @_async_fixture
    async def provider(self) -> AsyncIterator[P]:
        """The running provider fake of one check: :meth:`start_provider`, and
        :meth:`stop_provider` afterwards. Override it (a plain fixture method of your
        subclass with the same name) to reuse a fixture of your conftest instead."""
        fake = await self.start_provider()
        try:
            yield fake
        finally:
            await self.stop_provider(fake)

    @pytest.fixture
    def start(self, gateway_factory: Callable[..., Awaitable[Gateway]], provider: P) -> Callable[[], Awaitable[Gateway]]:
        """``gw = await start()``: a gateway running only the channel under test, with a
        short publish timeout and backoff so outages and retries show quickly."""

        async def go() -> Gateway:
            return await gateway_factory({self.channel_name: self.channel_config(provider)},
                                         bus={"publish_timeout": "1s"},
                                         outbound={"backoff": ["100ms"], "ack_wait": "5s"})

        return go

    # --- helpers -------------------------------------------------------------------

    @property
    def subjects(self) -> Subjects:
        """The bus subjects (default prefix) the checks read and write."""
        return Subjects()

    async def published(self, url: str) -> list[Any]:
        """Every message of the channel's inbound subject, decoded."""
        msgs = await stream_messages(url, self.subjects.stream_in,
                                     self.subjects.inbound(self.channel_type, self.channel_name))
        return [message_decoder.decode(m.data) for m in msgs]

    async def accepted(self, gw: Gateway, provider: P, provider_id: str, attempt: int = 1) -> InboundAnswer:
        """Send and assert the gateway accepted."""
        answer = await self.send_inbound(gw, provider, provider_id, attempt=attempt)
        assert answer.outcome == "accepted", f"attempt {attempt} of {provider_id!r} was not accepted: {answer}"
        return answer

    async def reply_to(self, gw: Gateway, provider: P, url: str, outbound_id: str) -> None:
        """A customer writes; a backend replies to that conversation with ``outbound_id``,
        published as a backend does (the contract's headers, ``gateway.wire.outbound_headers``)."""
        await self.accepted(gw, provider, f"conv-{outbound_id}")
        conversation = (await self.published(url))[-1].conversation
        nc = await nats.connect(url)
        try:
            out = Outbound(id=outbound_id, conversation=conversation, parts=self.outbound_parts())
            await nc.jetstream().publish(self.subjects.outbound(self.channel_type, self.channel_name), encode(out),
                                         headers=outbound_headers(out))
        finally:
            await nc.close()

    def config_with(self, provider: P, path: tuple[str, ...], key: str) -> dict[str, Any]:
        """The minimal config with ``key`` added in the section at ``path``."""
        cfg = msgspec.convert(self.channel_config(provider), dict[str, Any])  # a deep copy
        section = cfg
        for name in path:
            section = section[name]
        section[key] = 1
        return cfg

    # --- the checks ----------------------------------------------------------------

    @_async_test
    async def test_retried_inbound_is_published_once(self, start: Any, provider: P, nats_server: NatsServer) -> None:
        """The provider's retries of one message (at once, and after ``retry_wait``) are
        answered as accepted and published once."""
        gw = await start()
        await self.accepted(gw, provider, "dup-1", 1)
        await self.accepted(gw, provider, "dup-1", 2)
        await asyncio.sleep(self.retry_wait)  # the promise is about a later retry, not a condition
        await self.accepted(gw, provider, "dup-1", 3)
        assert len(await self.published(nats_server.url)) == 1

    @_async_test
    async def test_bus_down_answers_try_again_then_publishes_once_it_is_back(
            self, start: Any, provider: P, nats_server: NatsServer) -> None:
        """Without the bus the channel answers the provider's retry-later (503, SMTP 451),
        never accepted; once the bus is back the provider's retry is published once."""
        gw = await start()
        await nats_server.stop()
        answer = await self.send_inbound(gw, provider, "outage-1", attempt=1)
        assert answer.outcome == "try_again", f"while the bus is down: {answer}"
        await nats_server.start()
        attempts = [1]

        async def retried() -> bool:
            attempts[0] += 1
            return (await self.send_inbound(gw, provider, "outage-1", attempt=attempts[0])).outcome == "accepted"

        await wait_until(retried, timeout=20, interval=0.2)
        await self.accepted(gw, provider, "outage-1", attempts[0] + 1)
        assert len(await self.published(nats_server.url)) == 1

    @_async_test
    async def test_everything_published_decodes_with_channel_type_and_conversation(
            self, start: Any, provider: P, nats_server: NatsServer) -> None:
        """Every message the channel puts on the inbound stream decodes with
        ``message_decoder`` and names the channel, its type and a conversation."""
        gw = await start()
        for i in range(3):
            await self.accepted(gw, provider, f"decode-{i}")
        raw = await stream_messages(nats_server.url, self.subjects.stream_in)
        assert len(raw) == 3
        for m in raw:
            assert m.subject == self.subjects.inbound(self.channel_type, self.channel_name)
            msg = message_decoder.decode(m.data)  # raises on anything that is not a Message
            assert msg.channel == self.channel_name and msg.channel_type == self.channel_type
            assert msg.conversation and msg.id and msg.sender.id
        assert len({message_decoder.decode(m.data).id for m in raw}) == 3

    @_async_test
    async def test_permanent_refusal_is_dead_lettered(self, start: Any, provider: P, nats_server: NatsServer) -> None:
        """An outbound the provider refuses for good gets a ``dead`` status and a dead
        letter on the channel's dead subject (the outbound and the headers the backend
        published it with), and is not sent again."""
        gw = await start()
        self.fail_next_delivery(gw, provider, permanent=True)
        await self.reply_to(gw, provider, nats_server.url, "conf-dead")
        sts = await wait_for_status(nats_server.url, "conf-dead", "dead", self.status_timeout)
        assert [s.state for s in sts] == ["accepted", "dead"], sts
        assert sts[-1].error is not None and sts[-1].error.permanent
        [dl] = await stream_messages(nats_server.url, self.subjects.stream_dead)
        assert dl.subject == self.subjects.dead(self.channel_type, self.channel_name)
        letter = dead_letter_decoder.decode(dl.data)
        assert letter.outbound is not None and letter.outbound.id == "conf-dead"
        assert letter.headers.get("Gw-Schema") == "outbound/1", letter.headers
        assert self.delivered(gw, provider) == 0

    @_async_test
    async def test_transient_failure_is_retried_then_sent(self, start: Any, provider: P, nats_server: NatsServer) -> None:
        """An outbound the provider refuses for now is retried and then ``sent``, once."""
        gw = await start()
        self.fail_next_delivery(gw, provider, permanent=False)
        await self.reply_to(gw, provider, nats_server.url, "conf-retry")
        sts = await wait_for_status(nats_server.url, "conf-retry", "sent", self.status_timeout)
        assert [s.state for s in sts] == ["accepted", "failed", "sent"], sts
        assert sts[1].error is not None and not sts[1].error.permanent
        assert self.delivered(gw, provider) == 1
        assert await stream_messages(nats_server.url, self.subjects.stream_dead) == []

    @_async_test
    async def test_unknown_config_keys_are_refused_naming_the_key(self, provider: P) -> None:
        """A misspelled key, at the top of the section or in any sub-section the minimal
        config has, is a ``ConfigError`` naming its key path."""
        url = "nats://127.0.0.1:4222"  # parsing only: nothing connects
        make_config(url, {self.channel_name: self.channel_config(provider)})  # the minimal config is valid
        paths = [()] + list(_struct_sections(self.config_type(), self.channel_config(provider)))
        for path in paths:
            cfg = self.config_with(provider, path, UNKNOWN_KEY)
            with pytest.raises(ConfigError) as info:
                make_config(url, {self.channel_name: cfg})
            where = ".".join((self.channel_name, *path, UNKNOWN_KEY))
            assert where in str(info.value), f"{where} not named in: {info.value}"

    def test_every_config_key_is_documented(self, request: pytest.FixtureRequest) -> None:
        """Every key of the channel's ``config_type`` (sub-sections too) appears as
        `` `key` `` in the channel's documentation."""
        doc = Path(request.config.rootpath) / (self.doc or f"docs/channels/{self.channel_type}.md")
        assert doc.is_file(), f"the channel's documentation {doc} is missing"
        text = doc.read_text(encoding="utf-8")
        missing = [".".join(path) for path in _keys(self.config_type()) if f"`{path[-1]}`" not in text]
        assert missing == [], f"keys not documented in {doc}: {missing}"

    @_async_test
    async def test_stops_cleanly_within_the_deadline(self, gateway_factory: Any, provider: P,
                                                    nats_server: NatsServer) -> None:
        """After inbound and outbound traffic the gateway stops within ``stop_deadline``,
        leaves no task of its own running and emits no warning (an unclosed socket, a
        coroutine never awaited); afterwards nothing is accepted."""
        before = asyncio.all_tasks()
        gw = await gateway_factory({self.channel_name: self.channel_config(provider)},
                                   outbound={"backoff": ["100ms"]})
        await self.reply_to(gw, provider, nats_server.url, "conf-stop")
        await wait_for_status(nats_server.url, "conf-stop", "sent", self.status_timeout)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            await asyncio.wait_for(gw.stop(), self.stop_deadline)
            gc.collect()
            left: set[asyncio.Task[Any]] = set()

            def settled() -> bool:
                left.clear()
                left.update(t for t in asyncio.all_tasks() - before if t is not asyncio.current_task() and not t.done())
                return not left

            try:
                await wait_until(settled, timeout=0.5, interval=0.02)
            except AssertionError:
                pytest.fail(f"tasks still running after stop: {[t.get_coro() for t in left]}")
            gc.collect()
        assert [str(w.message) for w in caught] == []
        try:
            after = await self.send_inbound(gw, provider, "after-stop", attempt=1)
        except Exception:  # noqa: BLE001 - a refused connection is what we hope for
            return
        assert after.outcome != "accepted", after

    # --- plumbing ------------------------------------------------------------------

    def config_type(self) -> type[Any]:
        """The channel's ``config_type``, as registered by its plugin."""
        info = PluginManager().channel_types.get(self.channel_type)
        assert info is not None, f"no plugin registers channel type {self.channel_type!r}"
        assert info.cls.config_type is not None, f"channel type {self.channel_type!r} has no config_type"
        return info.cls.config_type


def _struct_of(t: Any) -> Any:
    """The StructType inside ``t`` (itself, or one member of a union with None), else None."""
    if isinstance(t, msgspec.inspect.StructType):
        return t
    if isinstance(t, msgspec.inspect.UnionType):
        structs = [m for m in t.types if isinstance(m, msgspec.inspect.StructType)]
        return structs[0] if len(structs) == 1 else None
    return None


def _keys(config_type: type[Any]) -> list[tuple[str, ...]]:
    """Every key path of a config Struct, sub-sections included."""
    out: list[tuple[str, ...]] = []

    def walk(st: Any, prefix: tuple[str, ...]) -> None:
        for f in st.fields:
            out.append((*prefix, f.encode_name))
            sub = _struct_of(f.type)
            if sub is not None and sub.cls is not st.cls:
                walk(sub, (*prefix, f.encode_name))

    walk(msgspec.inspect.type_info(config_type), ())
    return out


def _struct_sections(config_type: type[Any], cfg: dict[str, Any]) -> list[tuple[str, ...]]:
    """Paths of the sub-sections (Struct fields) present as tables in ``cfg``."""
    out: list[tuple[str, ...]] = []

    def walk(st: Any, section: dict[str, Any], prefix: tuple[str, ...]) -> None:
        for f in st.fields:
            sub = _struct_of(f.type)
            if sub is not None and isinstance(section.get(f.encode_name), dict):
                out.append((*prefix, f.encode_name))
                walk(sub, section[f.encode_name], (*prefix, f.encode_name))

    walk(msgspec.inspect.type_info(config_type), cfg, ())
    return out
