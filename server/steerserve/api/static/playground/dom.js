// Small DOM helpers. Text from the server only ever goes in as text nodes, never as HTML.

// el("button", {type: "button", onclick: f, "aria-label": "x"}, "text", childNode, ...)
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") || key === "className" || key === "selected") node[key] = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

// "cold (sae0 #4)" or "sae0 #4" when the feature has no label.
export function featureName(f) {
  const where = `${f.sae} #${f.index}`;
  return f.label ? `${f.label} (${where})` : where;
}

// The text a token shows: a newline as a visible mark, an empty token as the empty-set sign.
export function tokenText(text) {
  return text.replace(/\n/g, "\u21b5\n") || "\u2205";
}
