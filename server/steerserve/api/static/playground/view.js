// What the page shows back: the two completion streams, the activation view and the feature card.

import { getJSON, postJSON, postStream } from "./api.js";
import { el, featureName, tokenText } from "./dom.js";
import { featurePath } from "./steering.js";

// Stream one call with return_unsteered; the steered choice goes left, its unsteered twin right.
// Returns {steered, unsteered} texts (steered is null when the call carried no steering). A choice that
// `stop_when` ended gets a note under its text (`stopEls`: {steered, unsteered} elements).
export async function streamPair(path, body, outSteered, outUnsteered, stopEls = {}) {
  const texts = {};
  for (const note of Object.values(stopEls)) note.hidden = true;
  let steeredSeen = false;
  outSteered.textContent = "";
  outUnsteered.textContent = "";
  outSteered.classList.add("running");
  outUnsteered.classList.add("running");
  try {
    await postStream(path, body, (event) => {
      for (const choice of event.choices || []) {
        const piece = choice.text ?? (choice.delta && choice.delta.content) ?? "";
        // `steered` is absent when nothing steers the call: the one choice is the plain completion.
        const steered = choice.steered === true;
        steeredSeen ||= steered;
        const key = steered ? "steered" : "unsteered";
        texts[key] = (texts[key] || "") + piece;
        (steered ? outSteered : outUnsteered).textContent = texts[key];
        if (choice.feature_stop && stopEls[key]) showStop(stopEls[key], choice.feature_stop);
      }
    });
  } finally {
    outSteered.classList.remove("running");
    outUnsteered.classList.remove("running");
  }
  if (!steeredSeen) outSteered.textContent = "(nothing steers this call: see the unsteered completion)";
  return { steered: steeredSeen ? texts.steered || "" : null, unsteered: texts.unsteered || "" };
}

function showStop(note, stop) {
  const bound = stop.above !== undefined ? `above ${stop.above}` : `below ${stop.below}`;
  const f = stop.feature || {};
  note.textContent = `stopped by stop_when: ${f.sae} #${f.index} was ${Number(stop.activation).toFixed(3)} ` +
    `(${bound}) at token ${JSON.stringify(stop.token)}, position ${stop.position}`;
  note.hidden = false;
}

// The tokens of an inspected text, coloured by one feature, with the hovered or selected token's
// top features shown in `detailEl`. Arrow keys move the selection when the token box has focus.
export class ActivationView {
  constructor(tokensEl, detailEl, noteEl, { openCard, colourBy }) {
    this.tokensEl = tokensEl;
    this.detailEl = detailEl;
    this.noteEl = noteEl;
    this.openCard = openCard;
    this.colourBy = colourBy;
    this.result = null;
    this.selected = -1;
    tokensEl.addEventListener("keydown", (ev) => this.key(ev));
    tokensEl.addEventListener("mouseleave", () => this.showDetail(this.selected));
  }

  // POST /v1/inspect for `request` ({text} or {messages}) with SAE `sae`, then colour by `feature`.
  // With `steering` ({steering, feature_logit_bias}) the text is read with it applied, as during
  // the generation: inspect's `generate` steers every position; its one generated token is dropped.
  async inspect(request, sae, feature, steering) {
    this.noteEl.textContent = "reading activations...";
    const body = { ...request, sae, top_k: 64 };
    if (steering && Object.keys(steering).length) body.generate = { max_tokens: 1, ...steering };
    const result = await postJSON("/v1/inspect", body);
    result.tokens = result.tokens.filter((t) => !t.generated);
    result.steered = Boolean(body.generate);
    this.result = result;
    this.selected = -1;
    this.colour(feature);
  }

  // feature = {sae, index} or {sae, index: null} for "each token's strongest feature".
  colour(feature) {
    if (!this.result) return;
    const tokens = this.result.tokens;
    const act = (t) => {
      if (feature.index === null) return t.features.length ? t.features[0].activation : 0;
      const f = t.features.find((x) => x.index === feature.index);
      return f ? f.activation : 0;
    };
    const values = tokens.map(act);
    const peak = Math.max(...values.map(Math.abs), 1e-9);
    const spans = tokens.map((t, k) => {
      const span = el("span", {
        id: `token-${k}`,
        className: "token" + (t.special ? " special" : "") + (k === this.selected ? " selected" : ""),
        "data-activation": values[k].toFixed(4),
        title: `${JSON.stringify(t.token)}  activation ${values[k].toFixed(3)}`,
      }, tokenText(t.token));
      const alpha = Math.min(1, Math.abs(values[k]) / peak);
      span.style.setProperty("--alpha", alpha.toFixed(3));
      span.addEventListener("mouseover", () => this.showDetail(k));
      span.addEventListener("click", () => this.select(k));
      return span;
    });
    this.tokensEl.replaceChildren(...spans);
    this.values = values;
    this.what = feature.index === null ? `strongest feature of ${this.result.sae}` : `${this.result.sae} #${feature.index}`;
    const what = feature.index === null ? `each token's ${this.what}` : this.what;
    const active = values.filter((v) => v > 0).length;
    const how = this.result.steered ? "read with the steering applied" : "read unsteered";
    this.noteEl.textContent = `${what}, ${how}: active on ${active} of ${tokens.length} tokens, peak ${peak.toFixed(3)}`;
    this.showDetail(this.selected);
  }

  select(k) {
    const tokens = this.tokensEl.children;
    if (this.selected >= 0 && tokens[this.selected]) tokens[this.selected].classList.remove("selected");
    this.selected = k;
    if (tokens[k]) {
      tokens[k].classList.add("selected");
      tokens[k].scrollIntoView({ block: "nearest" });
      this.tokensEl.setAttribute("aria-activedescendant", tokens[k].id);
    }
    this.showDetail(k);
  }

  key(ev) {
    if (!this.result) return;
    const n = this.result.tokens.length;
    const moves = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 };
    let k = this.selected;
    if (ev.key in moves) k = Math.max(0, Math.min(n - 1, (k < 0 ? 0 : k + moves[ev.key])));
    else if (ev.key === "Home") k = 0;
    else if (ev.key === "End") k = n - 1;
    else return;
    ev.preventDefault();
    this.select(k);
  }

  showDetail(k) {
    if (!this.result || k < 0 || k >= this.result.tokens.length) {
      this.detailEl.replaceChildren();
      return;
    }
    const t = this.result.tokens[k];
    const sae = this.result.sae;
    const rows = t.features.slice(0, 8).map((f) => {
      const name = featureName({ sae, index: f.index, label: f.label });
      return el("li", {},
        el("span", { className: "grow" }, `${name}: ${f.activation.toFixed(3)}`),
        el("button", { type: "button", className: "small", "aria-label": `Colour by ${name}`, onclick: () => this.colourBy(sae, f.index, f.label) }, "Colour by"),
        el("button", { type: "button", className: "small", "aria-label": `Card of ${name}`, onclick: () => this.openCard(sae, f.index) }, "Card"));
    });
    this.detailEl.replaceChildren(
      el("p", {}, `Token ${k} `, el("code", {}, JSON.stringify(t.token)),
        ` (id ${t.token_id}): ${this.what} ${this.values[k].toFixed(3)}; top features`),
      el("ul", { className: "results" }, ...rows),
    );
  }
}

// GET /v1/saes/{sae}/features/{index} -> label, max activation, promoted / suppressed tokens.
export async function showFeatureCard(cardEl, sae, index, { addFeature }) {
  const info = await getJSON(featurePath(sae, index));
  const logits = info.top_logits || { promoted: [], suppressed: [] };
  const tokenList = (title, entries) => el("div", {},
    el("h4", {}, title),
    el("ol", { className: "logits" }, ...entries.map((e) =>
      el("li", {}, el("code", {}, JSON.stringify(e.token)), ` ${e.value >= 0 ? "+" : ""}${e.value.toFixed(3)}`))));
  const fmt = (v) => (v === null || v === undefined ? "unknown" : Number(v).toPrecision(4));
  const name = featureName(info);
  cardEl.replaceChildren(
    el("h3", {}, name),
    el("p", { className: "muted" }, info.explanation || "no explanation stored"),
    el("p", {}, `max activation ${fmt(info.max_activation)} · density ${fmt(info.density)}`),
    el("div", { className: "columns" }, tokenList("Promotes", logits.promoted), tokenList("Suppresses", logits.suppressed)),
    el("button", { type: "button", onclick: () => addFeature(sae, index, info.label) }, `Add ${name} to steering`),
  );
}
