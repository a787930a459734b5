"""A runnable helpdesk backend: answers every inbound customer message with an
acknowledgement that tells the customer when to expect a reply.

    python examples/echo_backend.py [nats://127.0.0.1:4222] [--prefix gw] [--within "2 working days"]

Machine-generated mail (auto-replies, bounces, lists) is never answered (RFC 3834)."""

from __future__ import annotations

import argparse
import asyncio

from gateway.client import Client


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url", nargs="?", default="nats://127.0.0.1:4222")
    p.add_argument("--prefix", default="gw")
    p.add_argument("--durable", default="echo-backend")
    p.add_argument("--within", default="2 working days")
    p.add_argument("--count", type=int, default=0, help="stop after N answers (0: run forever)")
    args = p.parse_args()
    answered = 0
    async with Client(args.url, prefix=args.prefix) as client:
        async for msg in client.inbound(durable=args.durable):
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
