/* Web chat widget of the omnichannel gateway. Plain JavaScript, no framework, no build step.
 *
 * Embed: <script src="https://gateway.example.com/channels/<name>/widget.js" async></script>
 * Optional attributes: data-open="true" (start open), data-user-id and data-user-signature
 * (a logged-in user: hex HMAC-SHA256 of the id, computed by your server with user_secret).
 *
 * Everything a message contains is rendered as text (textContent), never as HTML. */
(function () {
  "use strict";
  var script = document.currentScript;
  if (!script || window.__gwWebchat) { return; }
  window.__gwWebchat = true;

  var base = new URL(".", script.src).href;                 // .../channels/<name>/
  var wsUrl = base.replace(/^http/, "ws") + "ws";
  var userId = script.getAttribute("data-user-id");
  var userSig = script.getAttribute("data-user-signature");
  var startOpen = script.getAttribute("data-open") === "true";
  var KEY = "gw-webchat:" + base;

  function load(name) { try { return localStorage.getItem(KEY + ":" + name); } catch (e) { return null; } }
  function save(name, v) {
    try { if (v === null) { localStorage.removeItem(KEY + ":" + name); } else { localStorage.setItem(KEY + ":" + name, v); } }
    catch (e) { /* private mode: this page view only */ }
  }

  // --- state ------------------------------------------------------------------------
  var token = userId ? null : load("token");
  var ws = null, attempt = 0, timer = null, connected = false, stopped = false;
  var asleep = false;               // closed for idleness while nobody looked: wake() reconnects
  // Visitor messages not yet acknowledged, {id, frame}: kept in localStorage too, so one
  // left "sending" when the tab closed is sent (once: same id) when the visitor comes back.
  var OUTBOX = userId ? "outbox:u:" + userId : "outbox";
  var outbox = (function () {
    try {
      var kept = JSON.parse(load(OUTBOX) || "[]");
      return kept.filter(function (m) { return m && typeof m.id === "string" && m.frame && m.frame.id === m.id; })
        .map(function (m) { return {id: m.id, frame: m.frame}; });
    } catch (e) { return []; }
  })();
  function keep() { save(OUTBOX, outbox.length ? JSON.stringify(outbox.map(function (m) { return {id: m.id, frame: m.frame}; })) : null); }
  var byId = {}, byCid = {};        // rendered entries
  var reported = {delivered: {}, read: {}};
  var agentStates = {};             // outbound id -> "" | delivered | read
  var limits = {types: [], size: 0, chars: 4000};
  var isOpen = false;

  // --- DOM (in a shadow root: the host page's styles do not leak in, ours do not leak out)
  var host = document.createElement("div");
  host.id = "gw-webchat";
  var root = host.attachShadow ? host.attachShadow({mode: "open"}) : host;
  var css = [
    ":host{all:initial}",
    "*{box-sizing:border-box;font-family:system-ui,-apple-system,'Segoe UI',Roboto,'PingFang SC','Microsoft YaHei',sans-serif}",
    ".launcher{position:fixed;right:20px;bottom:20px;z-index:2147483000;border:0;border-radius:28px;padding:14px 20px;",
    "background:#1f6feb;color:#fff;font-size:15px;cursor:pointer;box-shadow:0 4px 14px rgba(0,0,0,.25)}",
    ".panel{position:fixed;right:20px;bottom:20px;z-index:2147483001;width:360px;height:540px;max-height:calc(100vh - 40px);",
    "display:none;flex-direction:column;background:#fff;border-radius:12px;overflow:hidden;box-shadow:0 8px 30px rgba(0,0,0,.3);color:#1b1f24}",
    ".panel.open{display:flex}",
    ".head{display:flex;align-items:center;gap:8px;padding:12px 14px;background:#1f6feb;color:#fff}",
    ".head .title{flex:1;font-weight:600;font-size:15px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}",
    ".dot{width:9px;height:9px;border-radius:50%;background:#9ca3af}.dot.on{background:#3fb950}",
    ".close{border:0;background:transparent;color:#fff;font-size:20px;cursor:pointer;line-height:1}",
    ".forget{font-size:12px;opacity:.85}",
    ".notice{display:none;padding:8px 14px;background:#fff8c5;font-size:13px;white-space:pre-wrap}.notice.show{display:block}",
    ".list{flex:1;overflow-y:auto;padding:12px;display:flex;flex-direction:column;gap:8px;background:#f6f8fa}",
    ".msg{max-width:82%;padding:8px 11px;border-radius:12px;font-size:14px;line-height:1.4;white-space:pre-wrap;word-wrap:break-word;overflow-wrap:anywhere}",
    ".msg.agent{align-self:flex-start;background:#fff;border:1px solid #d0d7de}",
    ".msg.visitor{align-self:flex-end;background:#1f6feb;color:#fff}",
    ".msg.system{align-self:center;background:transparent;color:#57606a;font-size:12px}",
    ".msg img{display:block;max-width:100%;max-height:240px;border-radius:8px;margin-top:4px}",
    ".meta{display:block;font-size:11px;opacity:.75;margin-top:3px;text-align:right}",
    ".choices{display:flex;flex-wrap:wrap;gap:6px;margin-top:6px}",
    ".choices button{border:1px solid #1f6feb;background:#fff;color:#1f6feb;border-radius:14px;padding:5px 12px;font-size:13px;cursor:pointer}",
    ".choices button.picked{background:#1f6feb;color:#fff}.choices button:disabled{cursor:default;opacity:.8}",
    "form.pre{display:none;flex-direction:column;gap:8px;padding:14px;border-top:1px solid #d0d7de}form.pre.show{display:flex}",
    "input,textarea{width:100%;border:1px solid #d0d7de;border-radius:8px;padding:9px;font-size:16px}",
    ".compose{display:flex;gap:6px;align-items:flex-end;padding:10px;border-top:1px solid #d0d7de;background:#fff}",
    ".compose.hide{display:none}",
    ".compose textarea{resize:none;height:42px;max-height:120px}",
    "button.send,button.attach,form.pre button{border:0;border-radius:8px;padding:10px 12px;background:#1f6feb;color:#fff;font-size:14px;cursor:pointer}",
    "button.attach{background:#eaeef2;color:#1b1f24}",
    ".err{display:none;padding:6px 12px;font-size:12px;color:#cf222e;background:#fff}.err.show{display:block}",
    "@media (max-width:480px){.panel{right:0;bottom:0;width:100vw;height:100%;max-height:100%;border-radius:0}}"
  ].join("");

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    return e;
  }

  // A constructed style sheet is not an inline style: it applies on a site whose
  // Content-Security-Policy has no 'unsafe-inline' for styles. Older browsers: a <style>.
  var sheet = null;
  try { sheet = new CSSStyleSheet(); sheet.replaceSync(css); } catch (e) { sheet = null; }
  var launcher = el("button", "launcher", "Chat");
  launcher.type = "button";
  launcher.setAttribute("aria-label", "Open chat");
  var panel = el("div", "panel");
  panel.setAttribute("role", "dialog");
  var head = el("div", "head");
  var dot = el("span", "dot");
  var title = el("span", "title", "Chat");
  var closeBtn = el("button", "close", "\u00d7");
  closeBtn.type = "button";
  closeBtn.setAttribute("aria-label", "Close chat");
  var forget = el("button", "close forget", "Delete");
  forget.type = "button";
  forget.title = "Delete this conversation";
  forget.setAttribute("aria-label", "Delete this conversation");
  head.appendChild(dot); head.appendChild(title); head.appendChild(forget); head.appendChild(closeBtn);
  var notice = el("div", "notice");
  var list = el("div", "list");
  list.setAttribute("role", "log");
  list.setAttribute("aria-live", "polite");
  var pre = el("form", "pre");
  var preName = el("input"); preName.name = "name"; preName.placeholder = "Your name"; preName.required = true; preName.maxLength = 80;
  var preEmail = el("input"); preEmail.name = "email"; preEmail.type = "email"; preEmail.placeholder = "Email (optional)";
  var prePhone = el("input"); prePhone.name = "phone"; prePhone.type = "tel"; prePhone.placeholder = "Phone (optional)";
  var preGo = el("button", "", "Start chat"); preGo.type = "submit";
  pre.appendChild(preName); pre.appendChild(preEmail); pre.appendChild(prePhone); pre.appendChild(preGo);
  var err = el("div", "err");
  var compose = el("div", "compose");
  var file = el("input"); file.type = "file"; file.style.display = "none";
  var attach = el("button", "attach", "+"); attach.type = "button"; attach.setAttribute("aria-label", "Attach an image");
  var input = el("textarea"); input.placeholder = "Type a message"; input.setAttribute("aria-label", "Message");
  var send = el("button", "send", "Send"); send.type = "button";
  compose.appendChild(file); compose.appendChild(attach); compose.appendChild(input); compose.appendChild(send);
  panel.appendChild(head); panel.appendChild(notice); panel.appendChild(list); panel.appendChild(pre);
  panel.appendChild(err); panel.appendChild(compose);
  if (sheet && root !== host && "adoptedStyleSheets" in root) { root.adoptedStyleSheets = [sheet]; }
  else { var style = el("style"); style.textContent = css; root.appendChild(style); }
  root.appendChild(launcher); root.appendChild(panel);

  function showError(text) { err.textContent = text || ""; err.className = text ? "err show" : "err"; }
  function scrollDown() { list.scrollTop = list.scrollHeight; }
  function watching() { return isOpen && document.visibilityState === "visible"; }
  function wake() { if (asleep && watching()) { asleep = false; attempt = 0; connect(); } }
  function open() {
    isOpen = true; wake(); panel.className = "panel open"; launcher.style.display = "none";
    save("open", "1"); reportSeen(); scrollDown(); input.focus();
  }
  function close() { isOpen = false; panel.className = "panel"; launcher.style.display = ""; save("open", null); }
  forget.addEventListener("click", function () {
    if (userId) { showError("Ask the site to delete a signed-in conversation."); return; }
    if (window.confirm("Delete this conversation? It cannot be undone.")) { wsSend({type: "forget"}); }
  });
  launcher.addEventListener("click", open);
  closeBtn.addEventListener("click", close);

  // --- rendering (text only) -------------------------------------------------------
  function newId() { return "m" + Date.now().toString(36) + Math.random().toString(36).slice(2, 10); }

  function bubble(m) {
    var node = (m.cid && byCid[m.cid]) || byId[m.id];
    var fresh = !node;
    if (fresh) { node = el("div"); }
    node.className = "msg " + (m.by === "agent" ? "agent" : "visitor");
    node.textContent = "";
    if (m.id) { node.setAttribute("data-id", m.id); byId[m.id] = node; }
    if (m.cid) { byCid[m.cid] = node; }
    if (m.text) { node.appendChild(document.createTextNode(m.text)); }
    for (var i = 0; i < (m.images || 0); i++) { node.appendChild(image(m.id, i)); }
    if (m.choices && m.choices.length) { node.appendChild(choices(m)); }
    if (m.by !== "agent") { node.appendChild(el("span", "meta", m.pending ? "sending\u2026" : m.failed ? m.failed : "sent")); }
    if (fresh) { list.appendChild(node); }
    if (m.by === "agent" && m.id) {
      var s = m.state || "";
      if (!agentStates[m.id] || rank(s) > rank(agentStates[m.id])) { agentStates[m.id] = s; }
    }
    scrollDown();
    return node;
  }

  function image(id, n) {
    var img = el("img");
    img.alt = "image";
    fetch(base + "media/" + encodeURIComponent(id) + "/" + n, {headers: {"Authorization": "Bearer " + token}})
      .then(function (r) { if (!r.ok) { throw new Error(r.status); } return r.blob(); })
      .then(function (b) { img.src = URL.createObjectURL(b); scrollDown(); })
      .catch(function () { img.alt = "(image unavailable)"; });
    return img;
  }

  function choices(m) {
    var box = el("div", "choices");
    m.choices.forEach(function (c, i) {
      var b = el("button", m.answered === i ? "picked" : "", c);
      b.type = "button";
      b.disabled = m.answered !== null && m.answered !== undefined;
      b.addEventListener("click", function () {
        if (!connected) { showError("Not connected, try again in a moment."); return; }
        Array.prototype.forEach.call(box.children, function (x) { x.disabled = true; });
        b.className = "picked";
        var cid = newId();
        outbox.push({id: cid, frame: {type: "choice", id: cid, survey: m.id, index: i}});
        keep(); flush();
      });
      box.appendChild(b);
    });
    return box;
  }

  function showPending() {
    outbox.forEach(function (m) { if (m.frame.type === "message") { bubble({cid: m.id, by: "visitor", text: m.frame.text, pending: true}); } });
  }

  function rank(s) { return s === "read" ? 2 : s === "delivered" ? 1 : 0; }

  // --- statuses: delivered when shown, read when the visitor can see it ------------------
  function reportSeen() {
    if (!connected) { return; }
    var visible = isOpen && document.visibilityState === "visible";
    ["delivered", "read"].forEach(function (state) {
      if (state === "read" && !visible) { return; }
      var ids = Object.keys(agentStates).filter(function (id) {
        return rank(agentStates[id]) < rank(state) && !reported[state][id];
      });
      if (!ids.length) { return; }
      ids.forEach(function (id) { reported[state][id] = true; });
      wsSend({type: "seen", state: state, ids: ids});
    });
  }
  document.addEventListener("visibilitychange", function () { wake(); reportSeen(); });

  // --- the socket --------------------------------------------------------------------
  function wsSend(frame) {
    if (ws && ws.readyState === 1) { ws.send(JSON.stringify(frame)); return true; }
    return false;
  }

  function flush() {
    if (!connected) { return; }
    outbox.forEach(function (m) { if (!m.waiting) { m.waiting = true; wsSend(m.frame); } });
  }

  function connect() {
    timer = null;
    var q = userId ? "?user=" + encodeURIComponent(userId) + "&signature=" + encodeURIComponent(userSig || "")
                   : token ? "?token=" + encodeURIComponent(token) : "";
    try { ws = new WebSocket(wsUrl + q); } catch (e) { retry(); return; }
    ws.onmessage = function (ev) {
      var f;
      try { f = JSON.parse(ev.data); } catch (e) { return; }
      handle(f);
    };
    ws.onclose = function (ev) {
      connected = false; ws = null; dot.className = "dot";
      outbox.forEach(function (m) { m.waiting = false; });
      if (ev.code === 4401 || ev.code === 4410) {          // not our token, or the conversation was erased
        if (userId) { showError("Your sign-in could not be verified; reload the page."); stopped = true; return; }
        afresh(); return;                                   // start afresh as a new visitor, at once
      }
      // The gateway closes an idle socket (1000): reconnect at once only while the chat box
      // is open on a visible page; otherwise when the visitor opens it or comes back to it.
      if (ev.code === 1000 && !watching() && !outbox.length) { asleep = true; return; }
      if (!stopped) { retry(); }
    };
  }

  function afresh(carry) {
    token = null; save("token", null); save("profile", null);
    outbox = (carry || []).map(function (m) { return {id: m.id, frame: m.frame}; }); keep(); agentStates = {}; reported = {delivered: {}, read: {}};
    attempt = 0; connect();
  }

  function retry() {
    if (timer) { return; }
    // Exponential backoff with jitter: 0.5 s doubling to 30 s.
    var delay = Math.min(30000, 500 * Math.pow(2, attempt)) * (0.5 + Math.random() / 2);
    attempt += 1;
    timer = setTimeout(connect, delay);
  }

  function handle(f) {
    if (f.type === "welcome") {
      attempt = 0; connected = true; dot.className = f.online ? "dot on" : "dot";
      if (f.token) { token = f.token; if (!userId) { save("token", f.token); } }
      title.textContent = f.title || "Chat";
      forget.style.display = f.user ? "none" : "";
      notice.textContent = f.notice || "";
      notice.className = f.notice ? "notice show" : "notice";
      limits = {types: f.upload_types || [], size: f.max_upload_size || 0, chars: f.max_chars || 4000};
      file.accept = limits.types.join(",");
      attach.style.display = limits.types.length ? "" : "none";
      input.maxLength = limits.chars;
      var askName = f.prechat && !load("profile");
      pre.className = askName ? "pre show" : "pre";
      compose.className = askName ? "compose hide" : "compose";
      list.setAttribute("data-welcome", f.welcome || "");
      showError("");
    } else if (f.type === "history") {
      list.textContent = ""; byId = {}; byCid = {};
      var welcome = list.getAttribute("data-welcome");
      if (welcome) { list.appendChild(el("div", "msg agent", welcome)); }
      f.messages.forEach(bubble);
      showPending(); flush(); reportSeen();
    } else if (f.type === "message") {
      bubble(f.message); reportSeen();
    } else if (f.type === "ack") {
      outbox = outbox.filter(function (m) { return m.id !== f.id; });
      keep(); bubble(f.message);
    } else if (f.type === "answered") {
      var node = byId[f.survey];
      if (node) { Array.prototype.forEach.call(node.querySelectorAll(".choices button"), function (b, i) {
        b.disabled = true; b.className = i === f.index ? "picked" : ""; }); }
    } else if (f.type === "profile_saved") {
      save("profile", "1"); pre.className = "pre"; compose.className = "compose"; input.focus();
    } else if (f.type === "error") {
      if (f.code === "forgotten") {     // erased in another tab or process: send it again as a new visitor
        var old = ws; if (old) { old.onclose = null; old.close(); }
        ws = null; connected = false; afresh(outbox); return;
      }
      var pending = outbox.filter(function (m) { return m.id === f.id; })[0];
      if (pending && f.retry_after) {                      // not stored yet: the same id again later
        pending.waiting = true;
        setTimeout(function () { pending.waiting = false; flush(); }, f.retry_after * 1000);
        if (f.code === "rate_limited") { showError(f.message); }
      } else if (pending) {
        outbox = outbox.filter(function (m) { return m !== pending; });
        keep();
        var n = byCid[pending.id];
        if (n) { n.lastChild.textContent = "not sent: " + f.message; }
      } else {
        showError(f.message);
      }
    }
  }

  // --- sending -----------------------------------------------------------------------
  function submit() {
    var text = input.value.trim();
    if (!text) { return; }
    if (text.length > limits.chars) { showError("Message too long."); return; }
    var cid = newId();
    outbox.push({id: cid, frame: {type: "message", id: cid, text: text}});
    keep();
    bubble({cid: cid, by: "visitor", text: text, pending: true});
    input.value = "";
    showError("");
    flush();
  }
  send.addEventListener("click", submit);
  input.addEventListener("keydown", function (ev) {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); submit(); }
  });

  pre.addEventListener("submit", function (ev) {
    ev.preventDefault();
    if (!wsSend({type: "profile", name: preName.value, email: preEmail.value, phone: prePhone.value})) {
      showError("Not connected, try again in a moment.");
    }
  });

  attach.addEventListener("click", function () { file.click(); });
  file.addEventListener("change", function () {
    var f = file.files && file.files[0];
    file.value = "";
    if (!f) { return; }
    if (limits.types.indexOf(f.type) < 0) { showError("This file type cannot be sent."); return; }
    if (f.size > limits.size) { showError("This image is too large."); return; }
    if (!token) { showError("Not connected, try again in a moment."); return; }
    var cid = newId();
    var node = bubble({cid: cid, by: "visitor", text: f.name, pending: true});
    fetch(base + "upload?id=" + cid, {method: "POST", body: f,
      headers: {"Authorization": "Bearer " + token, "Content-Type": f.type}})
      .then(function (r) { return r.ok ? r.json() : r.text().then(function (t) { throw new Error(t || r.status); }); })
      .then(function (body) { bubble(body.message); })
      .catch(function (e) { node.lastChild.textContent = "not sent: " + String(e.message).trim(); });
  });

  function mount() {
    document.body.appendChild(host);
    showPending();
    if (startOpen || load("open")) { open(); }
    connect();
  }
  if (document.body) { mount(); } else { document.addEventListener("DOMContentLoaded", mount); }
})();
