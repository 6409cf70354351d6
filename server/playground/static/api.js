// Requests to this server's API: the Bearer key, OpenAI's error body turned into an APIError, and SSE over fetch.

export class APIError extends Error {
  // status: the HTTP status (0 when the server could not be reached); param: the field the API names, if any.
  constructor(status, message, type = null, param = null) {
    super(message);
    this.name = "APIError";
    this.status = status;
    this.type = type;
    this.param = param;
  }
}

function headers(key, json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

// The API's own error (its message, type and param), or a description of a body that is not one.
async function errorOf(response) {
  const text = await response.text();
  try {
    const error = JSON.parse(text).error;
    if (error && typeof error.message === "string") {
      return new APIError(response.status, error.message, error.type ?? null, error.param ?? null);
    }
  } catch (_) {
    // not JSON: a proxy's page, say; described below
  }
  const excerpt = text.trim().slice(0, 200) || response.statusText;
  return new APIError(response.status, `HTTP ${response.status}: ${excerpt}`);
}

async function send(path, init) {
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new APIError(0, `could not reach the server (${error.message})`);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

export async function getJSON(path, key = "") {
  return (await send(path, { headers: headers(key, false) })).json();
}

export async function getText(path) {
  return (await send(path, {})).text();
}

// POST a JSON body; the response (checked to be 2xx) is for readEvents.
export async function post(path, body, key, signal) {
  return send(path, { method: "POST", headers: headers(key, true), body: JSON.stringify(body), signal });
}

// Each `data:` event of an SSE response, parsed, until `data: [DONE]`.
export async function* readEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replaceAll("\r\n", "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
  throw new APIError(0, "the stream ended before [DONE]");
}
