// Per-session generation settings: the form in the settings panel and the request body fields they become.
// An empty field means "the server's default": it is left out of the request, never sent as 0.

const NUMBER_FIELDS = [
  { key: "temperature", label: "Temperature", step: "0.05", min: "0", hint: "0 is greedy" },
  { key: "top_p", label: "Top p", step: "0.05", min: "0", max: "1" },
  { key: "top_k", label: "Top k", step: "1", min: "-1", integer: true, hint: "-1 or 0: off" },
  { key: "min_p", label: "Min p", step: "0.01", min: "0", max: "1" },
  { key: "max_tokens", label: "Max tokens", step: "1", min: "1", integer: true },
  { key: "seed", label: "Seed", step: "1", integer: true },
  { key: "repetition_penalty", label: "Repetition penalty", step: "0.05", min: "0", hint: "1 is off" },
  { key: "presence_penalty", label: "Presence penalty", step: "0.1", min: "-2", max: "2" },
  { key: "frequency_penalty", label: "Frequency penalty", step: "0.1", min: "-2", max: "2" },
];

export const DEFAULT_SETTINGS = Object.fromEntries([
  ["system", ""],
  ...NUMBER_FIELDS.map((f) => [f.key, ""]),
  ["stop", ""],
  ["advanced", ""],
]);

export class SettingsError extends Error {}

// Builds the number inputs inside container; returns every settings input by key.
export function buildForm(container) {
  const inputs = {
    system: container.querySelector("#set-system"),
    stop: container.querySelector("#set-stop"),
    advanced: container.querySelector("#set-advanced"),
  };
  const grid = container.querySelector("#set-numbers");
  for (const f of NUMBER_FIELDS) {
    const label = document.createElement("label");
    label.textContent = f.label;
    const input = document.createElement("input");
    input.type = "number";
    input.id = "set-" + f.key;
    input.step = f.step;
    if (f.min !== undefined) input.min = f.min;
    if (f.max !== undefined) input.max = f.max;
    input.placeholder = f.hint || "default";
    label.appendChild(input);
    grid.appendChild(label);
    inputs[f.key] = input;
  }
  return inputs;
}

export function fill(inputs, settings) {
  for (const [key, input] of Object.entries(inputs)) input.value = settings[key] ?? "";
}

// The request body fields these settings add (sampling parameters, stop strings, advanced JSON).
export function bodyFields(settings) {
  const body = {};
  for (const f of NUMBER_FIELDS) {
    const raw = String(settings[f.key] ?? "").trim();
    if (raw === "") continue;
    const value = Number(raw);
    if (!Number.isFinite(value) || (f.integer && !Number.isInteger(value))) {
      throw new SettingsError(`${f.label} must be ${f.integer ? "an integer" : "a number"} (or empty for the default).`);
    }
    body[f.key] = value;
  }
  const stop = settings.stop.split("\n").filter((s) => s !== "");
  if (stop.length) body.stop = stop;
  if (settings.advanced.trim()) {
    let extra;
    try {
      extra = JSON.parse(settings.advanced);
    } catch (e) {
      throw new SettingsError(`Advanced JSON is not valid JSON: ${e.message}`);
    }
    if (extra === null || typeof extra !== "object" || Array.isArray(extra)) {
      throw new SettingsError('Advanced JSON must be an object, e.g. {"ignore_eos": true}.');
    }
    Object.assign(body, extra);
  }
  return body;
}
