// The chat app: wires the session store, the views and the gateway API together.
// One answer streams at a time; it belongs to the session it started in, whatever the user views next.

import * as api from "./api.js";
import { ChatView } from "./chat_view.js";
import { copyText } from "./clipboard.js";
import { answerRoom, fitContext, requestMessages } from "./context.js";
import { DEFAULT_SETTINGS, SettingsError, bodyFields, buildForm, fill } from "./settings.js";
import { Sidebar } from "./sidebar.js";
import { Store, newId, textOf } from "./store.js";
import { initTheme } from "./theme.js";

const $ = (id) => document.getElementById(id);
const API_KEY = "novainfer.api_key";
const HEALTH_POLL_MS = 5000;

const store = new Store(DEFAULT_SETTINGS);
let served = null; // { id, maxModelLen } of the served model, once known
let active = null; // the answer streaming now: { session, message, controller }
let frame = 0;

const apiKey = () => $("api-key").value;

const view = new ChatView($("chat"), {
  edit: (m, text) => editAndRegenerate(m, text),
  regenerate: (m) => regenerate(m),
  retry: (m) => retry(m),
  copy: (m) => copyText(textOf(m)),
  changed: () => store.save(),
});

const sidebar = new Sidebar($("sessions"), {
  select: (id) => {
    if (id === store.currentId) return closeOverlays();
    stopActive();
    store.select(id);
    closeOverlays();
    renderAll();
  },
  rename: (session, title) => {
    if (title !== null) store.rename(session, title);
    sidebar.render(store, active && active.session.id);
  },
  remove: (id) => {
    if (active && active.session.id === id) stopActive();
    store.remove(id);
    renderAll();
  },
});

const inputs = buildForm($("settings"));

function renderAll() {
  const session = store.current;
  sidebar.render(store, active && active.session.id);
  view.render(session, active && active.session === session ? active.message.id : null);
  fill(inputs, session.settings);
  renderTokens();
  $("send").hidden = Boolean(active);
  $("stop").hidden = !active;
}

function renderTokens() {
  const session = store.current;
  const el = $("tokens");
  if (!served || !served.maxModelLen) {
    el.textContent = "";
    return;
  }
  const used = session.tokens ?? 0;
  el.textContent = `${used} / ${served.maxModelLen} tokens`;
  el.title = "Tokens the conversation holds (after the latest answer) against the model's context length";
  el.classList.toggle("full", used > 0.9 * served.maxModelLen);
}

function setHealth(ok, text) {
  $("health").className = ok ? "ok" : "bad";
  $("health").title = text;
  $("health-text").textContent = text;
}

async function refreshHealth() {
  const h = await api.health();
  setHealth(h.ok, h.text);
  if (h.ok && !served) await loadModel();
}

async function loadModel() {
  try {
    served = await api.model(apiKey());
    $("model").textContent = served.id;
    renderTokens();
  } catch (e) {
    $("model").textContent = e.status === 401 ? "API key needed (Settings)" : "";
  }
  return served;
}

function notice(text, kind = "") {
  $("notice").textContent = text;
  $("notice").className = kind;
  $("notice").hidden = !text;
}

// Only one frame's worth of re-rendering per streamed batch of deltas.
function scheduleUpdate(session, message) {
  if (frame) return;
  frame = requestAnimationFrame(() => {
    frame = 0;
    if (store.current === session) view.update(message);
  });
}

function stopActive() {
  if (active) active.controller.abort();
}

function stats(usage, t0, tFirst, tLast) {
  if (!usage) return null;
  const decodeS = tFirst !== null && tLast > tFirst ? (tLast - tFirst) / 1000 : 0;
  return {
    completionTokens: usage.completion_tokens,
    // Decode speed: tokens after the first over the time after the first (TTFT excluded).
    decodeTokPerS: decodeS > 0 && usage.completion_tokens > 1 ? (usage.completion_tokens - 1) / decodeS : null,
    ttftMs: tFirst !== null ? tFirst - t0 : null,
    promptTokens: usage.prompt_tokens,
    cachedTokens: (usage.prompt_tokens_details && usage.prompt_tokens_details.cached_tokens) || 0,
  };
}

// The request fields of the session's settings, or null after saying what is wrong with them.
function settingsFields(session) {
  try {
    return bodyFields(session.settings);
  } catch (e) {
    if (!(e instanceof SettingsError)) throw e;
    notice(e.message, "error");
    openSettings();
    return null;
  }
}

// Streams an answer to session.messages[end - 1] (a user message) into a new assistant message,
// or into a new alternative of `regenerated`.
async function generate(session, end, fields, regenerated = null) {
  const user = session.messages[end - 1];
  notice("");
  delete user.failed;
  let message = regenerated;
  if (message) {
    message.alts.push({ content: "" });
    message.alt = message.alts.length - 1;
  } else {
    message = { id: newId(), role: "assistant", alts: [{ content: "" }], alt: 0 };
    session.messages.splice(end, 0, message);
  }
  const alt = message.alts[message.alt];
  const controller = new AbortController();
  active = { session, message, controller };
  store.touch(session);
  renderAll();
  let t0 = performance.now();
  let tFirst = null;
  let tLast = null;
  let usage = null;
  try {
    if (!served) {
      served = await api.model(apiKey()); // a RequestError here says why (unreachable, a wrong key)
      $("model").textContent = served.id;
    }
    const model = served;
    if (model.maxModelLen) {
      const count = (messages) => api.countTokens(apiKey(), model.id, messages);
      const room = answerRoom(fields.max_tokens, model.maxModelLen);
      const fit = await fitContext(session, end, count, model.maxModelLen, room);
      session.tokens = fit.tokens;
      if (fit.dropped) {
        notice(
          `This conversation outgrew the model's ${model.maxModelLen}-token context: ${fit.dropped} older ` +
            "message(s) are no longer sent (shown dimmed above).",
          "warn",
        );
        if (store.current === session) renderAll();
      }
    }
    if (controller.signal.aborted) throw new DOMException("stopped", "AbortError");
    const body = { model: model.id, messages: requestMessages(session, end), ...fields };
    t0 = performance.now();
    for await (const chunk of api.streamChat(apiKey(), body, controller.signal)) {
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices && chunk.choices.length ? chunk.choices[0].delta.content : null;
      if (delta) {
        tLast = performance.now();
        if (tFirst === null) tFirst = tLast;
        alt.content += delta;
        scheduleUpdate(session, message);
      }
    }
    setHealth(true, "healthy");
  } catch (e) {
    if (e.name === "AbortError") {
      alt.stopped = true;
    } else if (e instanceof api.RequestError) {
      // No answer at all: the turn is not part of the conversation; say why where it happened.
      if (regenerated) {
        message.alts.pop();
        message.alt = message.alts.length - 1;
        notice(`Regenerate failed: ${e.message}`, "error");
      } else {
        session.messages.splice(session.messages.indexOf(message), 1);
        user.failed = e.message;
      }
      if (e.unreachable) {
        setHealth(false, "server unreachable");
        // Keep the unsent text where the user can send it again (sending replaces the failed message).
        if (!regenerated && store.current === session && !$("prompt").value) $("prompt").value = user.content;
      }
    } else if (e instanceof api.StreamError) {
      alt.error = e.message; // the partial answer stays
      if (e.lost) refreshHealth();
    } else {
      alt.error = `Error: ${e.message}`;
      throw e;
    }
  } finally {
    alt.stats = stats(usage, t0, tFirst, tLast);
    if (usage) session.tokens = usage.prompt_tokens + usage.completion_tokens;
    if (active && active.message === message) active = null;
    store.touch(session);
    renderAll();
  }
}

function send() {
  const text = $("prompt").value.trim();
  if (!text || active) return;
  const session = store.current;
  const fields = settingsFields(session);
  if (!fields) return;
  const last = session.messages[session.messages.length - 1];
  // A failed message at the end is replaced, not repeated: what is shown is what is sent.
  if (last && last.role === "user" && last.failed) last.content = text;
  else session.messages.push({ id: newId(), role: "user", content: text });
  $("prompt").value = "";
  autosize();
  view.scrollToEnd(true);
  generate(session, session.messages.length, fields);
}

function editAndRegenerate(m, text) {
  if (active) return;
  const session = store.current;
  const fields = settingsFields(session);
  if (!fields) return;
  const i = session.messages.indexOf(m);
  m.content = text;
  session.messages.splice(i + 1); // later turns are replaced by the new answer
  session.contextStart = Math.min(session.contextStart, i);
  generate(session, i + 1, fields);
}

function regenerate(m) {
  const session = store.current;
  const fields = !active && settingsFields(session);
  if (fields) generate(session, session.messages.indexOf(m), fields, m);
}

function retry(m) {
  const session = store.current;
  const fields = !active && settingsFields(session);
  if (fields) generate(session, session.messages.indexOf(m) + 1, fields);
}

function openSettings() {
  document.body.classList.add("settings-open");
}

function closeOverlays() {
  document.body.classList.remove("settings-open", "sidebar-open");
}

function autosize() {
  const p = $("prompt");
  p.style.height = "";
  p.style.height = Math.min(p.scrollHeight, 200) + "px";
}

// Wiring.
$("api-key").value = localStorage.getItem(API_KEY) || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem(API_KEY, apiKey());
  served = null;
  refreshHealth();
});
for (const [key, input] of Object.entries(inputs)) {
  input.addEventListener("input", () => {
    store.current.settings[key] = input.value;
    store.save();
  });
}
$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  send();
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});
$("prompt").addEventListener("input", autosize);
$("stop").addEventListener("click", stopActive);
document.addEventListener("keydown", (e) => {
  if (e.key !== "Escape") return;
  if (active) stopActive();
  else closeOverlays();
});
$("new-chat").addEventListener("click", () => {
  stopActive();
  const current = store.current;
  if (current.messages.length) store.add();
  closeOverlays();
  renderAll();
  $("prompt").focus();
});
$("delete-all").addEventListener("click", () => {
  if (!confirm("Delete every conversation? This cannot be undone.")) return;
  stopActive();
  store.removeAll();
  renderAll();
});
$("toggle-settings").addEventListener("click", () => document.body.classList.toggle("settings-open"));
$("close-settings").addEventListener("click", closeOverlays);
$("toggle-sidebar").addEventListener("click", () => document.body.classList.toggle("sidebar-open"));
$("scrim").addEventListener("click", closeOverlays);
initTheme($("theme"));

renderAll();
refreshHealth();
setInterval(refreshHealth, HEALTH_POLL_MS);
$("prompt").focus();
