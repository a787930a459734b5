/* Web chat widget of the omnichannel gateway. Plain JavaScript, no framework, no build step.
 *
 * Embed: <script src="https://gateway.example.com/channels/<name>/widget.js" async></script>
 * Optional attributes: data-open="true" (start open), data-user-id and data-user-signature
 * (a logged-in user: hex HMAC-SHA256 of the id, computed by your server with user_secret),
 * data-lang ("en", "zh-CN"), data-color ("#0a7d4f"), data-position ("left", "right"),
 * data-title, data-launcher-icon (an http(s) picture URL), data-sound ("true", "false").
 * JavaScript API: window.GatewayWebchat.open(), .close(), .identify(userId, signature),
 * .on("message" | "open" | "close", callback); "gateway-webchat:ready" is dispatched on window.
 *
 * Everything a message contains is rendered as text (textContent), never as HTML; links
 * become <a> elements only for http:, https: and mailto: URLs. */
(function () {
  "use strict";
  var script = document.currentScript;
  if (!script || window.__gwWebchat) { return; }
  window.__gwWebchat = true;
  // The channel's configuration, written in by the gateway when it serves this file.
  var CONFIG = /*{{config}}*/null || {};

  var base = new URL(".", script.src).href;                 // .../channels/<name>/
  var wsUrl = base.replace(/^http/, "ws") + "ws";
  function attr(name) { return script.getAttribute("data-" + name); }
  var userId = attr("user-id");
  var userSig = attr("user-signature");
  var startOpen = attr("open") === "true";
  var KEY = "gw-webchat:" + base;

  // --- language: the script tag, the channel, the page, the browser; English otherwise ----
  var STRINGS = {
    "en": {
      title: "Chat with us", welcome: "Hello! How can we help?",
      offline: "We are offline right now. Leave a message and we will answer here or by email.",
      launcher: "Chat", open: "Open chat", close: "Close chat", "delete": "Delete",
      delete_confirm: "Delete this conversation? It cannot be undone.",
      delete_user: "Ask the site to delete a signed-in conversation.",
      name: "Your name", email: "Email (optional)", phone: "Phone (optional)", start: "Start chat",
      placeholder: "Type a message", send: "Send", attach: "Attach a file", emoji: "Insert an emoji",
      sending: "sending\u2026", sent: "sent", read: "read", failed: "not sent: {reason}",
      online: "Online", away: "Away \u2014 we reply later", connecting: "Connecting\u2026",
      unavailable: "Chat unavailable", unavailable_detail: "The chat is not available on this site.",
      too_long: "Too long: {n} of {max} characters. Shorten it or send it in parts.",
      too_large: "This file is too large (at most {max}).", bad_type: "This file type cannot be sent.",
      not_connected: "Not connected, try again in a moment.", rate_limited: "Too many messages, try again in {s} s.",
      typing: "{who} is typing\u2026", today: "Today", yesterday: "Yesterday", new_message: "New message",
      image: "image", image_unavailable: "(image unavailable)", download: "Download {name}",
      retry_later: "the connection was lost, try again", sign_in_failed: "Your sign-in could not be verified; reload the page.",
      agent: "Support", error: "Something went wrong: {reason}",
      bad_name: "Please give a name (at most 80 characters).", bad_email: "That email address does not look right.",
      bad_phone: "That phone number does not look right.", survey_closed: "This question is closed or was answered already."
    },
    "zh-CN": {
      title: "在线客服", welcome: "您好！请问有什么可以帮您？",
      offline: "我们现在不在线。请留言，我们会在这里或通过邮件回复您。",
      launcher: "咨询", open: "打开聊天", close: "关闭聊天", "delete": "删除",
      delete_confirm: "删除这段对话？删除后无法恢复。",
      delete_user: "已登录用户的对话请联系网站删除。",
      name: "您的称呼", email: "邮箱（选填）", phone: "电话（选填）", start: "开始咨询",
      placeholder: "请输入消息", send: "发送", attach: "发送文件", emoji: "插入表情",
      sending: "发送中…", sent: "已送达", read: "已读", failed: "未发送：{reason}",
      online: "在线", away: "暂时离开，稍后回复", connecting: "正在连接…",
      unavailable: "客服暂不可用", unavailable_detail: "本网站暂未开通在线客服。",
      too_long: "消息过长：{n}/{max} 字。请删减或分段发送。",
      too_large: "文件过大（最大 {max}）。", bad_type: "不支持发送这种文件。",
      not_connected: "未连接，请稍后再试。", rate_limited: "消息太频繁，请 {s} 秒后再试。",
      typing: "{who}正在输入…", today: "今天", yesterday: "昨天", new_message: "新消息",
      image: "图片", image_unavailable: "（图片无法显示）", download: "下载 {name}",
      retry_later: "连接中断，请重试", sign_in_failed: "无法验证您的登录信息，请刷新页面。",
      agent: "客服", error: "出错了：{reason}",
      bad_name: "请填写称呼（最多 80 个字）。", bad_email: "邮箱地址似乎不正确。",
      bad_phone: "电话号码似乎不正确。", survey_closed: "这个问题已结束或已回答。"
    }
  };
  function pickLanguage() {
    var wanted = [attr("lang"), CONFIG.language, document.documentElement.lang]
      .concat(navigator.languages || [navigator.language]);
    for (var i = 0; i < wanted.length; i++) {
      var w = String(wanted[i] || "").toLowerCase();
      if (!w) { continue; }
      if (w.indexOf("zh") === 0) { return "zh-CN"; }
      if (w.indexOf("en") === 0) { return "en"; }
    }
    return "en";
  }
  var lang = pickLanguage();
  var words = {};
  [STRINGS.en, STRINGS[lang], (CONFIG.strings || {})[lang] || {}].forEach(function (table) {
    Object.keys(table).forEach(function (k) { words[k] = table[k]; });
  });
  function T(key, vars) {
    return String(words[key]).replace(/\{(\w+)\}/g, function (all, name) {
      return vars && vars[name] !== undefined ? String(vars[name]) : all;
    });
  }

  // --- branding: the script tag wins over the channel's configuration -----------------
  function hex(v) { return /^#[0-9a-f]{3}([0-9a-f]{3})?$/i.test(v || "") ? v : null; }
  function webUrl(v) { return /^https?:\/\/\S+$/i.test(v || "") ? v : null; }
  var color = hex(attr("color")) || hex(CONFIG.color) || "#1f6feb";
  var side = (attr("position") || CONFIG.position) === "left" ? "left" : "right";
  var launcherIcon = webUrl(attr("launcher-icon")) || webUrl(CONFIG.launcher_icon);
  var soundOn = attr("sound") ? attr("sound") === "true" : !!CONFIG.sound;
  var fixedTitle = attr("title") || CONFIG.title || null;

  function load(name) { try { return localStorage.getItem(KEY + ":" + name); } catch (e) { return null; } }
  function save(name, v) {
    try { if (v === null) { localStorage.removeItem(KEY + ":" + name); } else { localStorage.setItem(KEY + ":" + name, v); } }
    catch (e) { /* private mode: this page view only */ }
  }

  // --- state ------------------------------------------------------------------------
  var token = userId ? null : load("token");
  var ws = null, attempt = 0, timer = null, connected = false, stopped = false, everConnected = false;
  var asleep = false;               // closed for idleness while nobody looked: wake() reconnects
  var deskOnline = true, unavailable = false, probing = false;
  // Visitor messages not yet acknowledged, {id, frame}: kept in localStorage too, so one
  // left "sending" when the tab closed is sent (once: same id) when the visitor comes back.
  var OUTBOX = userId ? "outbox:u:" + userId : "outbox";
  function loadOutbox() {
    try {
      var kept = JSON.parse(load(OUTBOX) || "[]");
      return kept.filter(function (m) { return m && typeof m.id === "string" && m.frame && m.frame.id === m.id; })
        .map(function (m) { return {id: m.id, frame: m.frame}; });
    } catch (e) { return []; }
  }
  var outbox = loadOutbox();
  function keep() { save(OUTBOX, outbox.length ? JSON.stringify(outbox.map(function (m) { return {id: m.id, frame: m.frame}; })) : null); }
  var byId = {}, byCid = {};        // rendered entries
  var reported = {delivered: {}, read: {}};
  var agentStates = {};             // outbound id -> "" | delivered | read
  var limits = {types: [], size: 0, chars: 4000};
  var isOpen = false, stick = true, typingTimer = null, hasOwn = false;
  var listeners = {message: [], open: [], close: []};
  var pageTitle = document.title;

  // --- DOM (in a shadow root: the host page's styles do not leak in, ours do not leak out)
  var host = document.createElement("div");
  host.id = "gw-webchat";
  host.setAttribute("lang", lang);
  var root = host.attachShadow ? host.attachShadow({mode: "open"}) : host;
  var css = [
    ":host{all:initial}",
    "*{box-sizing:border-box;font-family:system-ui,-apple-system,'Segoe UI',Roboto,'PingFang SC','Microsoft YaHei',sans-serif}",
    ".launcher{position:fixed;" + side + ":20px;bottom:20px;z-index:2147483000;border:0;border-radius:28px;padding:12px 18px;",
    "display:flex;align-items:center;gap:8px;background:" + color + ";color:#fff;font-size:15px;cursor:pointer;box-shadow:0 4px 14px rgba(0,0,0,.25)}",
    ".launcher svg,.launcher img{width:24px;height:24px;display:block}.launcher img{height:28px;width:auto}",
    ".badge{position:absolute;top:-6px;" + (side === "left" ? "right" : "left") + ":-6px;min-width:22px;height:22px;padding:0 6px;border-radius:11px;",
    "background:#cf222e;color:#fff;font-size:12px;font-weight:700;line-height:22px;text-align:center;display:none}.badge.show{display:block}",
    ".panel{position:fixed;" + side + ":20px;bottom:20px;z-index:2147483001;width:370px;height:560px;max-height:calc(100vh - 40px);",
    "display:none;flex-direction:column;background:#fff;border-radius:12px;overflow:hidden;box-shadow:0 8px 30px rgba(0,0,0,.3);color:#1b1f24}",
    ".panel.open{display:flex}",
    ".head{display:flex;align-items:center;gap:8px;padding:10px 12px;background:" + color + ";color:#fff}",
    ".heading{flex:1;min-width:0;display:flex;flex-direction:column}",
    ".title{font-weight:600;font-size:15px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}",
    ".status{font-size:12px;opacity:.9;display:flex;align-items:center;gap:5px}",
    ".dot{width:9px;height:9px;border-radius:50%;background:#9ca3af;border:1px solid rgba(255,255,255,.7)}",
    ".dot.on{background:#3fb950}.dot.away{background:#f0b400}.dot.off{background:#9ca3af}.dot.down{background:#cf222e}",
    ".close{border:0;background:transparent;color:#fff;font-size:22px;cursor:pointer;line-height:1;padding:2px 4px}",
    ".forget{font-size:12px;opacity:.85;display:none}.forget.show{display:block}",
    ".notice{display:none;padding:8px 14px;background:#fff8c5;font-size:13px;white-space:pre-wrap}.notice.show{display:block}",
    ".notice.down{background:#ffebe9;color:#82071e}",
    ".list{flex:1;overflow-y:auto;padding:12px;display:flex;flex-direction:column;gap:8px;background:#f6f8fa}",
    ".day{align-self:center;font-size:12px;color:#57606a;background:#eaeef2;border-radius:10px;padding:2px 10px;margin:4px 0}",
    ".msg{max-width:82%;padding:8px 11px;border-radius:12px;font-size:14px;line-height:1.4;white-space:pre-wrap;word-wrap:break-word;overflow-wrap:anywhere}",
    ".msg.agent{align-self:flex-start;background:#fff;border:1px solid #d0d7de}",
    ".msg.visitor{align-self:flex-end;background:" + color + ";color:#fff}",
    ".msg.visitor a{color:#fff}.msg.agent a{color:" + color + "}",
    ".msg.welcome{align-self:flex-start;background:#fff;border:1px solid #d0d7de}",
    ".who{display:flex;align-items:center;gap:6px;font-size:12px;font-weight:600;color:#57606a;margin-bottom:3px}",
    ".who img{width:22px;height:22px;border-radius:50%;object-fit:cover}",
    ".msg img.pic{display:block;max-width:100%;max-height:240px;border-radius:8px;margin-top:4px}",
    ".file{display:flex;align-items:center;gap:6px;margin-top:4px;padding:6px 8px;border-radius:8px;background:rgba(0,0,0,.06);color:inherit;text-decoration:underline;cursor:pointer;font-size:13px}",
    ".file svg{flex:none}",
    ".meta{display:block;font-size:11px;opacity:.8;margin-top:3px;text-align:right}",
    ".tick{margin-left:4px}",
    ".typing{align-self:flex-start;font-size:12px;color:#57606a;font-style:italic;display:none}.typing.show{display:block}",
    ".choices{display:flex;flex-wrap:wrap;gap:6px;margin-top:6px}",
    ".choices button{border:1px solid " + color + ";background:#fff;color:" + color + ";border-radius:14px;padding:5px 12px;font-size:13px;cursor:pointer}",
    ".choices button.picked{background:" + color + ";color:#fff}.choices button:disabled{cursor:default;opacity:.8}",
    "form.pre{display:none;flex-direction:column;gap:8px;padding:14px;border-top:1px solid #d0d7de}form.pre.show{display:flex}",
    "input,textarea{width:100%;border:1px solid #d0d7de;border-radius:8px;padding:9px;font-size:16px}",
    ".compose{display:flex;gap:6px;align-items:flex-end;padding:10px;border-top:1px solid #d0d7de;background:#fff}",
    ".compose.hide{display:none}",
    ".compose textarea{resize:none;height:42px;min-height:42px;max-height:140px;overflow-y:auto;line-height:1.4}",
    "button.send,button.attach,button.smile,form.pre button{border:0;border-radius:8px;padding:10px 12px;background:" + color + ";color:#fff;font-size:14px;cursor:pointer}",
    "button.attach,button.smile{background:#eaeef2;color:#1b1f24;padding:9px 10px;line-height:1}",
    "button.attach svg{display:block}button.smile{font-size:18px;padding:8px}button.send{flex:none;white-space:nowrap}",
    "button:disabled{opacity:.5;cursor:default}",
    ".emojis{display:none;flex-wrap:wrap;gap:2px;padding:6px 10px;border-top:1px solid #d0d7de;background:#fff}.emojis.show{display:flex}",
    ".emojis button{border:0;background:transparent;font-size:20px;padding:3px;cursor:pointer;border-radius:6px}.emojis button:hover{background:#eaeef2}",
    ".err{display:none;padding:6px 12px;font-size:12px;color:#cf222e;background:#fff}.err.show{display:block}",
    "@media (max-width:480px){.panel{left:0;right:0;bottom:0;width:100vw;height:100%;max-height:100%;border-radius:0}}"
  ].join("");

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    return e;
  }
  function button(cls, text, label) {
    var b = el("button", cls, text);
    b.type = "button";
    if (label) { b.setAttribute("aria-label", label); b.title = label; }
    return b;
  }

  // A constructed style sheet is not an inline style: it applies on a site whose
  // Content-Security-Policy has no 'unsafe-inline' for styles. Older browsers: a <style>.
  var sheet = null;
  try { sheet = new CSSStyleSheet(); sheet.replaceSync(css); } catch (e) { sheet = null; }
  function drawing(d, stroke) {   // an icon drawn here: no font has to carry it
    var svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("viewBox", "0 0 24 24"); svg.setAttribute("aria-hidden", "true");
    svg.setAttribute("width", "20"); svg.setAttribute("height", "20");
    var path = document.createElementNS("http://www.w3.org/2000/svg", "path");
    path.setAttribute("d", d);
    if (stroke) { path.setAttribute("fill", "none"); path.setAttribute("stroke", "currentColor"); path.setAttribute("stroke-width", "2"); path.setAttribute("stroke-linecap", "round"); }
    else { path.setAttribute("fill", "currentColor"); }
    svg.appendChild(path);
    return svg;
  }
  var launcher = button("launcher", null, T("open"));
  if (launcherIcon) {
    var icon = el("img"); icon.alt = ""; icon.src = launcherIcon; launcher.appendChild(icon);
  } else {
    launcher.appendChild(drawing("M4 3h16a2 2 0 0 1 2 2v11a2 2 0 0 1-2 2H9l-5 4v-4H4a2 2 0 0 1-2-2V5a2 2 0 0 1 2-2z"));
  }
  launcher.appendChild(el("span", "", T("launcher")));
  var badge = el("span", "badge");
  launcher.appendChild(badge);
  var panel = el("div", "panel");
  panel.setAttribute("role", "dialog");
  var head = el("div", "head");
  var heading = el("div", "heading");
  var title = el("span", "title", fixedTitle || T("title"));
  var statusLine = el("span", "status");
  var dot = el("span", "dot off");
  var statusText = el("span", "", T("connecting"));
  statusLine.appendChild(dot); statusLine.appendChild(statusText);
  heading.appendChild(title); heading.appendChild(statusLine);
  panel.setAttribute("aria-label", title.textContent);
  var closeBtn = button("close", "\u00d7", T("close"));
  var forget = button("close forget", T("delete"), T("delete"));
  head.appendChild(heading); head.appendChild(forget); head.appendChild(closeBtn);
  var notice = el("div", "notice");
  var list = el("div", "list");
  list.setAttribute("role", "log");
  list.setAttribute("aria-live", "polite");
  var typingRow = el("div", "typing");
  var pre = el("form", "pre");
  var preName = el("input"); preName.name = "name"; preName.placeholder = T("name"); preName.required = true; preName.maxLength = 80;
  var preEmail = el("input"); preEmail.name = "email"; preEmail.type = "email"; preEmail.placeholder = T("email");
  var prePhone = el("input"); prePhone.name = "phone"; prePhone.type = "tel"; prePhone.placeholder = T("phone");
  var preGo = el("button", "", T("start")); preGo.type = "submit";
  pre.appendChild(preName); pre.appendChild(preEmail); pre.appendChild(prePhone); pre.appendChild(preGo);
  var err = el("div", "err");
  err.setAttribute("role", "alert");
  var emojis = el("div", "emojis");
  var compose = el("div", "compose");
  var file = el("input"); file.type = "file"; file.style.display = "none";
  var attach = button("attach", null, T("attach"));
  attach.appendChild(drawing("M21 11.5l-8.5 8.5a5 5 0 0 1-7-7L14 4.5a3.3 3.3 0 0 1 4.7 4.7L10.2 17.7a1.7 1.7 0 0 1-2.4-2.4L15.5 7.6", true));
  var smile = button("smile", "\ud83d\ude0a", T("emoji"));
  var input = el("textarea"); input.placeholder = T("placeholder"); input.setAttribute("aria-label", T("placeholder")); input.rows = 1;
  var send = button("send", T("send"));
  compose.appendChild(file); compose.appendChild(attach); compose.appendChild(smile); compose.appendChild(input); compose.appendChild(send);
  panel.appendChild(head); panel.appendChild(notice); panel.appendChild(list); panel.appendChild(pre);
  panel.appendChild(err); panel.appendChild(emojis); panel.appendChild(compose);
  if (sheet && root !== host && "adoptedStyleSheets" in root) { root.adoptedStyleSheets = [sheet]; }
  else { var style = el("style"); style.textContent = css; root.appendChild(style); }
  root.appendChild(launcher); root.appendChild(panel);

  ("\ud83d\ude0a \ud83d\ude02 \ud83d\ude09 \ud83d\ude0d \ud83d\ude4f \ud83d\udc4d \ud83d\udc4c \ud83d\udc4f \ud83d\ude4c \ud83d\ude01 \ud83d\ude05 " +
   "\ud83e\udd14 \ud83d\ude2e \ud83d\ude22 \ud83d\ude2d \ud83d\ude21 \ud83d\ude34 \u2764\ufe0f \ud83c\udf89 \ud83d\udd25 \u2705 \u274c " +
   "\ud83d\udce6 \ud83d\ude9a \ud83d\udcb0 \ud83d\udcde \ud83d\udce7 \u23f0 \ud83d\udc4b \ud83c\udf39").split(" ").forEach(function (e) {
    var b = button("", e, e);
    b.addEventListener("click", function () { insert(e); });
    emojis.appendChild(b);
  });
  function insert(text) {
    var start = input.selectionStart === undefined ? input.value.length : input.selectionStart;
    var end = input.selectionEnd === undefined ? start : input.selectionEnd;
    input.value = input.value.slice(0, start) + text + input.value.slice(end);
    input.selectionStart = input.selectionEnd = start + text.length;
    input.focus(); typed();
  }
  smile.addEventListener("click", function () { emojis.className = emojis.className === "emojis show" ? "emojis" : "emojis show"; });

  function showError(text) { err.textContent = text || ""; err.className = text ? "err show" : "err"; }
  function scrollDown() { list.scrollTop = list.scrollHeight; stick = true; }
  // Follow the newest message unless the visitor scrolled up to read older ones. Only a
  // scroll of theirs counts: redrawing the list scrolls it too (to the top, for a moment).
  var touched = 0;
  ["wheel", "touchmove", "keydown", "mousedown"].forEach(function (name) {
    list.addEventListener(name, function () { touched = Date.now(); }, {passive: true});
  });
  list.addEventListener("scroll", function () {
    if (Date.now() - touched < 1500) { stick = list.scrollTop + list.clientHeight >= list.scrollHeight - 40; }
  });
  function follow() { if (stick) { scrollDown(); } }
  function watching() { return isOpen && document.visibilityState === "visible"; }
  function wake() { if (asleep && watching()) { asleep = false; attempt = 0; connect(); } }
  function emit(name, data) {
    listeners[name].forEach(function (fn) { try { fn(data); } catch (e) { /* the page's bug, not ours */ } });
  }
  function open() {
    if (isOpen) { return; }
    isOpen = true; wake(); panel.className = "panel open"; launcher.style.display = "none";
    save("open", "1"); reportSeen(); scrollDown(); input.focus(); emit("open", {});
  }
  function close() {
    if (!isOpen) { return; }
    isOpen = false; panel.className = "panel"; launcher.style.display = ""; save("open", null); emojis.className = "emojis";
    emit("close", {});
  }
  forget.addEventListener("click", function () {
    if (userId) { showError(T("delete_user")); return; }
    if (window.confirm(T("delete_confirm"))) { wsSend({type: "forget"}); }
  });
  launcher.addEventListener("click", open);
  closeBtn.addEventListener("click", close);

  // --- status line: connected and staffed, connected off hours, connecting, unavailable ---
  function showStatus() {
    var state = unavailable ? "down" : !connected ? "off" : deskOnline ? "on" : "away";
    dot.className = "dot " + state;
    statusText.textContent = T({on: "online", away: "away", off: "connecting", down: "unavailable"}[state]);
    host.setAttribute("data-status", state);
  }

  // --- unread badge, title notice, sound ---------------------------------------------
  function unread() {
    return Object.keys(agentStates).filter(function (id) { return agentStates[id] !== "read" && !reported.read[id]; }).length;
  }
  function showUnread() {
    var n = watching() ? 0 : unread();
    badge.textContent = n > 99 ? "99+" : String(n);
    badge.className = n ? "badge show" : "badge";
    launcher.setAttribute("aria-label", n ? T("open") + " (" + n + ")" : T("open"));
    document.title = n ? "(" + n + ") " + T("new_message") + " \u00b7 " + pageTitle : pageTitle;
  }
  function beep() {
    if (!soundOn) { return; }
    try {
      var Ctx = window.AudioContext || window.webkitAudioContext;
      var ac = beep.ctx || (beep.ctx = new Ctx());
      var osc = ac.createOscillator(), gain = ac.createGain();
      osc.frequency.value = 880; gain.gain.value = 0.08;
      osc.connect(gain); gain.connect(ac.destination);
      osc.start(); osc.stop(ac.currentTime + 0.15);
      host.setAttribute("data-sounds", String(Number(host.getAttribute("data-sounds") || 0) + 1));
    } catch (e) { /* no audio (or not allowed before a click): the badge says it */ }
  }

  // --- rendering (text only, safe links) ---------------------------------------------
  function newId() { return "m" + Date.now().toString(36) + Math.random().toString(36).slice(2, 10); }
  var LINK = /(https?:\/\/[^\s<>"'\u3000-\u303f\uff01-\uff0f]+|mailto:[^\s<>"']+|[\w.+-]+@[\w-]+(?:\.[\w-]+)+)/gi;
  function safeHref(text) {
    var href = /^(https?:|mailto:)/i.test(text) ? text : "mailto:" + text;
    try {
      var u = new URL(href);
      return ["http:", "https:", "mailto:"].indexOf(u.protocol) >= 0 ? u.href : null;
    } catch (e) { return null; }
  }
  function linkify(text) {
    var frag = document.createDocumentFragment(), at = 0, m;
    LINK.lastIndex = 0;
    while ((m = LINK.exec(text)) !== null) {
      var found = m[0].replace(/[.,;:!?)\]}'"]+$/, "");
      var href = safeHref(found);
      if (!href) { continue; }
      frag.appendChild(document.createTextNode(text.slice(at, m.index)));
      var a = el("a", "", found);
      a.href = href; a.target = "_blank"; a.rel = "noopener noreferrer";
      frag.appendChild(a);
      at = m.index + found.length;
      LINK.lastIndex = at;
    }
    frag.appendChild(document.createTextNode(text.slice(at)));
    return frag;
  }
  function size(n) {
    return n >= 1048576 ? (n / 1048576).toFixed(n >= 10485760 ? 0 : 1) + " MB" : n >= 1024 ? Math.round(n / 1024) + " KB" : n + " B";
  }
  var timeFormat = new Intl.DateTimeFormat(lang, {hour: "2-digit", minute: "2-digit"});
  var dayFormat = new Intl.DateTimeFormat(lang, {year: "numeric", month: "long", day: "numeric", weekday: "short"});
  function dayKey(d) { return d.getFullYear() + "-" + d.getMonth() + "-" + d.getDate(); }
  function dayLabel(d) {
    var now = new Date(), y = new Date(now.getTime() - 86400000);
    return dayKey(d) === dayKey(now) ? T("today") : dayKey(d) === dayKey(y) ? T("yesterday") : dayFormat.format(d);
  }
  function placeDays() {   // a separator wherever the day changes (times are the visitor's own)
    Array.prototype.slice.call(list.querySelectorAll(".day")).forEach(function (d) { d.remove(); });
    var last = null;
    Array.prototype.forEach.call(list.querySelectorAll(".msg[data-at]"), function (node) {
      var d = new Date(node.getAttribute("data-at"));
      if (dayKey(d) !== last) { last = dayKey(d); list.insertBefore(el("div", "day", dayLabel(d)), node); }
    });
  }

  function bubble(m) {
    var node = (m.cid && byCid[m.cid]) || byId[m.id];
    var fresh = !node;
    if (fresh) { node = el("div"); }
    var agent = m.by === "agent";
    node.className = "msg " + (agent ? "agent" : "visitor");
    node.textContent = "";
    var at = m.at ? new Date(m.at) : new Date(Number(node.getAttribute("data-t")) || Date.now());
    node.setAttribute("data-at", at.toISOString());
    if (!m.at) { node.setAttribute("data-t", String(at.getTime())); }
    if (m.id) { node.setAttribute("data-id", m.id); byId[m.id] = node; }
    if (m.cid) { byCid[m.cid] = node; }
    if (agent && (m.agent || m.avatar)) {
      var who = el("div", "who");
      if (m.avatar && webUrl(m.avatar)) { var av = el("img"); av.alt = ""; av.src = m.avatar; av.referrerPolicy = "no-referrer"; who.appendChild(av); }
      who.appendChild(el("span", "", m.agent || T("agent")));
      node.appendChild(who);
    }
    if (m.text) { node.appendChild(linkify(m.text)); }
    (m.attachments || []).forEach(function (a, i) { node.appendChild(attachment(m.id, i, a)); });
    if (m.choices && m.choices.length) { node.appendChild(choices(m)); }
    var meta = el("span", "meta", timeFormat.format(at));
    if (!agent) {
      var state = m.failed ? "failed" : m.pending ? "pending" : m.state === "read" ? "read" : "sent";
      node.setAttribute("data-state", state);
      var tick = el("span", "tick", {pending: T("sending"), failed: T("failed", {reason: m.failed}),
                                     sent: "\u2713", read: "\u2713\u2713"}[state]);
      if (state === "sent" || state === "read") { tick.title = T(state); tick.setAttribute("aria-label", T(state)); }
      meta.appendChild(tick);
      hasOwn = hasOwn || !m.pending;
      showForget();
    }
    node.appendChild(meta);
    if (fresh) { list.appendChild(node); placeDays(); }
    if (agent && m.id) {
      var s = m.state || "";
      if (!agentStates[m.id] || rank(s) > rank(agentStates[m.id])) { agentStates[m.id] = s; }
      typing(false);
    }
    list.appendChild(typingRow);
    follow();
    return node;
  }
  function failBubble(node, reason) {
    node.setAttribute("data-state", "failed");
    var tick = node.querySelector(".tick");
    if (tick) { tick.textContent = T("failed", {reason: reason}); }
  }
  function showForget() { forget.className = hasOwn && !userId ? "close forget show" : "close forget"; }

  function authorized(url) {
    return fetch(url, {headers: {"Authorization": "Bearer " + token}})
      .then(function (r) { if (!r.ok) { throw new Error(r.status); } return r.blob(); });
  }
  function attachment(id, n, a) {
    if (a.url) {   // the desk linked a file it keeps elsewhere
      var link = el("a", "file", a.name || a.url);
      if (webUrl(a.url)) { link.href = a.url; link.target = "_blank"; link.rel = "noopener noreferrer"; }
      return link;
    }
    var src = base + "media/" + encodeURIComponent(id) + "/" + n;
    if (a.image) {
      var img = el("img", "pic");
      img.alt = a.name || T("image");
      // Once drawn the image is taller than its placeholder: follow the newest message again.
      img.addEventListener("load", follow);
      authorized(src).then(function (b) { img.src = URL.createObjectURL(b); })
        .catch(function () { img.alt = T("image_unavailable"); });
      return img;
    }
    var label = (a.name || a.type) + (a.size ? " (" + size(a.size) + ")" : "");
    var dl = el("a", "file", label);
    dl.insertBefore(drawing("M12 3v12m0 0l-5-5m5 5l5-5M4 20h16", true), dl.firstChild);
    dl.href = "#"; dl.setAttribute("role", "button"); dl.title = T("download", {name: a.name || a.type});
    dl.setAttribute("data-type", a.type);
    dl.addEventListener("click", function (ev) {   // fetched with the visitor's token, saved as a file
      ev.preventDefault();
      authorized(src).then(function (b) {
        var save = el("a"); save.href = URL.createObjectURL(b); save.download = a.name || "download";
        root.appendChild(save); save.click(); save.remove();
      }).catch(function () { showError(T("image_unavailable")); });
    });
    return dl;
  }

  function choices(m) {
    var box = el("div", "choices");
    m.choices.forEach(function (c, i) {
      var b = el("button", m.answered === i ? "picked" : "", c);
      b.type = "button";
      b.disabled = m.answered !== null && m.answered !== undefined;
      b.addEventListener("click", function () {
        if (!connected) { showError(T("not_connected")); return; }
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

  function typing(on, who) {
    if (typingTimer) { clearTimeout(typingTimer); typingTimer = null; }
    typingRow.textContent = on ? T("typing", {who: who || T("agent")}) : "";
    typingRow.className = on ? "typing show" : "typing";
    if (on) { list.appendChild(typingRow); }
    // A desk that went quiet without saying so: the indicator does not stay forever.
    if (on) { typingTimer = setTimeout(function () { typing(false); }, 10000); follow(); }
  }

  // --- statuses: delivered when shown, read when the visitor can see it ------------------
  function reportSeen() {
    showUnread();
    if (!connected) { return; }
    var visible = watching();
    ["delivered", "read"].forEach(function (state) {
      if (state === "read" && !visible) { return; }
      var ids = Object.keys(agentStates).filter(function (id) {
        return rank(agentStates[id]) < rank(state) && !reported[state][id];
      });
      if (!ids.length) { return; }
      ids.forEach(function (id) { reported[state][id] = true; });
      wsSend({type: "seen", state: state, ids: ids});
    });
    showUnread();
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
    if (stopped) { return; }
    var q = userId ? "?user=" + encodeURIComponent(userId) + "&signature=" + encodeURIComponent(userSig || "")
                   : token ? "?token=" + encodeURIComponent(token) : "";
    try { ws = new WebSocket(wsUrl + q); } catch (e) { retry(); return; }
    var opened = false;
    ws.onopen = function () { opened = true; };
    ws.onmessage = function (ev) {
      var f;
      try { f = JSON.parse(ev.data); } catch (e) { return; }
      handle(f);
    };
    ws.onclose = function (ev) {
      connected = false; ws = null; showStatus(); typing(false);
      outbox.forEach(function (m) { m.waiting = false; });
      if (ev.code === 4401 || ev.code === 4410) {          // not our token, or the conversation was erased
        if (userId) { showError(T("sign_in_failed")); stopped = true; return; }
        afresh(); return;                                   // start afresh as a new visitor, at once
      }
      // The gateway closes an idle socket (1000): reconnect at once only while the chat box
      // is open on a visible page; otherwise when the visitor opens it or comes back to it.
      if (ev.code === 1000 && !watching() && !outbox.length) { asleep = true; return; }
      // Refused before it opened: a browser does not tell why. Ask once whether this site
      // may use the chat at all; an answer of "no" is final for this page.
      if (!opened && !everConnected && !probing) { probe(); }
      retry();
    };
  }

  function probe() {
    probing = true;
    fetch(base + "status", {cache: "no-store"}).then(function (r) {
      return r.json().then(function (body) {
        if (r.status === 403 && body && body.code === "origin_not_allowed") { refuseForGood(); }
      });
    }).catch(function () { /* the gateway is down: keep trying */ });
  }
  function refuseForGood() {
    unavailable = true; stopped = true;
    if (timer) { clearTimeout(timer); timer = null; }
    notice.textContent = T("unavailable_detail"); notice.className = "notice show down";
    compose.className = "compose hide"; pre.className = "pre";
    outbox.forEach(function (m) { var n = byCid[m.id]; if (n) { failBubble(n, T("unavailable")); } });
    showStatus();
  }

  function afresh(carry) {
    token = null; save("token", null); save("profile", null);
    outbox = (carry || []).map(function (m) { return {id: m.id, frame: m.frame}; }); keep(); agentStates = {}; reported = {delivered: {}, read: {}};
    hasOwn = false; showForget();
    attempt = 0; connect();
  }

  function retry() {
    if (timer || stopped) { return; }
    // Exponential backoff with jitter: 0.5 s doubling to 30 s.
    var delay = Math.min(30000, 500 * Math.pow(2, attempt)) * (0.5 + Math.random() / 2);
    attempt += 1;
    timer = setTimeout(connect, delay);
  }

  function reason(f, text) {   // the server's reason, in the visitor's language where we know it
    if (f.code === "rate_limited") { return T("rate_limited", {s: Math.max(1, Math.ceil(f.retry_after || 1))}); }
    if (f.code === "bad_profile" && words["bad_" + f.field]) { return T("bad_" + f.field); }
    if (f.code === "answered" || f.code === "expired" || f.code === "no_survey") { return T("survey_closed"); }
    if (f.code === "too_long" && text) { return T("too_long", {n: text.trim().length, max: limits.chars}); }
    return T("error", {reason: f.message});
  }

  function handle(f) {
    if (f.type === "welcome") {
      attempt = 0; connected = true; everConnected = true; deskOnline = !!f.online;
      if (f.token) { token = f.token; if (!userId) { save("token", f.token); } }
      title.textContent = fixedTitle || f.title || T("title");
      notice.textContent = f.online ? "" : (f.notice === null || f.notice === undefined ? T("offline") : f.notice);
      notice.className = notice.textContent ? "notice show" : "notice";
      limits = {types: f.upload_types || [], size: f.max_upload_size || 0, chars: f.max_chars || 4000};
      file.accept = limits.types.join(",");
      attach.style.display = limits.types.length ? "" : "none";
      var askName = f.prechat && !load("profile");
      pre.className = askName ? "pre show" : "pre";
      compose.className = askName ? "compose hide" : "compose";
      list.setAttribute("data-welcome", f.welcome === null || f.welcome === undefined ? T("welcome") : f.welcome);
      showError(""); showStatus(); typed();
      wsSend({type: "context", page: String(location.href).slice(0, 2048), referrer: String(document.referrer).slice(0, 2048),
              locale: String(navigator.language || "").slice(0, 35),
              timezone: (Intl.DateTimeFormat().resolvedOptions().timeZone || "").slice(0, 64)});
    } else if (f.type === "history") {
      list.textContent = ""; byId = {}; byCid = {}; hasOwn = false;
      var welcome = list.getAttribute("data-welcome");
      if (welcome) { list.appendChild(el("div", "msg welcome", welcome)); }
      f.messages.forEach(bubble);
      showForget(); showPending(); flush(); reportSeen(); scrollDown();
    } else if (f.type === "message") {
      var fresh = !byId[f.message.id];
      bubble(f.message);
      if (f.message.by === "agent" && fresh) {
        if (!watching()) { beep(); }
        emit("message", {id: f.message.id, text: f.message.text, agent: f.message.agent || null, at: f.message.at});
      }
      reportSeen();
    } else if (f.type === "ack") {
      outbox = outbox.filter(function (m) { return m.id !== f.id; });
      keep(); bubble(f.message);
    } else if (f.type === "read") {
      f.ids.forEach(function (id) {
        var n = byId[id];
        if (n && n.getAttribute("data-state") === "sent") {
          n.setAttribute("data-state", "read");
          var t = n.querySelector(".tick"); t.textContent = "\u2713\u2713"; t.title = T("read"); t.setAttribute("aria-label", T("read"));
        }
      });
    } else if (f.type === "typing") {
      typing(!!f.on, f.agent);
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
      if (pending && typeof f.retry_after === "number") {  // not stored yet: the same id again later
        pending.waiting = true;
        setTimeout(function () { pending.waiting = false; flush(); }, f.retry_after * 1000);
        if (f.code === "rate_limited") { showError(reason(f)); }
      } else if (pending) {
        outbox = outbox.filter(function (m) { return m !== pending; });
        keep();
        var n = byCid[pending.id];
        if (n) { failBubble(n, reason(f, pending.frame.text)); }
      } else {
        showError(reason(f));
      }
    }
  }

  // --- sending -----------------------------------------------------------------------
  // The box grows with what is typed (up to its max-height) and says at once when a text is
  // over the limit: nothing is ever cut off silently.
  function typed() {
    input.style.height = "auto";
    input.style.height = Math.min(input.scrollHeight + 2, 140) + "px";
    var n = input.value.trim().length;
    var over = n > limits.chars;
    send.disabled = over;
    input.setAttribute("aria-invalid", over ? "true" : "false");
    if (over) { showError(T("too_long", {n: n, max: limits.chars})); }
    else if (err.getAttribute("data-long")) { showError(""); }
    if (over) { err.setAttribute("data-long", "1"); } else { err.removeAttribute("data-long"); }
  }
  input.addEventListener("input", typed);

  function submit() {
    var text = input.value.trim();
    if (!text || unavailable) { return; }
    if (text.length > limits.chars) { showError(T("too_long", {n: text.length, max: limits.chars})); return; }
    var cid = newId();
    outbox.push({id: cid, frame: {type: "message", id: cid, text: text}});
    keep();
    bubble({cid: cid, by: "visitor", text: text, pending: true});
    input.value = "";
    showError(""); typed(); emojis.className = "emojis";
    scrollDown();
    flush();
  }
  send.addEventListener("click", submit);
  input.addEventListener("keydown", function (ev) {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); submit(); }
  });

  pre.addEventListener("submit", function (ev) {
    ev.preventDefault();
    if (!wsSend({type: "profile", name: preName.value, email: preEmail.value, phone: prePhone.value})) {
      showError(T("not_connected"));
    }
  });

  attach.addEventListener("click", function () { file.click(); });
  file.addEventListener("change", function () {
    var f = file.files && file.files[0];
    file.value = "";
    if (!f) { return; }
    if (limits.types.indexOf(f.type) < 0) { showError(T("bad_type")); return; }
    if (f.size > limits.size) { showError(T("too_large", {max: size(limits.size)})); return; }
    if (!token || !connected) { showError(T("not_connected")); return; }
    showError("");
    var cid = newId();
    var node = bubble({cid: cid, by: "visitor", text: f.name, pending: true});
    scrollDown();
    fetch(base + "upload?id=" + cid + "&name=" + encodeURIComponent(f.name.slice(0, 120)), {method: "POST", body: f,
      headers: {"Authorization": "Bearer " + token, "Content-Type": f.type}})
      .then(function (r) {
        if (r.ok) { return r.json(); }
        return r.text().then(function (t) {
          var known = {413: T("too_large", {max: size(limits.size)}), 415: T("bad_type"), 429: null};
          throw new Error(known[r.status] || (t || String(r.status)).trim());
        });
      })
      .then(function (body) { bubble(body.message); })
      .catch(function (e) {
        // A TypeError is the network's (or a refusal the browser would not let us read).
        failBubble(node, e instanceof TypeError ? T("retry_later") : String(e.message));
      });
  });

  // --- the page's API ------------------------------------------------------------------
  window.GatewayWebchat = {
    open: open,
    close: close,
    on: function (name, fn) {
      if (!listeners[name] || typeof fn !== "function") { throw new Error("GatewayWebchat.on: unknown event " + name); }
      listeners[name].push(fn);
    },
    identify: function (id, signature) {   // the visitor signed in: their own conversation from now on
      userId = String(id); userSig = String(signature || "");
      OUTBOX = "outbox:u:" + userId; outbox = loadOutbox(); token = null;
      agentStates = {}; reported = {delivered: {}, read: {}}; hasOwn = false; showForget();
      var old = ws; if (old) { old.onclose = null; old.close(); }
      ws = null; connected = false; stopped = false; attempt = 0; connect();
    }
  };

  function mount() {
    document.body.appendChild(host);
    showPending(); showStatus();
    if (startOpen || load("open")) { open(); }
    connect();
    try { window.dispatchEvent(new CustomEvent("gateway-webchat:ready")); } catch (e) { /* very old browser */ }
  }
  if (document.body) { mount(); } else { document.addEventListener("DOMContentLoaded", mount); }
})();
