// The public HTTP API as the page uses it: the key (session storage), JSON calls, SSE streams.
// Every failure becomes an ApiError whose message is the server's own (the OpenAI error shape).

const KEY_NAME = "steerserve.apiKey";

export class ApiError extends Error {
  constructor(message, status, param) {
    super(message);
    this.status = status;
    this.param = param;
  }
}

export function getKey() {
  return sessionStorage.getItem(KEY_NAME) || "";
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY_NAME, key);
  else sessionStorage.removeItem(KEY_NAME);
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = getKey();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// {"error": {"message", "param"}} -> ApiError; anything else -> the status line.
async function errorOf(resp) {
  let message = `${resp.status} ${resp.statusText}`;
  let param = null;
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) {
      message = body.error.message;
      param = body.error.param;
    }
  } catch (_) {
    // not JSON: keep the status line
  }
  if (resp.status === 401) message += " (enter the key at the top of the page)";
  return new ApiError(message, resp.status, param);
}

async function send(method, path, body) {
  let resp;
  try {
    resp = await fetch(path, {
      method,
      headers: headers(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    throw new ApiError(`cannot reach the server: ${err.message}`, 0, null);
  }
  if (!resp.ok) throw await errorOf(resp);
  return resp;
}

export async function getJSON(path) {
  return (await send("GET", path)).json();
}

export async function postJSON(path, body) {
  return (await send("POST", path, body)).json();
}

export async function deleteJSON(path) {
  return (await send("DELETE", path)).json();
}

// POST `body` with stream: true; calls onEvent(obj) per `data:` event until [DONE].
export async function postStream(path, body, onEvent) {
  const resp = await send("POST", path, { ...body, stream: true });
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const event = JSON.parse(data);
        if (event.error) throw new ApiError(event.error.message, 500, event.error.param);
        onEvent(event);
      }
    }
  }
}
