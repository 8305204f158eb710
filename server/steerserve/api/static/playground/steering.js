// The steering panel: the current set of interventions, feature search, stored vectors and variants,
// and saving the set as a variant. It only builds request fields; main.js sends them.

import { getJSON, postJSON } from "./api.js";
import { el, featureName } from "./dom.js";

// mode -> [slider min, slider max, default]; the number box beside the slider takes any value.
const FEATURE_MODES = {
  add: [-20, 20, 4],
  clamp: [0, 50, 5],
  scale: [-5, 10, 2],
  ablate: null,
  logit_bias: [-20, 20, 5],
};
const VECTOR_MODES = { add: [-20, 20, 4], project_out: null };
const MODE_TEXT = { logit_bias: "logit bias", project_out: "project out" };
const POSITIONS = ["all", "prompt", "generated"];
const ADD_SCALES = ["raw", "unit", "max_activation"];
const ABLATE_TO = ["zero", "mean", "resample"];

export class SteeringPanel {
  constructor(listEl, emptyEl, { onChange, openCard }) {
    this.listEl = listEl;
    this.emptyEl = emptyEl;
    this.items = [];
    this.onChange = onChange;
    this.openCard = openCard;
  }

  addFeature(sae, index, label, mode = "add") {
    const [, , value] = FEATURE_MODES[mode] || [0, 0, 0];
    this.items.push({ kind: "feature", sae, index, label, mode, value, positions: "all", scale: "raw", to: "zero" });
    this.render();
  }

  addVector(id, mode = "add", value = VECTOR_MODES.add[2]) {
    this.items.push({ kind: "vector", id, mode, value, positions: "all" });
    this.render();
  }

  // A variant's stored spec -> rows; what the panel has no controls for stays as a raw row.
  load(spec) {
    this.items = [];
    for (const s of spec.steering || []) this.items.push(rowOf(s));
    for (const b of spec.feature_logit_bias || []) {
      const f = b.feature || {};
      this.items.push({ kind: "feature", sae: f.sae, index: f.index, label: null, mode: "logit_bias", value: b.strength });
    }
    this.render();
    this.fetchLabels();
  }

  async fetchLabels() {
    let changed = false;
    for (const item of this.items) {
      if (item.kind !== "feature" || item.label) continue;
      try {
        const info = await getJSON(featurePath(item.sae, item.index));
        changed ||= Boolean(info.label);
        item.label = info.label;
      } catch (_) {
        // no label: the row keeps "sae #index"
      }
    }
    if (changed) this.render(); // only then: a re-render would drop the focus of a control in use
  }

  // {steering, feature_logit_bias} of the current set (only the non-empty ones).
  request() {
    const steering = [];
    const bias = [];
    for (const item of this.items) {
      if (item.kind === "raw") steering.push(item.json);
      else if (item.kind === "vector") steering.push(vectorIntervention(item));
      else if (item.mode === "logit_bias") bias.push({ feature: ref(item), strength: item.value });
      else steering.push(featureIntervention(item));
    }
    const out = {};
    if (steering.length) out.steering = steering;
    if (bias.length) out.feature_logit_bias = bias;
    return out;
  }

  features() {
    return this.items.filter((i) => i.kind === "feature");
  }

  render() {
    this.listEl.replaceChildren(...this.items.map((item, k) => this.row(item, k)));
    this.emptyEl.hidden = this.items.length > 0;
    this.onChange();
  }

  row(item, k) {
    const remove = el("button", { type: "button", className: "small", onclick: () => this.remove(k) }, "Remove");
    if (item.kind === "raw") {
      return el("li", { className: "steer-row" }, el("code", {}, JSON.stringify(item.json)), remove);
    }
    const name = item.kind === "vector" ? `vector ${item.id}` : featureName(item);
    remove.setAttribute("aria-label", `Remove ${name}`);
    const modes = item.kind === "vector" ? VECTOR_MODES : FEATURE_MODES;
    const select = el(
      "select",
      { "aria-label": `mode of ${name}`, onchange: () => this.setMode(item, select.value) },
      ...Object.keys(modes).map((m) => el("option", { value: m, selected: m === item.mode }, MODE_TEXT[m] || m)),
    );
    const head = el("div", { className: "row" }, el("strong", { className: "grow" }, name));
    if (item.kind === "feature") {
      const card = () => this.openCard(item.sae, item.index);
      head.append(el("button", { type: "button", className: "small", "aria-label": `Card of ${name}`, onclick: card }, "Card"));
    }
    head.append(remove);
    const controls = el("div", { className: "row" }, select);
    const range = modes[item.mode];
    if (range) controls.append(...this.valueInputs(item, range, name));
    const options = el("div", { className: "row" });
    if (item.mode !== "logit_bias") options.append(this.choice(item, "positions", POSITIONS, name));
    if (item.kind === "feature" && item.mode === "add") options.append(this.choice(item, "scale", ADD_SCALES, name));
    if (item.kind === "feature" && item.mode === "ablate") options.append(this.choice(item, "to", ABLATE_TO, name));
    return el("li", { className: "steer-row" }, head, controls, options);
  }

  // A labelled select of one option of the row (positions, add scale, ablate target).
  choice(item, key, values, name) {
    const select = el(
      "select",
      { "aria-label": `${key} of ${name}`, onchange: () => (item[key] = select.value) },
      ...values.map((v) => el("option", { value: v, selected: v === item[key] }, v.replace("_", " "))),
    );
    return el("label", { className: "muted" }, `${key} `, select);
  }

  valueInputs(item, [min, max], name) {
    const what = { add: "strength", clamp: "value", scale: "factor", logit_bias: "strength" }[item.mode];
    const slider = el("input", { type: "range", min, max, step: 0.1, value: item.value, "aria-label": `${what} of ${name}` });
    const box = el("input", { type: "number", step: "any", value: item.value, className: "num", "aria-label": `${what} of ${name} (number)` });
    slider.oninput = () => {
      item.value = Number(slider.value);
      box.value = slider.value;
    };
    box.onchange = () => {
      if (box.value === "" || !Number.isFinite(Number(box.value))) return;
      item.value = Number(box.value);
      slider.value = box.value;
    };
    return [el("span", { className: "muted" }, what), slider, box];
  }

  setMode(item, mode) {
    item.mode = mode;
    const range = (item.kind === "vector" ? VECTOR_MODES : FEATURE_MODES)[mode];
    if (range) item.value = range[2];
    this.render();
  }

  remove(k) {
    this.items.splice(k, 1);
    this.render();
  }
}

function ref(item) {
  return { sae: item.sae, index: item.index };
}

export function featurePath(sae, index) {
  return `/v1/saes/${encodeURIComponent(sae)}/features/${index}`;
}

// Options at their API defaults are left out, so a plain row sends the plain JSON.
function withOptions(out, item) {
  if (item.positions && item.positions !== "all") out.positions = item.positions;
  return out;
}

function featureIntervention(item) {
  const out = { feature: ref(item), mode: item.mode };
  if (item.mode === "add") out.strength = item.value;
  if (item.mode === "add" && item.scale && item.scale !== "raw") out.scale = item.scale;
  if (item.mode === "clamp") out.value = item.value;
  if (item.mode === "scale") out.factor = item.value;
  if (item.mode === "ablate" && item.to && item.to !== "zero") out.to = item.to;
  return withOptions(out, item);
}

function vectorIntervention(item) {
  const out = { vector: item.id, mode: item.mode };
  if (item.mode === "add") out.strength = item.value;
  return withOptions(out, item);
}

const VALUE_KEY = { add: "strength", clamp: "value", scale: "factor", ablate: null };

// A stored intervention -> an editable row when the panel has controls for all of it, else a raw row.
function rowOf(s) {
  const known = ["feature", "vector", "mode", "positions", VALUE_KEY[s.mode]];
  if (s.mode === "add") known.push("scale");
  if (s.mode === "ablate") known.push("to");
  const positions = s.positions || "all";
  const fits =
    Object.keys(s).every((k) => known.includes(k)) &&
    POSITIONS.includes(positions) &&
    ADD_SCALES.includes(s.scale || "raw") &&
    ABLATE_TO.includes(s.to || "zero");
  if (fits && s.feature && s.mode in VALUE_KEY) {
    const value = VALUE_KEY[s.mode] ? s[VALUE_KEY[s.mode]] : 0;
    const { sae, index } = s.feature;
    return { kind: "feature", sae, index, label: null, mode: s.mode, value, positions, scale: s.scale || "raw", to: s.to || "zero" };
  }
  if (fits && s.vector && (s.mode === "add" || s.mode === "project_out")) {
    return { kind: "vector", id: s.vector, mode: s.mode, value: s.strength ?? 0, positions };
  }
  return { kind: "raw", json: s };
}

// The search box, the by-index form, the vector and variant pickers, and the save form.
// `run(asyncFn)` runs a handler and shows what it throws.
export function wireRegistry(panel, ui, { onSaved, run }) {
  const on = (form, handler) =>
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      run(handler);
    });
  on(ui.searchForm, async () => {
    const q = ui.query.value.trim();
    if (!q) throw new Error("type part of a feature label to search for");
    const hits = (await getJSON(`/v1/features/search?q=${encodeURIComponent(q)}&limit=20`)).data;
    const items = hits.map((h) => {
      const add = () => panel.addFeature(h.sae, h.index, h.label);
      const name = featureName(h);
      return el("li", {}, el("span", { className: "grow" }, name),
        el("button", { type: "button", className: "small", "aria-label": `Add ${name}`, onclick: add }, "Add"));
    });
    if (!items.length) items.push(el("li", { className: "muted" }, `no feature label matches "${q}"`));
    ui.results.replaceChildren(...items);
  });
  on(ui.indexForm, async () => {
    if (!ui.indexSae.value) throw new Error("no SAE is registered on this server");
    panel.addFeature(ui.indexSae.value, Number(ui.indexNumber.value), null);
    await panel.fetchLabels();
  });
  on(ui.vectorForm, async () => {
    if (!ui.vectorSelect.value) throw new Error("no steering vector is stored on this server");
    panel.addVector(ui.vectorSelect.value);
  });
  on(ui.variantLoadForm, async () => {
    if (!ui.variantSelect.value) throw new Error("no variant is stored on this server");
    panel.load(await getJSON(`/v1/variants/${encodeURIComponent(ui.variantSelect.value)}`));
  });
  on(ui.saveForm, async () => {
    const id = ui.variantId.value.trim();
    if (!id) throw new Error("give the variant an id");
    const saved = await postJSON("/v1/variants", { id, ...panel.request() });
    ui.saved.textContent = `Saved variant "${saved.id}"; it is served as a model now.`;
    await onSaved(saved.id);
  });
}

// Fill the SAE, vector and variant pickers from the registry.
export async function refreshRegistry(ui) {
  const [saes, vectors, variants] = await Promise.all([
    getJSON("/v1/saes"), getJSON("/v1/vectors"), getJSON("/v1/variants"),
  ]);
  const options = (sel, data, text) => {
    sel.replaceChildren(...data.map((d) => el("option", { value: d.id }, text(d))));
    sel.disabled = data.length === 0;
  };
  options(ui.indexSae, saes.data, (s) => `${s.id} (${s.site}, ${s.d_sae})`);
  options(ui.vectorSelect, vectors.data, (v) => v.id);
  options(ui.variantSelect, variants.data, (v) => v.id);
}
