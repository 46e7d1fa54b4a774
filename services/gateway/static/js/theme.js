// Light and dark themes: follow the system setting unless the user picked one (kept in localStorage).

const KEY = "novainfer.theme";
const MODES = ["system", "light", "dark"];
const LABELS = { system: "◐", light: "☀", dark: "☾" };
const dark = window.matchMedia("(prefers-color-scheme: dark)");

function apply(button) {
  const mode = localStorage.getItem(KEY) || "system";
  const effective = mode === "system" ? (dark.matches ? "dark" : "light") : mode;
  document.documentElement.dataset.theme = effective;
  // highlight.js ships one stylesheet per theme; exactly one is enabled.
  document.getElementById("hljs-light").disabled = effective === "dark";
  document.getElementById("hljs-dark").disabled = effective !== "dark";
  button.textContent = LABELS[mode];
  button.title = `Theme: ${mode} (click to change)`;
  button.setAttribute("aria-label", button.title);
}

export function initTheme(button) {
  apply(button);
  dark.addEventListener("change", () => apply(button));
  button.addEventListener("click", () => {
    const mode = localStorage.getItem(KEY) || "system";
    localStorage.setItem(KEY, MODES[(MODES.indexOf(mode) + 1) % MODES.length]);
    apply(button);
  });
}
