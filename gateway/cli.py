"""The ``gateway`` command.

Exit codes: 0 success; 1 runtime failure; 2 usage or configuration error; 3 the bus is
unreachable; 4 a plugin failed to load or start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


from .core.config import DEFAULT_CONFIG, Config, find_config, load_config
from .core.errors import BusUnavailable, ConfigError, PluginError, StartupError
from .core.logs import add_secrets, configure_logging, get_logger, mask_secrets, url_secrets

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_BUS, EXIT_PLUGIN = 0, 1, 2, 3, 4


def _config_path(arg: str | None) -> str | None:
    return find_config(arg)


def _load(args: argparse.Namespace) -> tuple[Config, Any]:
    from .core.registry import PluginManager

    pm = PluginManager()
    config = load_config(_config_path(args.config), pm.channel_types)
    _register_secrets(config)
    return config, pm


def _load_bus(args: argparse.Namespace) -> Config:
    """The configuration of a command that only talks to the bus: no plugin is loaded and
    the channel sections are not checked, so a channel's unset ``${SECRET}`` (or a broken
    plugin) does not stop ``gateway send`` or ``gateway dlq list``."""
    config = load_config(_config_path(args.config), {}, bus_only=True)
    _register_secrets(config)
    return config


def _register_secrets(config: Config) -> None:
    """From here on the bus credentials are masked in everything this process prints,
    whichever way they were given (URL, [bus] keys, ${ENV}, GATEWAY_BUS_URL)."""
    add_secrets(config.bus.password, config.bus.token, *url_secrets(config.bus.url))


class _MaskedStream:
    """Wraps stdout or stderr: every command's output, error and log line passes
    :func:`mask_secrets` on its way out, so no code path can print a credential."""

    def __init__(self, stream: Any):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(mask_secrets(text))
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _bus_url(config: Config) -> str:
    return config.bus.url or f"nats://{config.bus.embedded_host}:{config.bus.embedded_port}"


def _bus_shown(config: Config) -> str:
    """The bus URL as the command may print it: a URL that came from the environment
    (``${VAR}``, ``GATEWAY_BUS_URL``) is never printed, only where it came from."""
    if config.bus.url and ("bus", "url") in config.from_env:
        return "the bus URL from the environment"
    return "the bus at " + mask_secrets(_bus_url(config))


def _reason(exc: BaseException) -> str:
    """What went wrong, in the server's or the system's words (not an exception class)."""
    import nats.errors

    if isinstance(exc, (TimeoutError, nats.errors.TimeoutError)):
        return "no answer within 3s"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    text = str(exc).strip()
    text = text[len("nats:"):].strip() if text.startswith("nats:") else text
    return text.strip("'\"") or type(exc).__name__


async def _connect(config: Config, closed_cb: Any = None) -> Any:
    """One connection to the bus, no automatic reconnect (a command fails fast, exit 3);
    ``closed_cb`` is awaited when it is lost."""
    import nats
    import nats.errors

    url = _bus_url(config)
    errors: list[Exception] = []

    async def remember(exc: Exception) -> None:  # reported once, below, with the server's reason
        errors.append(exc)

    opts: dict[str, Any] = {"servers": url.split(","), "connect_timeout": 3, "allow_reconnect": False,
                            "max_reconnect_attempts": 1, "error_cb": remember}
    if config.bus.user:
        opts.update(user=config.bus.user, password=config.bus.password)
    if config.bus.token:
        opts["token"] = config.bus.token
    if config.bus.creds_file:
        opts["user_credentials"] = config.bus.creds_file
    if closed_cb is not None:
        opts["closed_cb"] = closed_cb
    try:
        return await nats.connect(**opts)
    except Exception as exc:
        # "no servers available" says nothing; the error callback got the real cause.
        cause = errors[-1] if errors and isinstance(exc, nats.errors.NoServersError) else exc
        reason = _reason(cause)
        if "authori" in reason.lower() or "authenti" in reason.lower():
            hint = " (the server refused the credentials: check [bus] user, password, token or creds_file)"
        elif not config.bus.url:
            hint = " (is `gateway run` running with the embedded bus?)"
        else:
            hint = ""
        raise BusUnavailable(f"cannot reach {_bus_shown(config)}: {reason}{hint}") from exc


# --- commands -----------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from .core.process import Gateway

    # The options are the environment overrides, set for this process: a reload (SIGHUP)
    # re-reads the file and keeps them, instead of seeing the file's ports as a change.
    if args.port is not None:
        os.environ["GATEWAY_HTTP_PORT"] = str(args.port)
    if args.bus_port is not None:
        os.environ["GATEWAY_BUS_PORT"] = str(args.bus_port)
    config, pm = _load(args)
    configure_logging(args.log_format or config.log.format, args.log_level or config.log.level)
    path = _config_path(args.config)
    if not any(c.enabled for c in config.channels.values()):
        # Otherwise a gateway without its file starts quietly and /healthz says "ok".
        where = (f"in {path}" if path else
                 f"no configuration file: no -c FILE, $GATEWAY_CONFIG is not set and there is no {Path.cwd() / DEFAULT_CONFIG}")
        get_logger().warning(f"no channels configured ({where}); see gateway.example.toml")
    gw = Gateway(config, pm, config_path=path)
    _run_loop(gw.run())
    return EXIT_OK


def _run_loop(coro: Any) -> None:
    """Run on uvloop where it is installed (it roughly halves the event loop's share of
    every message's CPU); ``GATEWAY_EVENT_LOOP=asyncio`` forces the standard loop."""
    if os.environ.get("GATEWAY_EVENT_LOOP", "uvloop") == "uvloop":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(coro)
            return
    asyncio.run(coro)


def cmd_check_config(args: argparse.Namespace) -> int:
    from .core.registry import PluginManager

    path = args.file or _config_path(args.config)
    if path is None:
        print(f"no configuration file given and no ./{DEFAULT_CONFIG}", file=sys.stderr)
        return EXIT_USAGE
    types = PluginManager().channel_types
    config = load_config(path, types)
    _register_secrets(config)
    names = ", ".join(f"{n} ({c.type})" for n, c in config.channels.items()) or "none"
    bus = ("from the environment" if ("bus", "url") in config.from_env else mask_secrets(config.bus.url)) \
        if config.bus.url else "embedded"
    print(f"{path}: OK; channels: {names}; bus: {bus}")
    for name, channel in config.channels.items():  # valid, but working against another setting
        for warning in types[channel.type].cls.config_warnings(channel.options, config):
            print(f"{path}: warning: channels.{name}: {warning}")
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return EXIT_OK


def cmd_plugins(args: argparse.Namespace) -> int:
    from .core.registry import PluginManager

    pm = PluginManager()
    rows = [{"type": i.type, "plugin": i.plugin, "package": i.package, "version": i.version,
             "class": f"{i.cls.__module__}.{i.cls.__qualname__}", "source": i.source} for i in pm.channel_types.values()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("no channel types loaded")
        return EXIT_OK
    width = max(len(r["type"]) for r in rows)
    for r in rows:
        print(f"{r['type']:<{width}}  {r['package']} {r['version']}  {r['class']}  ({r['source']})")
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from .core.schema import json_schemas

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, schema in json_schemas().items():
        (out / f"{name}.json").write_text(json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        print(out / f"{name}.json")
    return EXIT_OK


def cmd_send(args: argparse.Namespace) -> int:
    from .core.bus.connection import Subjects
    from .core.bus.contract import outbound_headers
    from .core.schema import Outbound, TextPart, encode

    config = _load_bus(args)
    ctype = args.type
    if ctype is None:
        ch = config.channels.get(args.channel)
        if ch is None:
            print(f"channel {args.channel!r} is not in the configuration; give --type", file=sys.stderr)
            return EXIT_USAGE
        ctype = ch.type
    outbound = Outbound(id=args.id or uuid.uuid4().hex, conversation=args.conversation, parts=[TextPart(text=args.text)],
                        subject=args.subject, created_at=datetime.now(timezone.utc))
    subject = Subjects(config.bus.prefix).outbound(ctype, args.channel)

    async def go() -> None:
        nc = await _connect(config)
        try:
            ack = await nc.jetstream().publish(subject, encode(outbound), headers=outbound_headers(outbound))
        finally:
            await nc.close()
        print(f"published outbound {outbound.id} on {subject} (stream {ack.stream} seq {ack.seq}"
              f"{', duplicate' if ack.duplicate else ''})")

    asyncio.run(go())
    return EXIT_OK


def _describe(subject: str, data: bytes) -> str:
    try:
        obj = json.loads(data)
    except ValueError:
        return f"<{len(data)} bytes, not JSON>"
    if not isinstance(obj, dict):
        return json.dumps(obj)[:200]
    if ".in." in subject and "sender" in obj:
        texts = [p.get("text") or p.get("type") for p in obj.get("parts", []) if isinstance(p, dict)]
        return (f"message {obj.get('id')} conv={obj.get('conversation')} from={obj.get('sender', {}).get('id')}: "
                + " | ".join(repr(t)[:120] for t in texts))
    if ".out." in subject:
        texts = [p.get("text") or p.get("type") for p in obj.get("parts", []) if isinstance(p, dict)]
        return f"outbound {obj.get('id')} conv={obj.get('conversation')}: " + " | ".join(repr(t)[:120] for t in texts)
    if ".status." in subject:
        err = (obj.get("error") or {}).get("message")
        return (f"status {obj.get('state')} outbound={obj.get('outbound_id')} attempt={obj.get('attempt')}"
                + (f" provider_id={obj['provider_id']}" if obj.get("provider_id") else "") + (f" error={err!r}" if err else ""))
    if ".dead." in subject:
        return f"dead {obj.get('id')} attempts={obj.get('attempts')} reason={obj.get('reason')!r}"
    return json.dumps(obj, ensure_ascii=False)[:300]


def cmd_tail(args: argparse.Namespace) -> int:
    config = _load_bus(args)
    subject = args.subject or f"{config.bus.prefix}.>"

    async def go() -> None:
        lost = asyncio.Event()

        async def on_closed() -> None:
            lost.set()

        nc = await _connect(config, on_closed)
        seen = 0
        done = asyncio.Event()

        async def on_msg(msg: Any) -> None:
            nonlocal seen
            if msg.subject.startswith("$JS.") or msg.subject.startswith("_INBOX."):
                return
            ts = datetime.now().strftime("%H:%M:%S.%f")[:-3]
            line = msg.data.decode("utf-8", "replace") if args.raw else _describe(msg.subject, msg.data)
            print(f"{ts} {msg.subject}  {line}", flush=True)
            seen += 1
            if args.count and seen >= args.count:
                done.set()

        where = _bus_shown(config).removeprefix("the bus at ")
        await nc.subscribe(subject, cb=on_msg)
        print(f"tailing {subject} on {where} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        try:
            while True:
                finished = asyncio.create_task(done.wait())
                gone = asyncio.create_task(lost.wait())
                await asyncio.wait({finished, gone}, return_when=asyncio.FIRST_COMPLETED)
                finished.cancel()
                gone.cancel()
                if done.is_set():
                    return
                # The gateway (and its embedded bus) restarted, or the server went away:
                # say so, then keep trying, as someone watching the bus expects.
                print("tail: lost the connection to the bus; reconnecting (Ctrl-C to stop)", file=sys.stderr, flush=True)
                lost.clear()
                while True:
                    try:
                        nc = await _connect(config, on_closed)
                        break
                    except BusUnavailable:
                        await asyncio.sleep(1)
                await nc.subscribe(subject, cb=on_msg)
                print(f"tail: reconnected to {where}; messages published meanwhile are not shown",
                      file=sys.stderr, flush=True)
        finally:
            await nc.close()

    try:
        asyncio.run(go())
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def cmd_dlq(args: argparse.Namespace) -> int:
    from . import _cli_dlq

    config = _load_bus(args)

    async def go() -> int:
        nc = await _connect(config)
        try:
            return await _cli_dlq.run(nc, config, args)
        finally:
            await nc.close()

    return asyncio.run(go())


def cmd_reminders(args: argparse.Namespace) -> int:
    from . import _cli_reminders

    config = _load_bus(args)

    async def go() -> int:
        nc = await _connect(config)
        try:
            return await _cli_reminders.run(nc, config, args)
        finally:
            await nc.close()

    return asyncio.run(go())


def cmd_new_plugin(args: argparse.Namespace) -> int:
    from . import __version__, _cli_scaffold
    from .core.registry import PluginManager

    taken = {t: f"{i.package} {i.version}" for t, i in PluginManager().channel_types.items()}
    return _cli_scaffold.run(args.name, "poller" if args.poller else "webhook", args.dir, __version__, taken)


def cmd_report(args: argparse.Namespace) -> int:
    from .core.scheduling import report as rep
    from .core.scheduling.calendar import calendar_from_config

    config, _ = _load(args)
    now = datetime.now(timezone.utc)
    try:
        since = rep.parse_when(args.since, now)
        until = rep.parse_when(args.until, now) if args.until else now
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if until <= since:
        print(f"error: --until ({until.isoformat()}) must be after --since ({since.isoformat()})", file=sys.stderr)
        return EXIT_USAGE
    try:
        ZoneInfo(args.tz)
    except (ZoneInfoNotFoundError, ValueError):
        print(f"error: --tz must be an IANA time zone such as Asia/Shanghai, got {args.tz!r}", file=sys.stderr)
        return EXIT_USAGE
    calendars = {name: calendar_from_config(c.service.calendar, config.settings.calendars[c.service.calendar])
                 for name, c in config.channels.items() if c.service is not None}

    async def go() -> int:
        nc = await _connect(config)
        try:
            records = await rep.load(nc.jetstream(), config.bus.prefix, since)
        finally:
            await nc.close()
        report = rep.compute(records, since=since, until=until, by=args.by, tz=args.tz, calendars=calendars)
        text = rep.RENDERERS[args.format](report)
        if args.out:
            Path(args.out).write_text(text, encoding="utf-8")
            print(f"wrote {args.out}")
        else:
            sys.stdout.write(text)
        return EXIT_OK

    return asyncio.run(go())


# --- parser -------------------------------------------------------------------------


def _port(text: str) -> int:
    if text.isascii() and text.isdigit() and int(text) <= 65535:
        return int(text)
    raise argparse.ArgumentTypeError("expected a port number from 0 to 65535")


def build_parser() -> argparse.ArgumentParser:
    def common(parser: argparse.ArgumentParser, default: Any = None) -> argparse.ArgumentParser:
        parser.add_argument("-c", "--config", default=default,
                            help=f"TOML configuration (default: $GATEWAY_CONFIG or ./{DEFAULT_CONFIG} if present)")
        parser.add_argument("--log-format", choices=["console", "json"], default=default, help="override [log] format")
        parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=default,
                            help="override [log] level")
        return parser

    # The same options after the subcommand (`gateway run -c FILE`); SUPPRESS keeps a
    # value given before it when they are not repeated.
    shared = common(argparse.ArgumentParser(add_help=False), argparse.SUPPRESS)
    p = common(argparse.ArgumentParser(
        prog="gateway", description="Omnichannel message gateway on a NATS JetStream bus.",
        epilog="Exit codes: 0 ok, 1 failure, 2 usage/config error, 3 bus unreachable, 4 plugin error."))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("run", parents=[shared], help="run the gateway (embedded nats-server when no [bus] url)",
                       description="Run the gateway until SIGTERM/SIGINT; SIGHUP reloads the configuration.")
    s.add_argument("--port", type=_port, metavar="N",
                   help="HTTP port, instead of [http] port (same as GATEWAY_HTTP_PORT=N)")
    s.add_argument("--bus-port", type=_port, metavar="N",
                   help="embedded nats-server port, instead of [bus] embedded_port (same as GATEWAY_BUS_PORT=N; "
                        "set that variable for the other commands to find it)")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("check-config", parents=[shared], help="validate a configuration file and print every problem",
                       description="Validate FILE; print each problem as file:line: key.path: what is wrong.")
    s.add_argument("file", nargs="?", help="the TOML file (default: -c, $GATEWAY_CONFIG or ./gateway.toml)")
    s.set_defaults(func=cmd_check_config)

    s = sub.add_parser("plugins", parents=[shared], help="list loaded channel types and where they come from")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_plugins)

    s = sub.add_parser("schema", parents=[shared], help="write the JSON Schema of every bus type")
    s.add_argument("--out", default="schemas", help="output folder (default: ./schemas)")
    s.set_defaults(func=cmd_schema)

    s = sub.add_parser("send", parents=[shared], help="publish a test outbound (a text reply) on the bus")
    s.add_argument("--channel", required=True, help="channel instance name")
    s.add_argument("--type", help="channel type (default: from the configuration)")
    s.add_argument("--conversation", required=True, help="conversation key (from an inbound message)")
    s.add_argument("--text", required=True)
    s.add_argument("--subject", help="subject line (email)")
    s.add_argument("--id", help="outbound id (default: random); the same id twice is delivered once")
    s.set_defaults(func=cmd_send)

    s = sub.add_parser("tail", parents=[shared], help="print bus traffic in readable form")
    s.add_argument("subject", nargs="?", help="subject filter (default: <prefix>.>)")
    s.add_argument("--raw", action="store_true", help="print the JSON bodies as they are")
    s.add_argument("-n", "--count", type=int, default=0, help="exit after N messages")
    s.set_defaults(func=cmd_tail)

    s = sub.add_parser("dlq", parents=[shared], help="list, replay or purge dead letters")
    dsub = s.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    d = dsub.add_parser("list", parents=[shared], help="list dead letters (no bodies unless --show-body)")
    d.add_argument("--channel")
    d.add_argument("--show-body", action="store_true")
    d.add_argument("--json", action="store_true")
    d = dsub.add_parser("replay", parents=[shared], help="republish dead letters for delivery")
    d.add_argument("id", nargs="?", help="dead letter (outbound) id")
    d.add_argument("--all", action="store_true")
    d.add_argument("--channel")
    d = dsub.add_parser("purge", parents=[shared], help="delete dead letters")
    d.add_argument("--channel")
    d.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    s.set_defaults(func=cmd_dlq)

    s = sub.add_parser("new-plugin", parents=[shared], help="write a channel plugin package to start from",
                       description="Write a channel plugin package: pyproject.toml with its entry point, the "
                                   "channel and its config, a fake of the provider, the conformance tests, a README. "
                                   "It installs, type-checks (mypy --strict) and passes its tests as generated.")
    s.add_argument("name", help="the channel type (lower-case letters, digits, '_'); the package is gateway_<name>")
    flavour = s.add_mutually_exclusive_group()
    flavour.add_argument("--webhook", action="store_true", help="the provider posts to a signed webhook (default)")
    flavour.add_argument("--poller", action="store_true", help="the gateway polls the provider for new messages")
    s.add_argument("--dir", help="the package folder to write, absent or empty (default: ./gateway-<name>)")
    s.set_defaults(func=cmd_new_plugin)

    s = sub.add_parser("reminders", parents=[shared], help="list, show, cancel or move pending reminders")
    rsub = s.add_subparsers(dest="reminders_command", required=True, metavar="ACTION")
    r = rsub.add_parser("list", parents=[shared], help="pending reminders, soonest first")
    r.add_argument("--channel")
    r.add_argument("--conversation", help="one conversation key")
    r.add_argument("--surveys", action="store_true",
                   help="surveys sent and awaiting an answer instead (unanswered ones are being reported)")
    r.add_argument("--json", action="store_true")
    conv_help = "the reminder's conversation key (needed when the id is pending in several conversations)"
    r = rsub.add_parser("show", parents=[shared], help="one pending reminder as JSON, or what became of it")
    r.add_argument("id")
    r.add_argument("--conversation", help=conv_help)
    r = rsub.add_parser("cancel", parents=[shared], help="cancel a pending reminder (status cancelled)")
    r.add_argument("id")
    r.add_argument("--conversation", help=conv_help)
    r.add_argument("--reason", default="operator", help="recorded in the cancelled status (default: operator)")
    r = rsub.add_parser("move", parents=[shared], help="move a pending reminder (status rescheduled)")
    r.add_argument("id")
    when = r.add_mutually_exclusive_group(required=True)
    when.add_argument("--to", help="RFC 3339 time with offset, or a delay from now (90s, 2h, 3d); "
                                   "not in the past, not after the reminder's deadline")
    when.add_argument("--now", action="store_true", help="send it now (after the quiet-hours and reach checks)")
    r.add_argument("--conversation", help=conv_help)
    r.add_argument("--reason", default="operator", help="recorded in the rescheduled status (default: operator)")
    s.set_defaults(func=cmd_reminders)

    s = sub.add_parser("report", parents=[shared], help="contact statistics of a period (docs/service-hours.md)")
    s.add_argument("--since", default="7d", help="7d, 12h, a date (2026-12-01) or an RFC 3339 time (default: 7d)")
    s.add_argument("--until", help="the same forms (default: now)")
    s.add_argument("--by", choices=["channel", "day", "week", "month"], default="channel")
    s.add_argument("--format", choices=["table", "json", "csv", "html"], default="table")
    s.add_argument("--tz", default="UTC", help="time zone of days, weeks and months (default: UTC)")
    s.add_argument("--out", help="write to this file instead of standard output")
    s.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _MaskedStream(out), _MaskedStream(err)
    try:
        return _main(argv)
    finally:
        sys.stdout, sys.stderr = out, err


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "run":
        configure_logging(args.log_format or "console", args.log_level or "warning")
    try:
        return args.func(args)
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{len(exc.problems)} problem{'s' if len(exc.problems) != 1 else ''} in the configuration", file=sys.stderr)
        return EXIT_USAGE
    except BusUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BUS
    except PluginError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_PLUGIN
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
