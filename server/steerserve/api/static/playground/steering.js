// The steering panel: the current set of interventions as editable rows (a loaded variant as one
// collapsible group), and the request fields they make. It only builds request fields; main.js sends them.

import { getJSON } from "./api.js";
import { el, featureName } from "./dom.js";

// [slider min, slider max, slider step, default]; the number box beside the slider takes any value.
// An added feature's strength follows its `scale`: in units of its recorded max activation by default,
// so one number suits every feature (4 x max activation: measured on the demo, see tests/playground).
const ADD_RANGE = {
  max_activation: [-10, 10, 0.25, 4],
  raw: [-20, 20, 0.5, 4],
  unit: [-20, 20, 0.5, 4],
};
const FEATURE_MODES = {
  add: ADD_RANGE.raw,
  clamp: [0, 50, 0.5, 5],
  scale: [-5, 10, 0.25, 2],
  ablate: null,
  logit_bias: [-20, 20, 0.5, 5],
};
const VECTOR_MODES = { add: [-20, 20, 0.5, 4], project_out: null };
const MODE_TEXT = { logit_bias: "logit bias", project_out: "project out" };
const POSITIONS = ["all", "prompt", "generated"];
const ADD_SCALES = ["raw", "unit", "max_activation"];
const ABLATE_TO = ["zero", "mean", "resample"];
export const DEFAULT_SCALE = "max_activation";

let nextUid = 1; // each row's stable id: focus and highlight survive a re-render

export class SteeringPanel {
  constructor(listEl, emptyEl, noteEl, { onChange, openCard }) {
    this.listEl = listEl;
    this.emptyEl = emptyEl;
    this.noteEl = noteEl;
    this.items = [];
    this.multiplier = 1; // the global strength multiplier (add strengths and logit biases)
    this.openGroups = new Set(); // variant groups the user unfolded: a re-render keeps them open
    this.onChange = onChange;
    this.openCard = openCard;
  }

  // Add feature `index` of `sae` in `mode`. `info` is its card (GET .../features/{index}) when the
  // caller has it; else it is fetched, for the max activation the default strength is scaled by.
  async addFeature(sae, index, label, info = null, mode = "add") {
    const same = this.items.find((i) => i.kind === "feature" && !i.group && i.sae === sae && i.index === index && i.mode === mode);
    if (same) {
      this.note(`${featureName(same)} is already in the set (${mode}): its row is highlighted; change its strength there.`);
      this.render(null, same.uid); // the focus stays on the Add pressed: several can be added in a row
      return same;
    }
    if (!info) {
      try {
        info = await getJSON(featurePath(sae, index));
      } catch (_) {
        info = {}; // unknown feature: the server says so on Generate
      }
    }
    const maxAct = info.max_activation ?? null;
    const scale = mode === "add" && maxAct ? DEFAULT_SCALE : "raw";
    const [, , , value] = mode === "add" ? ADD_RANGE[scale] : FEATURE_MODES[mode] || [0, 0, 0, 0];
    const item = { uid: nextUid++, kind: "feature", sae, index, label: label ?? info.label ?? null, mode, value, positions: "all", scale, to: "zero", maxAct };
    this.items.push(item);
    this.note(mode === "add" && !maxAct ? `${featureName(item)} has no recorded max activation: its strength is raw (x decoder row).` : "");
    this.render(null, item.uid);
    return item;
  }

  addVector(id, mode = "add", value = VECTOR_MODES.add[3]) {
    const item = { uid: nextUid++, kind: "vector", id, mode, value, positions: "all" };
    this.items.push(item);
    this.note("");
    this.render(null, item.uid);
  }

  // A variant's stored spec -> one group of rows (replacing the set); what the panel has no controls
  // for stays as a raw row.
  load(spec, name) {
    this.items = [];
    for (const s of spec.steering || []) this.items.push({ ...rowOf(s), uid: nextUid++, group: name });
    for (const b of spec.feature_logit_bias || []) {
      const f = b.feature || {};
      this.items.push({ uid: nextUid++, kind: "feature", sae: f.sae, index: f.index, label: null, mode: "logit_bias", value: b.strength, group: name });
    }
    this.note(`Loaded variant "${name}" (${this.items.length} interventions) as one group; open it to edit its rows.`);
    this.render();
    this.fetchLabels();
  }

  // Replace the whole set (a run restored from its link).
  restore(items) {
    this.items = items.map((i) => ({ ...i, uid: nextUid++ }));
    this.render();
  }

  async fetchLabels() {
    let changed = false;
    for (const item of this.items) {
      if (item.kind !== "feature" || item.label) continue;
      try {
        const info = await getJSON(featurePath(item.sae, item.index));
        changed ||= Boolean(info.label);
        item.label = info.label;
        item.maxAct = info.max_activation ?? null;
      } catch (_) {
        // no label: the row keeps "sae #index"
      }
    }
    if (changed) this.render(); // only then: a re-render would drop the focus of a control in use
  }

  // {steering, feature_logit_bias} of the current set (only the non-empty ones), add strengths and
  // logit biases times the global multiplier.
  request() {
    const steering = [];
    const bias = [];
    const m = this.multiplier;
    for (const item of this.items) {
      if (item.kind === "raw") steering.push(item.json);
      else if (item.kind === "vector") steering.push(vectorIntervention(item, m));
      else if (item.mode === "logit_bias") bias.push({ feature: ref(item), strength: item.value * m });
      else steering.push(featureIntervention(item, m));
    }
    const out = {};
    if (steering.length) out.steering = steering;
    if (bias.length) out.feature_logit_bias = bias;
    return out;
  }

  features() {
    return this.items.filter((i) => i.kind === "feature");
  }

  note(text) {
    this.noteEl.textContent = text;
    this.noteEl.hidden = !text;
  }

  // Re-render; then focus the control `focusKey` ("uid:what") and flash row `flashUid` into view.
  render(focusKey = null, flashUid = null) {
    const nodes = [];
    for (let k = 0; k < this.items.length; k++) {
      const group = this.items[k].group;
      if (!group) {
        nodes.push(this.row(this.items[k]));
        continue;
      }
      let end = k;
      while (end + 1 < this.items.length && this.items[end + 1].group === group) end++;
      nodes.push(this.groupRow(group, this.items.slice(k, end + 1)));
      k = end;
    }
    this.listEl.replaceChildren(...nodes);
    this.emptyEl.hidden = this.items.length > 0;
    this.onChange();
    if (flashUid !== null) {
      const row = this.listEl.querySelector(`[data-uid="${flashUid}"]`);
      if (row) {
        row.classList.add("flash");
        row.scrollIntoView({ block: "nearest" });
      }
    }
    if (focusKey) {
      const target = this.listEl.querySelector(`[data-focus="${focusKey}"]`);
      if (target) target.focus();
    }
  }

  groupRow(name, items) {
    const removeAll = el("button", {
      type: "button", className: "small", "aria-label": `Remove variant group ${name}`,
      onclick: () => this.removeWhere((i) => items.includes(i)),
    }, "Remove group");
    const details = el("details", { open: this.openGroups.has(name) },
        el("summary", {}, `variant ${name}: ${items.length} interventions`),
        el("ul", { className: "steering-list" }, ...items.map((i) => this.row(i))));
    details.addEventListener("toggle", () => (details.open ? this.openGroups.add(name) : this.openGroups.delete(name)));
    return el("li", { className: "steer-group" }, details, removeAll);
  }

  row(item) {
    const uid = item.uid;
    const remove = el("button", { type: "button", className: "small", "data-focus": `${uid}:remove`, onclick: () => this.removeWhere((i) => i === item) }, "Remove");
    if (item.kind === "raw") {
      remove.setAttribute("aria-label", `Remove ${JSON.stringify(item.json)}`);
      return el("li", { className: "steer-row", "data-uid": uid }, el("code", {}, JSON.stringify(item.json)), remove);
    }
    const name = item.kind === "vector" ? `vector ${item.id}` : featureName(item);
    remove.setAttribute("aria-label", `Remove ${name}`);
    const modes = item.kind === "vector" ? VECTOR_MODES : FEATURE_MODES;
    const select = el(
      "select",
      { "aria-label": `mode of ${name}`, "data-focus": `${uid}:mode`, onchange: () => this.setMode(item, select.value) },
      ...Object.keys(modes).map((m) => el("option", { value: m, selected: m === item.mode }, MODE_TEXT[m] || m)),
    );
    const head = el("div", { className: "row" }, el("strong", { className: "grow name" }, name));
    if (item.kind === "feature") {
      const card = () => this.openCard(item.sae, item.index);
      head.append(el("button", { type: "button", className: "small", "aria-label": `Card of ${name}`, onclick: card }, "Card"));
    }
    head.append(remove);
    const controls = el("div", { className: "row" }, select);
    const range = item.kind === "feature" && item.mode === "add" ? ADD_RANGE[item.scale] || ADD_RANGE.raw : modes[item.mode];
    if (range) controls.append(...this.valueInputs(item, range, name));
    const options = el("div", { className: "row" });
    if (item.mode !== "logit_bias") options.append(this.choice(item, "positions", POSITIONS, name));
    if (item.kind === "feature" && item.mode === "add") options.append(this.choice(item, "scale", ADD_SCALES, name));
    if (item.kind === "feature" && item.mode === "ablate") options.append(this.choice(item, "to", ABLATE_TO, name));
    const basis = item.kind === "feature" && item.mode === "add" ? scaleBasis(item) : null;
    return el("li", { className: "steer-row", "data-uid": uid }, head, controls, options,
      basis && el("p", { className: "muted basis" }, basis));
  }

  // A labelled select of one option of the row (positions, add scale, ablate target).
  choice(item, key, values, name) {
    const select = el(
      "select",
      { "aria-label": `${key} of ${name}`, "data-focus": `${item.uid}:${key}`, onchange: () => {
        item[key] = select.value;
        if (key === "scale") this.render(`${item.uid}:scale`); // the slider's range follows the scale
      } },
      ...values.map((v) => el("option", { value: v, selected: v === item[key] }, v.replace("_", " "))),
    );
    return el("label", { className: "muted" }, `${key} `, select);
  }

  valueInputs(item, [min, max, step], name) {
    const what = { add: "strength", clamp: "value", scale: "factor", logit_bias: "strength" }[item.mode];
    const slider = el("input", { type: "range", min, max, step, value: item.value, "aria-label": `${what} of ${name}`, "data-focus": `${item.uid}:value` });
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
    const range = mode === "add" && item.kind === "feature" ? ADD_RANGE[item.scale] : (item.kind === "vector" ? VECTOR_MODES : FEATURE_MODES)[mode];
    if (range) item.value = range[3];
    this.render(`${item.uid}:mode`); // keep the focus on the mode menu the user just changed
  }

  // Remove the rows `pred` picks; the focus moves to the next row's Remove (else the previous one's,
  // else the search box), never to the page's top.
  removeWhere(pred) {
    const first = this.items.findIndex(pred);
    this.items = this.items.filter((i) => !pred(i));
    this.note("");
    const next = this.items[first] || this.items[first - 1];
    this.render(next ? `${next.uid}:remove` : null);
    if (!this.listEl.contains(document.activeElement)) document.getElementById("feature-query").focus();
  }
}

// What an add row's strength is in units of, as the row says it.
function scaleBasis(item) {
  if (item.scale === "max_activation") {
    if (!item.maxAct) return "x its recorded max activation (none recorded: the server will refuse this)";
    return `x its recorded max activation ${Number(item.maxAct).toPrecision(4)} (= ${(item.value * item.maxAct).toPrecision(3)} x decoder row)`;
  }
  if (item.scale === "unit") return "x the unit decoder direction";
  return "x the raw decoder row";
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

function featureIntervention(item, multiplier = 1) {
  const out = { feature: ref(item), mode: item.mode };
  if (item.mode === "add") out.strength = item.value * multiplier;
  if (item.mode === "add" && item.scale && item.scale !== "raw") out.scale = item.scale;
  if (item.mode === "clamp") out.value = item.value;
  if (item.mode === "scale") out.factor = item.value;
  if (item.mode === "ablate" && item.to && item.to !== "zero") out.to = item.to;
  return withOptions(out, item);
}

function vectorIntervention(item, multiplier = 1) {
  const out = { vector: item.id, mode: item.mode };
  if (item.mode === "add") out.strength = item.value * multiplier;
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
