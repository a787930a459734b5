"""The gateway process: embedded bus, HTTP server, channels and outbound delivery, started
and stopped in the right order."""

from __future__ import annotations

import asyncio
import gc
import signal
from datetime import datetime, timezone
from typing import Any

from .bus.connection import Bus
from .channel.api import Channel, Conversation
from .config import ChannelConfig, Config, load_config
from .bus.embedded import EmbeddedServer
from .errors import ConfigError, PluginError
from .http.server import HttpServer
from .logs import get_logger
from .metrics import Metrics
from .delivery.dispatcher import Dispatcher
from .context import Context
from .inbound.pipeline import Inbound
from .registry import PluginManager
from .scheduling.calendar import Calendar, calendar_from_config
from .scheduling.desk import ServiceDesk
from .scheduling.scheduler import Reminders
from .inbound.restore import DedupRestore
from .schema import Message, ObjectRef
from .bus.services import BusServices
from .scheduling.survey import Surveys


class _Running:
    def __init__(self, cfg: ChannelConfig, ctx: Context, channel: Channel | None) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.channel = channel


class Gateway:
    """One gateway process. ``await gw.start()`` … ``await gw.stop()``, or ``await gw.run()``
    to serve until SIGTERM/SIGINT (SIGHUP reloads ``config_path``)."""

    def __init__(self, config: Config, plugins: PluginManager | None = None, *, config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.plugins = plugins or PluginManager()
        self.log = get_logger()
        self.metrics = Metrics()
        self.embedded: EmbeddedServer | None = None
        bus_url = config.bus.url
        if not bus_url:
            self.embedded = EmbeddedServer(host=config.bus.embedded_host, port=config.bus.embedded_port,
                                           store_dir=config.bus.data_dir, max_payload=max(config.bus.max_message_size, 1048576))
            bus_url = self.embedded.url
        self.bus = Bus(config.bus, bus_url, log=self.log.bind(component="bus"), receipt_ttl=config.outbound.receipt_ttl,
                       schedules=config.reminders.enabled or any(c.service is not None for c in config.channels.values()))
        self.services = BusServices(self.bus)
        self.surveys = Surveys(self.bus, log=self.log)
        # Reminders read the channels' sections and the running channels (reach) through
        # getters: a reload replaces both.
        self.reminders = Reminders(self.services, config.reminders, channel_configs=lambda: self.config.channels,
                                   channel=self._channel, log=self.log) if config.reminders.enabled else None
        self.inbound = Inbound(self.services, enrich=self.enrich, metrics=self.metrics, log=self.log.bind(component="inbound"),
                               surveys=self.surveys,
                               on_customer_wrote=self.reminders.customer_wrote if self.reminders is not None else None)
        self.restore = DedupRestore(self.bus, log=self.log)
        self.calendars: dict[str, Calendar] = self._build_calendars(config)
        # The desk reads its section, the channels' sections and the calendars through
        # getters: a reload replaces them.
        self.desk = ServiceDesk(self.services, lambda: self.config.settings.service,
                                channel_configs=lambda: self.config.channels, calendars=lambda: self.calendars,
                                channel=self._channel, log=self.log) if config.settings.service.enabled else None
        self.http = HttpServer(config.http, metrics=self.metrics, log=self.log, health=self.health)
        self.channels: dict[str, _Running] = {}
        self.outbound: Dispatcher | None = None
        self._stopping = False
        self._started = False
        self._reload_lock = asyncio.Lock()

    # --- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Start the bus connection (retrying in the background if the server is down), the
        HTTP server and every enabled channel. A required channel that fails to start
        fails the whole start; an optional one is logged and skipped."""
        # Ports and the store first, before anything is started or logged: one taken by
        # another process is one clear StartupError, with nothing to undo.
        if self.config.http.enabled:
            self.http.bind()
        if self.embedded is not None:
            try:
                await self.embedded.start()
            except BaseException:
                self.http.unbind()
                raise
            self.log.info("embedded nats-server started", url=self.embedded.url, store=str(self.embedded.store_dir))
            self.embedded.supervise(self.log.bind(component="bus"))
        self._started = True
        if self.config.outbound.enabled:
            # The dispatcher reads the channels' sections through the getter: a reload
            # replaces them. Its own section is handed over by reload() (configure()).
            self.outbound = Dispatcher(self.services, self.config.outbound, channel_configs=lambda: self.config.channels,
                                       channel=self._deliverable, metrics=self.metrics, log=self.log,
                                       on_survey_sent=self.surveys.sent)
            self.bus.on_ready.append(self.outbound.start)
        if self.reminders is not None:
            self.bus.on_ready.append(self.reminders.start)
        if self.desk is not None:
            self.bus.on_ready.append(self.desk.start)
        for warning in self.config.warnings:
            self.log.warning("configuration warning", problem=warning)
        # Dedup records a crashed process (this one before a restart, or a peer) left
        # unwritten are restored in the background once the bus is up: JetStream's
        # duplicate window covers the retries meanwhile (inbound/restore.py), so the
        # webhooks do not wait for it.
        self.bus.on_ready.append(self.restore.start)
        self.bus.start()
        try:
            await self.bus.wait_ready(self.config.bus.connect_timeout)
        except asyncio.TimeoutError:
            self.log.warning("starting without the bus: webhooks answer 503 until it is reachable", error=self.bus.error)
        if self.config.http.enabled:
            await self.http.start()
            self.log.info("http listening", url=f"http://{self.config.http.host}:{self.http.port}")
        try:
            for cfg in self.config.channels.values():
                if cfg.enabled:
                    await self._start_channel(cfg)
        except BaseException:
            await self.stop()
            raise
        self.metrics.bus_connected.set_function(lambda: 1 if self.bus.connected else 0)

    async def _start_channel(self, cfg: ChannelConfig) -> None:
        info = self.plugins.channel_types[cfg.type]
        log = get_logger(channel=cfg.name, channel_type=cfg.type)
        ctx = Context(cfg.name, cfg.type, cfg.options, log, services=self.services, inbound=self.inbound,
                      http=self.http, metrics=self.metrics,
                      quiet_hours=cfg.quiet_hours)
        running = _Running(cfg, ctx, None)
        self.channels[cfg.name] = running
        try:
            channel = info.cls(ctx)
            await channel.start()
        except Exception as exc:
            ctx.set_state("failed", f"{type(exc).__name__}: {exc}")
            self.http.remove_channel(cfg.name)
            msg = f"channel {cfg.name!r} (type {cfg.type!r}, plugin {info.plugin!r}) failed to start: {type(exc).__name__}: {exc}"
            if cfg.required:
                raise PluginError(msg + " (set required = false to run without it)") from exc
            log.error("channel failed to start; running without it (required = false)", error=f"{type(exc).__name__}: {exc}")
            return
        running.channel = channel
        if ctx.health == "starting":
            ctx.set_state("running")
        log.info("channel started")

    async def _stop_channel(self, name: str) -> None:
        running = self.channels.pop(name, None)
        if running is None:
            return
        self.http.remove_channel(name)
        if running.channel is not None:
            try:
                await asyncio.wait_for(running.channel.stop(), 30)
            except Exception as exc:
                running.ctx.log.error("channel failed to stop cleanly", error=f"{type(exc).__name__}: {exc}")
        running.ctx.set_state("stopped")

    async def stop(self) -> None:
        """Drain: stop taking webhooks (requests in flight finish and reach the bus), stop
        channels, finish deliveries in flight, close the bus, stop the embedded server."""
        if self._stopping or not self._started:  # not started: a start-up check failed, nothing to undo
            return
        self._stopping = True
        self.log.info("stopping")
        try:
            await self.http.stop()
            for name in list(self.channels):
                await self._stop_channel(name)
            if self.outbound is not None:
                await self.outbound.stop()
            if self.reminders is not None:
                await self.reminders.stop()
            if self.desk is not None:
                await self.desk.stop()
            # Every inbound publish has finished and its dedup record is stored: the stop
            # is clean, the marker goes.
            await self.inbound.drain()
            await self.restore.stop()
            await self.bus.close()
        finally:
            # Whatever failed above (a bus lost for good, a stuck channel), the embedded
            # server must not outlive us holding its port and store.
            if self.embedded is not None:
                await self.embedded.stop()
        self.log.info("stopped")

    async def reload(self, config: Config | None = None) -> bool:
        """Apply a new configuration: channels added, removed or changed are started,
        stopped or restarted. An invalid file is refused and the old config keeps running.
        Bus and HTTP settings need a restart. Returns True if applied."""
        async with self._reload_lock:
            if config is None:
                try:
                    config = load_config(self.config_path, self.plugins.channel_types)
                except ConfigError as exc:
                    self.log.error("reload refused: invalid configuration, keeping the running one",
                                   problems=exc.problems)
                    return False
            if config.settings.bus != self.config.settings.bus or config.settings.http != self.config.settings.http:
                self.log.warning("bus/http settings changed: they take effect at the next restart")
            old = self.config.channels
            new = {n: c for n, c in config.channels.items() if c.enabled}
            for name in list(self.channels):
                if name not in new or new[name] != old.get(name):
                    await self._stop_channel(name)
            self.calendars = self._build_calendars(config)
            self.config.settings.calendars = config.settings.calendars
            self.config.settings.service = config.settings.service
            self.config.channels = config.channels
            later: list[str] = []
            if self.outbound is not None:
                # The dispatcher keeps its own copy: hand it the new section, and say what
                # it could not apply.
                later = self.outbound.configure(config.settings.outbound)
            elif config.settings.outbound.enabled:
                later = ["outbound.enabled"]
            self.config.settings.outbound = config.settings.outbound
            if later:
                self.log.warning("outbound settings changed that take effect at the next restart", keys=later)
            for name, cfg in new.items():
                if name not in self.channels:
                    await self._start_channel(cfg)
            self.log.info("configuration reloaded", channels=sorted(new),
                          applied="channels, outbound.backoff, outbound.max_attempts, outbound.concurrency")
            return True

    async def run(self) -> None:
        """Start, then serve until SIGTERM or SIGINT; SIGHUP reloads the config file."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        try:
            await self.start()
            # Everything allocated at start-up lives until the end: keep it out of the
            # collector's full passes (30-40 ms each here, the p99 tail under load).
            gc.freeze()
            await stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self.stop()

    # --- what the parts are handed ----------------------------------------------------

    def enrich(self, message: Message) -> Message:
        """``message`` after every ``enrich_message`` hook (a failing hook is logged and
        skipped)."""
        for impl in self.plugins.hook.enrich_message.get_hookimpls():
            try:
                out = impl.function(message=message, channel=message.channel)
            except Exception as exc:
                self.log.error("enrich_message hook failed; message published unchanged",
                               plugin=self.plugins.pm.get_name(impl.plugin), error=f"{type(exc).__name__}: {exc}")
                continue
            if isinstance(out, Message):
                message = out
        return message

    @staticmethod
    def _build_calendars(config: Config) -> dict[str, Calendar]:
        return {name: calendar_from_config(name, c) for name, c in config.settings.calendars.items()}

    def _channel(self, name: str) -> Channel | None:
        """The started channel ``name`` (whatever its health), for questions answered from
        stored state such as :meth:`Channel.reach`."""
        running = self.channels.get(name)
        return running.channel if running is not None else None

    def _deliverable(self, name: str) -> Channel | None:
        """The channel ``name`` if it may deliver now (started, running or degraded)."""
        running = self.channels.get(name)
        if running is None or running.channel is None or running.ctx.health not in ("running", "degraded"):
            return None
        return running.channel

    async def put_blob(self, data: bytes, *, content_type: str | None = None) -> ObjectRef:
        """Store bytes in the object store (see :meth:`BusServices.put_blob`)."""
        return await self.services.put_blob(data, content_type=content_type)

    async def get_blob(self, ref: ObjectRef) -> bytes:
        """The bytes of a stored blob (see :meth:`BusServices.get_blob`)."""
        return await self.services.get_blob(ref)

    async def get_conversation(self, key: str) -> Conversation | None:
        """The stored conversation ``key``, or None."""
        return await self.services.get_conversation(key)

    def health(self) -> dict[str, Any]:
        """What ``/healthz`` answers: ``ok`` while the bus is connected and every required
        channel runs."""
        channels = {
            name: {"type": r.cfg.type, "state": r.ctx.health, **({"detail": r.ctx.health_detail} if r.ctx.health_detail else {})}
            for name, r in self.channels.items()
        }
        # "degraded" still serves (for example IMAP polling while IDLE is down).
        bad = [n for n, r in self.channels.items() if r.ctx.health not in ("running", "degraded") and r.cfg.required]
        ok = self.bus.connected and not bad
        return {
            "status": "ok" if ok else "unavailable",
            "bus": {"connected": self.bus.connected, **({"error": self.bus.error} if self.bus.error else {})},
            "channels": channels,
            "time": datetime.now(timezone.utc).isoformat(),
        }

