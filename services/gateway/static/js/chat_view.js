// The conversation pane: one element per message, re-rendered in place while an answer streams.
// User text is always shown as text; only assistant answers go through the markdown renderer.

import { renderMarkdown } from "./markdown.js";

const BOTTOM_SLACK_PX = 48;

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function copyButton(onCopy) {
  const b = button("Copy", "Copy", async () => {
    await onCopy();
    b.textContent = "Copied";
    setTimeout(() => (b.textContent = "Copy"), 1200);
  });
  return b;
}

function button(label, title, onClick, className = "") {
  const b = el("button", "icon " + className, label);
  b.type = "button";
  b.title = title;
  b.setAttribute("aria-label", title);
  b.addEventListener("click", onClick);
  return b;
}

export function statsText(stats) {
  if (!stats) return "";
  const parts = [`${stats.completionTokens} tokens`];
  if (stats.decodeTokPerS !== null) parts.push(`${stats.decodeTokPerS.toFixed(1)} tok/s`);
  if (stats.ttftMs !== null) parts.push(`TTFT ${Math.round(stats.ttftMs)} ms`);
  if (stats.promptTokens !== null) parts.push(`prompt ${stats.promptTokens} (${stats.cachedTokens} cached)`);
  return parts.join(" · ");
}

export class ChatView {
  // actions: { edit(message, text), regenerate(message), retry(message), copy(message), changed() }
  constructor(container, actions) {
    this.container = container;
    this.actions = actions;
    this.elements = new Map();
    this.session = null;
    this.streamingId = null;
    this.stick = true; // follow the stream only while the user is at the bottom
    container.addEventListener("scroll", () => {
      this.stick = container.scrollHeight - container.scrollTop - container.clientHeight < BOTTOM_SLACK_PX;
    });
  }

  // Renders a session; re-rendering the one shown keeps the user's scroll position unless at the bottom.
  render(session, streamingId) {
    const switched = session !== this.session;
    this.session = session;
    this.streamingId = streamingId;
    this.elements.clear();
    const log = el("div", "log");
    if (!session.messages.length) {
      log.appendChild(el("div", "empty", "Ask anything. Answers stream from /v1/chat/completions."));
    }
    session.messages.forEach((m, i) => {
      if (i === session.contextStart && i > 0) {
        log.appendChild(
          el(
            "div",
            "trim-notice",
            `The ${i} earlier message${i > 1 ? "s" : ""} above no longer fit in the model's context and ` +
              "are not sent with new requests (the system prompt always is).",
          ),
        );
      }
      const node = el("div");
      this.elements.set(m.id, node);
      this.fillMessage(node, m, i);
      log.appendChild(node);
    });
    const top = this.container.scrollTop;
    this.container.replaceChildren(log);
    if (switched || this.stick) this.scrollToEnd(true);
    else this.container.scrollTop = top;
  }

  // Re-renders one message (a streamed update); follows it only if the user was at the bottom.
  update(message) {
    const node = this.elements.get(message.id);
    if (!node) return;
    this.fillMessage(node, message, this.session.messages.indexOf(message));
    this.scrollToEnd(false);
  }

  scrollToEnd(force) {
    if (force) this.stick = true;
    if (this.stick) this.container.scrollTop = this.container.scrollHeight;
  }

  fillMessage(node, m, index) {
    const streaming = m.id === this.streamingId;
    const busy = this.streamingId !== null;
    const last = index === this.session.messages.length - 1;
    node.className = `msg ${m.role}`;
    node.dataset.id = m.id;
    node.classList.toggle("dropped", index < this.session.contextStart);
    node.classList.toggle("streaming", streaming);
    node.classList.toggle("failed", Boolean(m.failed));
    const body = el("div", "body");
    const foot = el("div", "foot");
    const children = [body];
    if (m.role === "user") {
      body.textContent = m.content;
      if (m.failed) children.push(el("div", "note error", `Not answered: ${m.failed}`));
      if (!busy) {
        if (m.failed && last) foot.appendChild(button("↻ Retry", "Send this message again", () => this.actions.retry(m)));
        foot.appendChild(button("✎", "Edit and regenerate from here", () => this.startEdit(node, m)));
        foot.appendChild(copyButton(() => this.actions.copy(m)));
      }
    } else {
      const alt = m.alts[m.alt];
      renderMarkdown(body, alt.content);
      if (streaming && !alt.content) body.appendChild(el("span", "typing", "…"));
      if (alt.error) children.push(el("div", "note error", alt.error));
      if (alt.stopped) children.push(el("div", "note", "Stopped."));
      if (m.alts.length > 1) {
        const nav = el("span", "alts");
        const prev = button("‹", "Previous answer", () => this.switchAlt(m, -1));
        const next = button("›", "Next answer", () => this.switchAlt(m, 1));
        prev.disabled = busy || m.alt === 0;
        next.disabled = busy || m.alt === m.alts.length - 1;
        nav.append(prev, el("span", "alt-index", `${m.alt + 1}/${m.alts.length}`), next);
        foot.appendChild(nav);
      }
      if (!busy) {
        foot.appendChild(copyButton(() => this.actions.copy(m)));
        if (last) foot.appendChild(button("↻", "Regenerate", () => this.actions.regenerate(m), "regenerate"));
      }
      foot.appendChild(el("span", "stats", streaming ? "" : statsText(alt.stats)));
    }
    children.push(foot);
    node.replaceChildren(...children);
  }

  switchAlt(m, step) {
    m.alt = Math.min(m.alts.length - 1, Math.max(0, m.alt + step));
    this.actions.changed();
    this.update(m);
  }

  startEdit(node, m) {
    const area = el("textarea", "edit-area");
    area.value = m.content;
    area.rows = Math.min(12, m.content.split("\n").length + 1);
    const save = el("button", "primary", "Save & regenerate");
    save.type = "button";
    const cancel = el("button", "secondary", "Cancel");
    cancel.type = "button";
    const submit = () => {
      const text = area.value.trim();
      if (text) this.actions.edit(m, text);
    };
    save.addEventListener("click", submit);
    cancel.addEventListener("click", () => this.update(m));
    area.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        submit();
      } else if (e.key === "Escape") {
        e.stopPropagation();
        this.update(m);
      }
    });
    const row = el("div", "edit-actions");
    row.append(cancel, save);
    node.replaceChildren(area, row);
    node.classList.add("editing");
    area.focus();
  }
}
