// What the page shows back: the two completion streams, the activation view and the feature card.

import { getJSON, postJSON, postStream } from "./api.js";
import { el, featureName, tokenText } from "./dom.js";
import { featurePath } from "./steering.js";

// Stream one call with return_unsteered; the steered choice goes left, its unsteered twin right.
// Returns {steered, unsteered} texts (steered is null when the call carried no steering) and `logprobs`
// ({steered, unsteered}: [{token, logprob, top: [token, logprob] | null}] when the body asked for them).
// A choice that `stop_when` ended gets a note under its text (`stopEls`: {steered, unsteered} elements).
export async function streamPair(path, body, outSteered, outUnsteered, stopEls = {}) {
  const texts = {};
  const logprobs = { steered: [], unsteered: [] };
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
        logprobs[key].push(...tokenLogprobs(choice.logprobs));
        if (choice.feature_stop && stopEls[key]) showStop(stopEls[key], choice.feature_stop);
      }
    });
  } finally {
    outSteered.classList.remove("running");
    outUnsteered.classList.remove("running");
  }
  if (!steeredSeen) outSteered.textContent = "(nothing steers this call: see the unsteered completion)";
  return { steered: steeredSeen ? texts.steered || "" : null, unsteered: texts.unsteered || "", logprobs };
}

// One streamed chunk's logprobs, completions shape ({tokens, token_logprobs, top_logprobs}) or chat
// shape ({content: [{token, logprob, top_logprobs}]}) -> [{token, logprob, top}].
function tokenLogprobs(lp) {
  if (!lp) return [];
  if (lp.content) {
    return lp.content.map((c) => ({ token: c.token, logprob: c.logprob, top: c.top_logprobs?.length ? [c.top_logprobs[0].token, c.top_logprobs[0].logprob] : null }));
  }
  return (lp.tokens || []).map((token, k) => {
    const top = Object.entries((lp.top_logprobs || [])[k] || {})[0] || null;
    return { token, logprob: lp.token_logprobs[k], top };
  });
}

// Each generated token with its log-probability (the title: its probability and the likeliest token
// there); the less likely the sampled token, the stronger its tint.
export function showLogprobs(box, summary, entries) {
  const mean = entries.length ? entries.reduce((a, e) => a + e.logprob, 0) / entries.length : 0;
  summary.textContent = entries.length ? `log-probs: mean ${mean.toFixed(2)} over ${entries.length} tokens` : "log-probs";
  box.replaceChildren(...entries.map((e) => {
    const top = e.top ? `; likeliest ${JSON.stringify(e.top[0])} ${e.top[1].toFixed(3)}` : "";
    const span = el("span", {
      className: "token lp", "data-logprob": e.logprob.toFixed(4),
      title: `${JSON.stringify(e.token)} log-prob ${e.logprob.toFixed(3)} (p ${Math.exp(e.logprob).toFixed(3)})${top}`,
    }, tokenText(e.token));
    span.style.setProperty("--alpha", (1 - Math.exp(e.logprob)).toFixed(3));
    return span;
  }));
}

// Stream one call of one choice into `outEl`: {text, logprobs}; a stop_when stop shows in `stopEl`.
export async function streamOne(path, body, outEl, stopEl) {
  let text = "";
  const logprobs = [];
  if (stopEl) stopEl.hidden = true;
  outEl.textContent = "";
  outEl.classList.add("running");
  try {
    await postStream(path, body, (event) => {
      for (const choice of event.choices || []) {
        text += choice.text ?? (choice.delta && choice.delta.content) ?? "";
        outEl.textContent = text;
        logprobs.push(...tokenLogprobs(choice.logprobs));
        if (choice.feature_stop && stopEl) showStop(stopEl, choice.feature_stop);
      }
    });
  } finally {
    outEl.classList.remove("running");
  }
  return { text, logprobs };
}

function showStop(note, stop) {
  const bound = stop.above !== undefined ? `above ${stop.above}` : `below ${stop.below}`;
  const f = stop.feature || {};
  note.textContent = `stopped by stop_when: ${f.sae} #${f.index} was ${Number(stop.activation).toFixed(3)} ` +
    `(${bound}) at token ${JSON.stringify(stop.token)}, position ${stop.position}`;
  note.hidden = false;
}

// The tokens of the steered text and of its unsteered twin, coloured by one feature on one scale (the
// peak over both texts, shown in the legend), with the hovered or selected token's top features shown
// in `detailEl`. Arrow keys move the selection in the steered text when its token box has focus.
export class ActivationView {
  constructor(tokensEl, twinEl, legendEl, detailEl, noteEl, { openCard, colourBy }) {
    this.tokensEl = tokensEl;
    this.twinEl = twinEl;
    this.legendEl = legendEl;
    this.detailEl = detailEl;
    this.noteEl = noteEl;
    this.openCard = openCard;
    this.colourBy = colourBy;
    this.result = null;
    this.twin = null;
    this.selected = -1;
    tokensEl.addEventListener("keydown", (ev) => this.key(ev));
    tokensEl.addEventListener("mouseleave", () => this.showDetail(this.selected));
    twinEl.addEventListener("mouseleave", () => this.showDetail(this.selected));
  }

  // POST /v1/inspect for `request` ({text} or {messages}) with SAE `sae`, and for `twinRequest` (the
  // unsteered completion, read unsteered, as it was generated; null: none), then colour by `feature`.
  // With `steering` ({steering, feature_logit_bias}) the steered text is read with it applied, as during
  // the generation: inspect's `generate` steers every position; its one generated token is dropped.
  async inspect(request, twinRequest, sae, feature, steering) {
    this.noteEl.textContent = "reading activations...";
    const body = { ...request, sae, top_k: 64 };
    if (steering && Object.keys(steering).length) body.generate = { max_tokens: 1, ...steering };
    const [result, twin] = await Promise.all([
      postJSON("/v1/inspect", body),
      twinRequest ? postJSON("/v1/inspect", { ...twinRequest, sae, top_k: 64 }) : null,
    ]);
    result.tokens = result.tokens.filter((t) => !t.generated);
    result.steered = Boolean(body.generate);
    this.result = result;
    this.twin = twin;
    this.selected = -1;
    this.colour(feature);
  }

  // feature = {sae, index} or {sae, index: null} for "each token's strongest feature".
  colour(feature) {
    if (!this.result) return;
    const act = (t) => {
      if (feature.index === null) return t.features.length ? t.features[0].activation : 0;
      const f = t.features.find((x) => x.index === feature.index);
      return f ? f.activation : 0;
    };
    const values = this.result.tokens.map(act);
    const twinValues = this.twin ? this.twin.tokens.map(act) : [];
    const peak = Math.max(...values.map(Math.abs), ...twinValues.map(Math.abs), 1e-9);
    this.tokensEl.replaceChildren(...this.spans(this.result.tokens, values, peak, "token"));
    this.twinEl.replaceChildren(...this.spans(this.twin ? this.twin.tokens : [], twinValues, peak, "twin"));
    this.twinEl.hidden = !this.twin;
    this.values = values;
    this.twinValues = twinValues;
    this.what = feature.index === null ? `strongest feature of ${this.result.sae}` : `${this.result.sae} #${feature.index}`;
    const what = feature.index === null ? `each token's ${this.what}` : this.what;
    const active = values.filter((v) => v > 0).length;
    const how = this.result.steered ? "read with the steering applied" : "read unsteered";
    this.noteEl.textContent = `${what}, ${how}: active on ${active} of ${values.length} tokens, peak ${Math.max(...values.map(Math.abs), 0).toFixed(3)}`;
    this.legendEl.replaceChildren(
      el("span", {}, "0"), el("span", { className: "ramp", "aria-hidden": "true" }),
      el("span", {}, `${peak.toFixed(3)}: one scale for both texts`));
    this.showDetail(this.selected);
  }

  spans(tokens, values, peak, prefix) {
    return tokens.map((t, k) => {
      const span = el("span", {
        id: `${prefix}-${k}`,
        className: "token" + (t.special ? " special" : "") + (prefix === "token" && k === this.selected ? " selected" : ""),
        "data-activation": values[k].toFixed(4),
        title: `${JSON.stringify(t.token)}  activation ${values[k].toFixed(3)}`,
      }, tokenText(t.token));
      span.style.setProperty("--alpha", Math.min(1, Math.abs(values[k]) / peak).toFixed(3));
      span.addEventListener("mouseover", () => this.showDetail(k, prefix === "twin"));
      if (prefix === "token") span.addEventListener("click", () => this.select(k));
      return span;
    });
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

  // Token k of the steered text (of the unsteered twin with `twin`): its value and top features.
  showDetail(k, twin = false) {
    const result = twin ? this.twin : this.result;
    if (!result || k < 0 || k >= result.tokens.length) {
      this.detailEl.replaceChildren();
      return;
    }
    const t = result.tokens[k];
    const sae = this.result.sae;
    const rows = t.features.slice(0, 8).map((f) => {
      const name = featureName({ sae, index: f.index, label: f.label });
      return el("li", {},
        el("span", { className: "grow" }, `${name}: ${f.activation.toFixed(3)}`),
        el("button", { type: "button", className: "small", "aria-label": `Colour by ${name}`, onclick: () => this.colourBy(sae, f.index, f.label) }, "Colour by"),
        el("button", { type: "button", className: "small", "aria-label": `Card of ${name}`, onclick: () => this.openCard(sae, f.index) }, "Card"));
    });
    const value = (twin ? this.twinValues : this.values)[k];
    this.detailEl.replaceChildren(
      el("p", {}, `${twin ? "Unsteered token" : "Token"} ${k} `, el("code", {}, JSON.stringify(t.token)),
        ` (id ${t.token_id}): ${this.what} ${value.toFixed(3)}; top features`),
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
    el("button", { type: "button", onclick: () => addFeature(sae, index, info.label, info) }, `Add ${name} to steering`),
  );
}
