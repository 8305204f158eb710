// A run as a link: the prompt, sampling settings, steering rows, multiplier, stop condition and both
// outputs, in the URL's fragment (never sent to the server; no server-side storage).
// NOTE: the outputs travel in the link, so it shows what was seen even after the server, its model or
// its registry changed; Generate reruns the same seeded request (the same text on the same server).

const PREFIX = "#run=";

function toBase64Url(text) {
  const bytes = new TextEncoder().encode(text);
  let bin = "";
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function fromBase64Url(code) {
  const bin = atob(code.replace(/-/g, "+").replace(/_/g, "/"));
  return new TextDecoder().decode(Uint8Array.from(bin, (c) => c.charCodeAt(0)));
}

// The row fields a link keeps (uid and the like are the page's own).
const ROW_KEYS = ["kind", "sae", "index", "label", "mode", "value", "positions", "scale", "to", "maxAct", "id", "json", "group"];

export function runLink(run) {
  const rows = run.items.map((i) => Object.fromEntries(ROW_KEYS.filter((k) => i[k] !== undefined).map((k) => [k, i[k]])));
  const url = new URL(window.location.href);
  url.hash = PREFIX.slice(1) + toBase64Url(JSON.stringify({ v: 1, ...run, items: rows }));
  return url.toString();
}

// The run in the current URL's fragment, or null; a malformed one throws (the page says why).
export function runFromLocation() {
  if (!window.location.hash.startsWith(PREFIX)) return null;
  let run;
  try {
    run = JSON.parse(fromBase64Url(window.location.hash.slice(PREFIX.length)));
  } catch (err) {
    throw new Error(`this link's saved run cannot be read (${err.message}); it may have been cut short`);
  }
  if (!run || run.v !== 1 || !Array.isArray(run.items)) throw new Error("this link's saved run is not one this page knows");
  return run;
}
