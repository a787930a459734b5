"""A runnable helpdesk backend: answers every inbound customer message with an
acknowledgement that tells the customer when to expect a reply.

    python examples/echo_backend.py [nats://host:4222] [-c gateway.toml] [--within "2 working days"]

Without a URL it uses the bus of the gateway's configuration (``-c FILE``, else
``$GATEWAY_CONFIG``, else ``./gateway.toml``), as ``gateway tail`` does.

Machine-generated mail (auto-replies, bounces, lists) is never answered (RFC 3834)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from gateway.client import Client


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url", nargs="?", help="the bus (default: from the gateway's configuration)")
    p.add_argument("-c", "--config", help="the gateway's configuration file (default: $GATEWAY_CONFIG or ./gateway.toml)")
    p.add_argument("--prefix", help="subject prefix, with a URL (default: gw)")
    p.add_argument("--durable", default="echo-backend")
    p.add_argument("--within", default="2 working days")
    p.add_argument("--count", type=int, default=0, help="stop after N answers (0: run forever)")
    args = p.parse_args()
    answered = 0
    client = Client(args.url, prefix=args.prefix or "gw") if args.url else Client.from_config(args.config)
    # aclosing: leaving the loop early (--count) closes the consumer while the connection
    # is still open, so the messages fetched with the last one go back at once.
    async with client, contextlib.aclosing(client.inbound(durable=args.durable)) as messages:
        async for msg in messages:
            if msg.auto:
                continue
            await client.reply(
                msg,
                text=f"We received your message and will reply within {args.within}.",
                id=f"ack-{msg.id}",  # a retry after our own crash is delivered once
                auto=True,
            )
            answered += 1
            print(f"answered {msg.id} in {msg.conversation}", flush=True)
            if args.count and answered >= args.count:
                break


if __name__ == "__main__":
    asyncio.run(main())
