// The HTTP calls the page makes to the gateway, and the SSE parsing of a chat stream.

// The request failed before any answer: the server said no (status set) or could not be reached.
export class RequestError extends Error {
  constructor(message, { status = null, unreachable = false } = {}) {
    super(message);
    this.name = "RequestError";
    this.status = status;
    this.unreachable = unreachable;
  }
}

// The stream had started and then failed: an in-band error event or a dropped connection.
export class StreamError extends Error {
  constructor(message, { lost = false } = {}) {
    super(message);
    this.name = "StreamError";
    this.lost = lost;
  }
}

export function headers(apiKey) {
  const h = { "Content-Type": "application/json" };
  if (apiKey) h["Authorization"] = "Bearer " + apiKey;
  return h;
}

async function errorMessage(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return `HTTP ${response.status} ${response.statusText}`;
  }
}

// fetch() that turns "no response at all" into a RequestError saying so in words.
async function call(path, init) {
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new RequestError("The server is unreachable: check that NovaInfer is running.", { unreachable: true });
  }
  if (!response.ok) throw new RequestError(await errorMessage(response), { status: response.status });
  return response;
}

export async function health() {
  try {
    const r = await fetch("/health", { cache: "no-store" });
    if (r.ok) return { ok: true, text: "healthy" };
    return { ok: false, text: (await r.json()).reason || `HTTP ${r.status}` };
  } catch {
    return { ok: false, text: "server unreachable" };
  }
}

// The served model's name and context length (the page talks to the one model the gateway serves).
export async function model(apiKey) {
  const r = await call("/v1/models", { headers: headers(apiKey) });
  const card = (await r.json()).data[0];
  return { id: card.id, maxModelLen: card.max_model_len || null };
}

// Tokens the chat template makes of these messages, with the generation prompt (what a request would cost).
export async function countTokens(apiKey, modelId, messages) {
  const r = await call("/tokenize", {
    method: "POST",
    headers: headers(apiKey),
    body: JSON.stringify({ model: modelId, messages, add_generation_prompt: true }),
  });
  return (await r.json()).count;
}

// POST a streaming chat completion; yields each parsed chunk. RequestError before the stream,
// StreamError during it, AbortError when signal aborts (the gateway then aborts the engine request).
export async function* streamChat(apiKey, body, signal) {
  const r = await call("/v1/chat/completions", {
    method: "POST",
    headers: headers(apiKey),
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
    signal,
  });
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new StreamError("The connection to the server was lost.", { lost: true });
    }
    if (chunk.done) break;
    buffer += decoder.decode(chunk.value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!event.startsWith("data: ")) continue;
      if (event === "data: [DONE]") return;
      const data = JSON.parse(event.slice(6));
      if (data.error) throw new StreamError(data.error.message);
      yield data;
    }
  }
  throw new StreamError("The stream ended before the answer was complete.", { lost: true });
}
