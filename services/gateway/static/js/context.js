// Keeping a long conversation inside the model's context window.
//
// Before each request the page counts the prompt's tokens with the gateway's /tokenize (the chat
// template included). When the prompt and the room for the answer would not fit, the oldest whole
// turns are dropped (never the system prompt, never the turn being answered) by moving the session's
// contextStart; the page shows those messages dimmed with a notice, so what is shown is what is sent.

import { textOf } from "./store.js";

// Room kept for the answer when max_tokens is left to the server's default.
const DEFAULT_ANSWER_ROOM = 256;

export function answerRoom(maxTokens, maxModelLen) {
  if (maxTokens) return maxTokens;
  return Math.min(DEFAULT_ANSWER_ROOM, Math.floor(maxModelLen / 4));
}

// The messages a request sends: the system prompt, then session.messages[contextStart, end).
export function requestMessages(session, end) {
  const out = [];
  const system = session.settings.system.trim();
  if (system) out.push({ role: "system", content: system });
  for (const m of session.messages.slice(session.contextStart, end)) out.push({ role: m.role, content: textOf(m) });
  return out;
}

// Moves session.contextStart forward until messages[.., end) fit; returns { tokens, dropped }.
// count(messages) -> tokens. When only the turn being answered is left it stops and lets the
// server say what does not fit.
export async function fitContext(session, end, count, maxModelLen, room) {
  let tokens = await count(requestMessages(session, end));
  let dropped = 0;
  while (tokens + room > maxModelLen) {
    let next = session.contextStart + 1;
    while (next < end && session.messages[next].role !== "user") next++;
    if (next >= end) break;
    dropped += next - session.contextStart;
    session.contextStart = next;
    tokens = await count(requestMessages(session, end));
  }
  return { tokens, dropped };
}
