// Chat sessions and their persistence in localStorage (this browser only).
//
// A session: { id, title, updated, settings, messages, contextStart, tokens }.
// A user message: { id, role: "user", content, failed? } (failed: why the request never got an answer).
// An assistant message: { id, role: "assistant", alts: [{ content, error?, stopped?, stats? }], alt }:
// regenerating adds an alternative; alt is the one shown, and the one sent in later requests.
// contextStart: messages before it no longer fit the model's context and are not sent (shown dimmed).

const KEY = "novainfer.chat.v1";
const TITLE_CHARS = 48;

export const newId = () => Date.now().toString(36) + Math.random().toString(36).slice(2, 8);

export function newSession(settings) {
  return {
    id: newId(),
    title: "New chat",
    titled: false,
    updated: Date.now(),
    settings: structuredClone(settings),
    messages: [],
    contextStart: 0,
    tokens: null,
  };
}

export class Store {
  constructor(defaultSettings) {
    this.defaultSettings = defaultSettings;
    let saved = null;
    try {
      saved = JSON.parse(localStorage.getItem(KEY));
    } catch {
      saved = null; // unreadable (e.g. edited by hand): start over rather than break the page
    }
    this.sessions = saved && Array.isArray(saved.sessions) ? saved.sessions : [];
    this.currentId = saved ? saved.currentId : null;
    for (const s of this.sessions) s.settings = { ...defaultSettings, ...s.settings };
    if (!this.current) this.currentId = this.sessions.length ? this.sorted()[0].id : this.add().id;
  }

  get current() {
    return this.sessions.find((s) => s.id === this.currentId) || null;
  }

  sorted() {
    return [...this.sessions].sort((a, b) => b.updated - a.updated);
  }

  // A new session takes the current one's settings, so a user's preferences carry over.
  add() {
    const from = this.current ? this.current.settings : this.defaultSettings;
    const s = newSession(from);
    this.sessions.push(s);
    this.currentId = s.id;
    this.save();
    return s;
  }

  select(id) {
    this.currentId = id;
    this.save();
  }

  rename(session, title) {
    session.title = title.trim() || session.title;
    session.titled = true;
    this.save();
  }

  remove(id) {
    this.sessions = this.sessions.filter((s) => s.id !== id);
    if (this.currentId === id) this.currentId = this.sessions.length ? this.sorted()[0].id : null;
    if (!this.current) this.add();
    this.save();
  }

  removeAll() {
    const settings = this.current ? this.current.settings : this.defaultSettings;
    this.sessions = [];
    this.currentId = null;
    this.sessions.push(newSession(settings));
    this.currentId = this.sessions[0].id;
    this.save();
  }

  // Titles come from the first user message, until the user renames the session.
  touch(session) {
    session.updated = Date.now();
    const first = session.messages.find((m) => m.role === "user");
    if (!session.titled && first) {
      const line = first.content.trim().split("\n")[0];
      session.title = line.length > TITLE_CHARS ? line.slice(0, TITLE_CHARS - 1) + "…" : line;
    }
    this.save();
  }

  save() {
    try {
      localStorage.setItem(KEY, JSON.stringify({ sessions: this.sessions, currentId: this.currentId }));
    } catch (e) {
      console.warn("could not save the chat sessions:", e);
    }
  }
}

// The text a message contributes to the conversation (an assistant's shown alternative).
export const textOf = (m) => (m.role === "user" ? m.content : m.alts[m.alt].content);
