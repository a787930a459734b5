// A helpdesk backend in JavaScript, written from docs/bus-contract.md alone: a NATS client
// and JSON, nothing of the gateway's Python code.
//
//   npm ci
//   node backend.mjs nats://127.0.0.1:4222 [--durable helpdesk-js] [--deliver new|all|<RFC 3339 time>] [--count N]
//
// For every inbound message it publishes a reply on gw.out.<channel_type>.<channel>, then
// acks the inbound, and follows the replies' statuses on gw.status.> until each one is
// final (sent or dead). It prints one line per event, for people and for the test that
// runs it (tests/test_js_backend.py).
import { connect } from "@nats-io/transport-node";
import { AckPolicy, DeliverPolicy, jetstream, jetstreamManager } from "@nats-io/jetstream";

function options(argv) {
  const opts = { url: argv[0] ?? "nats://127.0.0.1:4222", durable: "helpdesk-js", deliver: "new", count: Infinity };
  for (let i = 1; i < argv.length; i += 2) {
    const [key, value] = [argv[i].replace(/^--/, ""), argv[i + 1]];
    if (!(key in opts) || value === undefined) throw new Error(`unknown option ${argv[i]}`);
    opts[key] = key === "count" ? Number(value) : value;
  }
  return opts;
}

// Where a new durable consumer starts (docs/bus-contract.md, "Your backend's consumer").
// It only matters the first time: afterwards the server remembers what was acked.
function startAt(deliver) {
  if (deliver === "new") return { deliver_policy: DeliverPolicy.New };
  if (deliver === "all") return { deliver_policy: DeliverPolicy.All };
  return { deliver_policy: DeliverPolicy.StartTime, opt_start_time: new Date(deliver).toISOString() };
}

async function ensureConsumer(jsm, durable, deliver) {
  try {
    return await jsm.consumers.info("GW_IN", durable);
  } catch (err) {
    if (!/consumer not found/i.test(String(err?.message))) throw err;
  }
  // Our own consumer on GW_IN. Never create one on GW_OUT: it is the gateway's work
  // queue (the server answers error 10100) and every outbound would be taken from it.
  return await jsm.consumers.add("GW_IN", {
    durable_name: durable,
    ack_policy: AckPolicy.Explicit,
    filter_subject: "gw.in.>",
    ack_wait: 30_000_000_000, // nanoseconds: unacked after 30 s means redelivered
    ...startAt(deliver),
  });
}

const opts = options(process.argv.slice(2));
const nc = await connect({ servers: opts.url, name: "helpdesk-js" });
const js = jetstream(nc);
const jsm = await jetstreamManager(nc);
const print = (...fields) => console.log(fields.join(" "));

// Follow statuses before replying, so none is missed: an ordered consumer starting now.
const pending = new Map(); // outbound id -> inbound id
const statusConsumer = await js.consumers.get("GW_STATUS", {
  filter_subjects: ["gw.status.>"],
  deliver_policy: DeliverPolicy.New,
});
const statuses = await statusConsumer.consume();
let answered = 0;
let finished = 0;

const done = (async () => {
  for await (const m of statuses) {
    const st = m.json();
    if (!pending.has(st.outbound_id)) continue; // another backend's outbound
    // attempt is 0 on accepted/delivered/read, 1, 2 ... on sent/failed/dead of an attempt.
    print("status", st.outbound_id, st.state, st.attempt, st.provider_id ?? "-");
    if (st.state === "sent" || st.state === "dead") {
      pending.delete(st.outbound_id);
      finished += 1;
      if (finished >= opts.count) break;
    }
  }
})();

await ensureConsumer(jsm, opts.durable, opts.deliver);
const inbound = await (await js.consumers.get("GW_IN", opts.durable)).consume();
for await (const m of inbound) {
  const msg = m.json();
  // Every id is a JSON string (a WeChat MsgId is above 2**53): never parse it as a number.
  print("inbound", msg.id, msg.channel_type, msg.channel, JSON.stringify(msg.parts?.[0]?.text ?? ""));
  if (msg.auto) {
    await m.ackAck(); // machine-generated (out-of-office, bounce): never answered automatically
    continue;
  }
  // The outbound id is derived from the inbound id: if we crash after publishing and
  // before the ack, the redelivered inbound produces the same id and the gateway
  // delivers the reply once.
  const reply = {
    schema_version: 1,
    id: `js-reply-${msg.id}`,
    conversation: msg.conversation,
    in_reply_to: msg.id, // the *gateway* id of the inbound (Message.id), not its provider_id
    parts: [{ type: "text", text: `Thanks, we received: ${msg.parts?.[0]?.text ?? ""}` }],
  };
  pending.set(reply.id, msg.id);
  // msgID sets the Nats-Msg-Id header: always the outbound id.
  const ack = await js.publish(`gw.out.${msg.channel_type}.${msg.channel}`, JSON.stringify(reply), { msgID: reply.id });
  print("replied", reply.id, ack.duplicate ? "duplicate" : `seq=${ack.seq}`);
  await m.ackAck(); // after the reply is stored: a crash before this only repeats the same reply
  answered += 1;
  if (answered >= opts.count) break;
}

await done;
await nc.drain();
