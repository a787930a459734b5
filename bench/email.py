"""Email channel benchmark: parse-and-publish rate and SMTP-in throughput.

Measured in one run, against one real nats-server (file storage):

1. a folder of real-world-like messages is generated first (replies with quoted history
   and signatures, HTML alternatives with inline images, PDF attachments, GB2312 / Big5 /
   ISO-2022-JP mail, forwarded messages), written as ``.eml`` files;
2. baseline: the bare ``email.message_from_bytes(raw, policy=default)`` of every file;
3. the plugin's ``parse_mail`` alone (MIME walk, charsets, quote split, HTML rendering);
4. parse-and-publish: ``EmailChannel.ingest`` of every file in process (parse, thread
   lookup, raw copy to the object store, JetStream publish + ack, thread map update) at a
   fixed concurrency;
5. SMTP in: ``python -m gateway run`` with an email channel in its own process, and
   concurrent aiosmtplib senders (one keep-alive session each) in this one: messages per
   second answered 250, and latency per transaction.

Run: ``python -m bench.email [--quick]``. Writes ``bench/results/email.json`` and
``bench/results/email.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import email
import email.policy
import random
import shutil
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib

from bench._common import (
    HOST,
    RESULTS,
    Bus,
    CpuMeter,
    GatewayProcess,
    free_port,
    latency_summary,
    machine_info,
    now_iso,
    rate,
)

LOREM = ("Hello, I ordered the blue kettle last week and it still has not arrived. The tracking page says "
         "it left the warehouse on Monday. Could you please check what happened? ")
CHINESE = "您好，我上周订购的蓝色水壶至今没有收到。物流页面显示周一已经出库，请帮忙查一下是什么情况。"


def make_corpus(n: int, seed: int = 7) -> list[bytes]:
    """``n`` messages of the kinds a support mailbox receives, roughly in real proportions."""
    rnd = random.Random(seed)
    pdf = b"%PDF-1.4\n" + bytes(rnd.getrandbits(8) for _ in range(60_000))
    png = b"\x89PNG\r\n\x1a\n" + bytes(rnd.getrandbits(8) for _ in range(8_000))
    out = []
    for i in range(n):
        kind = i % 10
        m = EmailMessage()
        m["From"] = f"Customer {i} <customer{i % 300}@example{i % 7}.test>"
        m["To"] = "ACME Support <support@acme.test>"
        m["Date"] = "Mon, 06 Jan 2025 10:00:00 +0800"
        m["Message-ID"] = f"<bench-{i}-{rnd.getrandbits(32):x}@example.test>"
        quoted = "\n".join("> " + LOREM for _ in range(6))
        if kind in (0, 1, 2):  # plain reply with quoted history and a signature
            m["Subject"] = f"Re: Order {1000 + i}"
            m["In-Reply-To"] = f"<prev-{i}@acme.test>"
            m["References"] = f"<root-{i}@example.test> <prev-{i}@acme.test>"
            m.set_content(f"{LOREM}\n\n-- \nCustomer {i}\n\nOn Mon, 6 Jan 2025, ACME Support wrote:\n{quoted}\n")
        elif kind in (3, 4):  # HTML + text with an inline logo
            m["Subject"] = f"Question about invoice {i}"
            m.set_content(LOREM * 3)
            m.add_alternative(f"<html><body><p>{LOREM * 3}</p><img src='cid:logo{i}'><table><tr><td>a</td>"
                              f"<td>b</td></tr></table></body></html>", subtype="html")
            m.get_payload()[1].add_related(png, maintype="image", subtype="png", cid=f"<logo{i}>", filename="logo.png")
        elif kind == 5:  # PDF attachment
            m["Subject"] = f"Invoice {i} attached"
            m.set_content(LOREM)
            m.add_attachment(pdf, maintype="application", subtype="pdf", filename=f"invoice-{i}.pdf")
        elif kind == 6:  # GB2312-labelled Chinese mail
            m["Subject"] = "订单问题 " + str(i)
            m.set_content(CHINESE * 4, charset="gb18030")
            raw = m.as_bytes().replace(b"charset=\"gb18030\"", b"charset=\"gb2312\"").replace(b"charset=gb18030", b"charset=gb2312")
            out.append(raw)
            continue
        elif kind == 7:  # Big5 and ISO-2022-JP
            body, cs = ("請問我的包裹在哪裡？" * 8, "big5") if i % 2 else ("荷物が届きません。" * 8, "iso-2022-jp")
            m["Subject"] = body[:6]
            m.set_content(body.encode(cs.replace("-", "_") if cs == "big5" else "iso2022_jp"), maintype="text",
                          subtype="plain", cte="7bit" if cs != "big5" else "8bit")
            m.set_param("charset", cs)
        elif kind == 8:  # forwarded message as attachment
            inner = EmailMessage()
            inner["From"] = "vendor@example.test"
            inner["Subject"] = "Original complaint"
            inner["Message-ID"] = f"<inner-{i}@example.test>"
            inner.set_content(LOREM * 2)
            m["Subject"] = "Fwd: Original complaint"
            m.set_content("See below.")
            m.add_attachment(inner)
        else:  # short new message
            m["Subject"] = "Help"
            m.set_content("My account is locked, please help.")
        out.append(m.as_bytes())
    return out


def with_fresh_ids(corpus: list[bytes], tag: str) -> list[bytes]:
    """The same messages with Message-IDs unique to one measurement (the core dedups)."""
    return [raw.replace(b"Message-ID: <bench-", b"Message-ID: <" + tag.encode() + b"-", 1) for raw in corpus]


def bare_parse(corpus: list[bytes]) -> dict[str, Any]:
    t0 = time.perf_counter()
    for raw in corpus:
        email.message_from_bytes(raw, policy=email.policy.default)
    el = time.perf_counter() - t0
    return {"messages": len(corpus), "elapsed_s": round(el, 3), "rate_msg_s": rate(len(corpus), el)}


def bare_parse_and_decode(corpus: list[bytes]) -> dict[str, Any]:
    """The stdlib parse plus decoding every leaf (what any consumer of the bodies must do)."""
    t0 = time.perf_counter()
    for raw in corpus:
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        for part in msg.walk():
            if not part.is_multipart():
                part.get_payload(decode=True)
    el = time.perf_counter() - t0
    return {"messages": len(corpus), "elapsed_s": round(el, 3), "rate_msg_s": rate(len(corpus), el)}


def plugin_parse(corpus: list[bytes]) -> dict[str, Any]:
    from gateway_plugins.email._parse import parse_mail

    t0 = time.perf_counter()
    for raw in corpus:
        parse_mail(raw)
    el = time.perf_counter() - t0
    return {"messages": len(corpus), "elapsed_s": round(el, 3), "rate_msg_s": rate(len(corpus), el)}


async def parse_and_publish(url: str, corpus: list[bytes], concurrency: int) -> dict[str, Any]:
    from gateway.testing import make_config, start_gateway

    cfg = make_config(url, {"mail": {"type": "email", "address": "support@acme.test"}}, outbound={"enabled": False},
                      http={"enabled": False}, log={"level": "warning"})
    gw = await start_gateway(cfg)
    ch = gw.channels["mail"].channel
    try:
        # Warm-up (connections, first object-store writes), not measured.
        for raw in with_fresh_ids(corpus[:20], "warm"):
            await ch.ingest(raw, transport="bench")
        msgs = with_fresh_ids(corpus, "pp")
        lat: list[float] = []
        it = iter(msgs)

        async def worker() -> None:
            for raw in it:
                t = time.perf_counter()
                await ch.ingest(raw, transport="bench")
                lat.append(time.perf_counter() - t)

        meter = CpuMeter({"bench_and_gateway": None}).start()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        el = time.perf_counter() - t0
        cpu = meter.stop(len(msgs))
        return {"messages": len(msgs), "concurrency": concurrency, "elapsed_s": round(el, 3),
                "rate_msg_s": rate(len(msgs), el), **latency_summary(lat), "cpu": cpu}
    finally:
        await gw.stop()


async def smtp_in(url: str, corpus: list[bytes], senders: int) -> dict[str, Any]:
    port = free_port()
    extra = (f'\n[channels.mail]\ntype = "email"\naddress = "support@acme.test"\n'
             f'[channels.mail.smtp]\nhost = "{HOST}"\nport = {port}\ndomains = ["acme.test"]\n')
    proc = GatewayProcess(url, extra=extra)
    await proc.start()
    try:
        msgs = with_fresh_ids(corpus, f"smtp{senders}")
        it = iter(msgs)
        lat: list[float] = []
        codes: dict[str, int] = {}

        async def sender() -> None:
            client = aiosmtplib.SMTP(hostname=HOST, port=port, start_tls=False, timeout=60)
            await client.connect()
            try:
                for raw in it:
                    t = time.perf_counter()
                    try:
                        await client.sendmail("customer@example.test", ["support@acme.test"], raw)
                        code = "250"
                    except aiosmtplib.SMTPResponseException as exc:
                        code = str(exc.code)
                    lat.append(time.perf_counter() - t)
                    codes[code] = codes.get(code, 0) + 1
            finally:
                await client.quit()

        meter = CpuMeter({"gateway": proc.pid, "senders": None}).start()
        t0 = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(senders)))
        el = time.perf_counter() - t0
        ok = codes.get("250", 0)
        return {"messages": len(msgs), "senders": senders, "answers": codes, "elapsed_s": round(el, 3),
                "rate_msg_s": rate(ok, el), **latency_summary(lat), "cpu": meter.stop(ok),
                "gateway_peak_rss_mib": proc.rss()}
    finally:
        await proc.stop()
        proc.cleanup()


def write_md(data: dict[str, Any]) -> str:
    r, m = data["results"], data["machine"]
    c = data["corpus"]
    pp = r["parse_and_publish"]
    lines = [
        f"# Email channel benchmark ({data['date']}{', quick' if data.get('quick') else ''})", "",
        f"{m['cores']} cores ({m['cpu']}), Python {m['python']}, {m['nats_server']}. Corpus: {c['messages']} generated "
        f"messages, {c['total_bytes'] / 1e6:.1f} MB (mean {c['mean_bytes']:,} B): replies with quoted history, HTML with "
        f"inline images, 60 KB PDFs, GB2312/Big5/ISO-2022-JP, forwarded mail.", "",
        "| measurement | msg/s | p50 ms | p99 ms | notes |", "|---|---:|---:|---:|---|",
        f"| bare `email.message_from_bytes` (**baseline**) | {r['bare_parse']['rate_msg_s']:,} | | | stdlib parse only |",
        f"| stdlib parse + decode every leaf | {r['bare_parse_and_decode']['rate_msg_s']:,} | | | |",
        f"| plugin `parse_mail` (no bus) | {r['plugin_parse']['rate_msg_s']:,} | | | charsets, quote split, HTML → text |",
        f"| **parse and publish** (`ingest`, {pp['concurrency']} concurrent) | **{pp['rate_msg_s']:,}** | {pp['p50_ms']} | "
        f"{pp['p99_ms']} | raw copy to object store, publish + ack, thread map |",
    ]
    for s in r["smtp_in"]:
        g = (s.get("cpu") or {}).get("gateway") or {}
        lines.append(f"| **SMTP in**, {s['senders']} concurrent senders | **{s['rate_msg_s']:,}** | {s['p50_ms']} | "
                     f"{s['p99_ms']} | gateway in its own process, CPU {g.get('cpu_ms_per_msg', 'n/a')} ms/msg, "
                     f"peak RSS {s.get('gateway_peak_rss_mib')} MiB; answers {s['answers']} |")
    lines += ["", f"Parse-and-publish vs bare parse: **{r['ratio_publish_to_bare_parse']:.3f}** of the baseline rate.", ""]
    return "\n".join(lines) + "\n"


async def run(quick: bool) -> dict[str, Any]:
    n = 200 if quick else 1000
    corpus = make_corpus(n)
    folder = Path(tempfile.mkdtemp(prefix="gw-mail-"))
    try:
        for i, raw in enumerate(corpus):
            (folder / f"{i:05d}.eml").write_bytes(raw)
        # Read back from the folder: the measured messages are the files.
        corpus = [p.read_bytes() for p in sorted(folder.glob("*.eml"))]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    results: dict[str, Any] = {}
    results["bare_parse"] = bare_parse(corpus)
    results["bare_parse_and_decode"] = bare_parse_and_decode(corpus)
    results["plugin_parse"] = plugin_parse(corpus)
    async with Bus() as bus:
        results["parse_and_publish"] = await parse_and_publish(bus.url, corpus, concurrency=16)
        results["smtp_in"] = [await smtp_in(bus.url, corpus, senders) for senders in (1, 8, 32)]
    results["ratio_publish_to_bare_parse"] = round(
        results["parse_and_publish"]["rate_msg_s"] / results["bare_parse"]["rate_msg_s"], 4)
    sizes = [len(r) for r in corpus]
    return {"benchmark": "email", "date": now_iso(), "quick": quick, "machine": machine_info(),
            "corpus": {"messages": len(corpus), "total_bytes": sum(sizes), "mean_bytes": sum(sizes) // len(sizes)},
            "results": results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.email", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller corpus")
    args = p.parse_args(argv)
    data = asyncio.run(run(args.quick))
    import json

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "email.json").write_text(json.dumps(data, indent=2) + "\n")
    md = write_md(data)
    (RESULTS / "email.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
