// The list of chat sessions: switch, rename (inline), delete.

export class Sidebar {
  // actions: { select(id), rename(session, title or null: cancelled), remove(id) }
  constructor(list, actions) {
    this.list = list;
    this.actions = actions;
  }

  render(store, streamingSessionId) {
    const items = store.sorted().map((s) => {
      const li = document.createElement("li");
      li.className = "session" + (s.id === store.currentId ? " active" : "");
      li.dataset.id = s.id;
      const title = document.createElement("button");
      title.type = "button";
      title.className = "title";
      title.textContent = s.title;
      title.title = s.title;
      if (s.id === streamingSessionId) title.classList.add("live");
      title.addEventListener("click", () => this.actions.select(s.id));
      title.addEventListener("dblclick", () => this.startRename(li, s));
      const rename = this.iconButton("✎", "Rename", "rename", () => this.startRename(li, s));
      const remove = this.iconButton("✕", "Delete", "delete", () => this.actions.remove(s.id));
      li.append(title, rename, remove);
      return li;
    });
    this.list.replaceChildren(...items);
  }

  iconButton(label, title, className, onClick) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "icon " + className;
    b.textContent = label;
    b.title = title;
    b.setAttribute("aria-label", title);
    b.addEventListener("click", (e) => {
      e.stopPropagation();
      onClick();
    });
    return b;
  }

  startRename(li, session) {
    const input = document.createElement("input");
    input.className = "rename-input";
    input.value = session.title;
    let done = false;
    const finish = (save) => {
      if (done) return;
      done = true;
      this.actions.rename(session, save ? input.value : null);
    };
    input.addEventListener("keydown", (e) => {
      if (e.key === "Enter") finish(true);
      else if (e.key === "Escape") {
        e.stopPropagation();
        finish(false);
      }
    });
    input.addEventListener("blur", () => finish(true));
    li.replaceChildren(input);
    input.focus();
    input.select();
  }
}
