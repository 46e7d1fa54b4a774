// Model output as markdown: marked parses, DOMPurify removes anything executable (model output is
// untrusted: an answer may contain <script> or onerror=), highlight.js colours code blocks.
// Globals from the vendored scripts that index.html loads first.
/* global marked, DOMPurify, hljs */

import { copyText } from "./clipboard.js";

const parser = new marked.Marked({ gfm: true, breaks: true });

// Links open in a new tab and cannot reach back into this page.
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

function highlight(code) {
  const lang = (code.className.match(/language-([\w+#.-]+)/) || [])[1];
  const text = code.textContent;
  // highlight.js escapes the text it returns, so its HTML is safe to insert.
  const result =
    lang && hljs.getLanguage(lang)
      ? hljs.highlight(text, { language: lang, ignoreIllegals: true })
      : hljs.highlightAuto(text);
  code.innerHTML = result.value;
  code.classList.add("hljs");
  return result.language || lang || "";
}

function addCopyButton(pre, language) {
  const bar = document.createElement("div");
  bar.className = "code-bar";
  const name = document.createElement("span");
  name.textContent = language;
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy-code";
  button.textContent = "Copy";
  button.addEventListener("click", async () => {
    await copyText(pre.querySelector("code").textContent);
    button.textContent = "Copied";
    setTimeout(() => (button.textContent = "Copy"), 1200);
  });
  bar.append(name, button);
  pre.prepend(bar);
}

// Renders text into el; called again for every streamed update (unclosed fences render as code).
export function renderMarkdown(el, text) {
  el.innerHTML = DOMPurify.sanitize(parser.parse(text), { USE_PROFILES: { html: true } });
  for (const code of el.querySelectorAll("pre > code")) addCopyButton(code.parentElement, highlight(code));
}
