// Wires the page: key, models, steering panel, generation, activations, feature card, errors.

import { getJSON, getKey, setKey } from "./api.js";
import { el, featureName } from "./dom.js";
import { SteeringPanel, refreshRegistry, wireRegistry } from "./steering.js";
import { ActivationView, showFeatureCard, streamPair } from "./view.js";

const $ = (id) => document.getElementById(id);
const ui = {
  error: $("error"),
  searchForm: $("search-form"), query: $("feature-query"), results: $("search-results"),
  indexForm: $("index-form"), indexSae: $("index-sae"), indexNumber: $("index-number"),
  vectorForm: $("vector-form"), vectorSelect: $("vector-select"),
  variantLoadForm: $("variant-load-form"), variantSelect: $("variant-select"),
  saveForm: $("variant-save-form"), variantId: $("variant-id"), saved: $("variant-saved"),
  model: $("model-select"), prompt: $("prompt"), colour: $("colour-feature"),
  stopFeature: $("stop-feature"), stopAbove: $("stop-above"),
};
const pinned = []; // features chosen to colour by from a token's list, beside the steered ones
let colourPick = null; // the colour-by option the user chose last

function showError(err) {
  ui.error.replaceChildren(
    el("span", {}, err.message || String(err)),
    el("button", { type: "button", className: "small", "aria-label": "Dismiss the error", onclick: clearError }, "Dismiss"),
  );
  ui.error.hidden = false;
  if (err.status === 401) $("api-key").focus();
}

function clearError() {
  ui.error.hidden = true;
  ui.error.replaceChildren();
}

async function guarded(fn) {
  clearError();
  try {
    await fn();
  } catch (err) {
    showError(err);
  }
}

function openCard(sae, index) {
  return guarded(() => showFeatureCard($("feature-card"), sae, index, { addFeature: (s, i, l) => panel.addFeature(s, i, l) }));
}

// Colour-by options: each steered feature, each pinned one, and "strongest feature" of each SAE.
function refreshColourOptions() {
  const seen = new Set();
  const options = [];
  for (const f of [...panel.features(), ...pinned]) {
    const value = `${f.sae}|${f.index}`;
    if (seen.has(value)) continue;
    seen.add(value);
    options.push(el("option", { value }, featureName(f)));
  }
  for (const opt of ui.indexSae.options) {
    options.push(el("option", { value: `${opt.value}|` }, `strongest feature of ${opt.value}`));
  }
  const stopPick = ui.stopFeature.value;
  const named = options.filter((o) => !o.value.endsWith("|")).map((o) => o.cloneNode(true));
  ui.stopFeature.replaceChildren(el("option", { value: "" }, "never"), ...named);
  if ([...ui.stopFeature.options].some((o) => o.value === stopPick)) ui.stopFeature.value = stopPick;
  ui.colour.replaceChildren(...options);
  // the user's pick while it exists; else the first steered feature, else the first SAE's strongest
  if ([...ui.colour.options].some((o) => o.value === colourPick)) ui.colour.value = colourPick;
}

// {stop_when: [condition]} from the "stop when" row, or {} when it says never.
function stopWhen() {
  if (!ui.stopFeature.value) return {};
  const [sae, index] = ui.stopFeature.value.split("|");
  const above = numberField("stop-above", "the stop threshold");
  if (above === undefined) throw new Error("give the stop threshold a number");
  return { stop_when: [{ feature: { sae, index: Number(index) }, above }] };
}

function chosenFeature() {
  const [sae, index] = (ui.colour.value || "|").split("|");
  return { sae, index: index === "" ? null : Number(index) };
}

const panel = new SteeringPanel($("steering-list"), $("steering-empty"), {
  onChange: refreshColourOptions,
  openCard,
});
const view = new ActivationView($("tokens"), $("token-detail"), $("activation-note"), {
  openCard,
  colourBy: (sae, index, label) => {
    pinned.push({ sae, index, label });
    colourPick = `${sae}|${index}`;
    refreshColourOptions();
    view.colour(chosenFeature());
  },
});
let lastInspected = null; // {request, sae, steering} of the text in the activation view
const variantOfModel = {}; // "model:variant" -> "variant", from /v1/models

function isChat() {
  return document.querySelector('input[name="mode"]:checked').value === "chat";
}

function numberField(id, name) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const value = Number(raw);
  if (!Number.isFinite(value)) throw new Error(`${name} must be a number, got "${raw}"`);
  return value;
}

async function generate() {
  const button = $("generate");
  if (button.disabled) return; // one generation at a time (Enter while one streams does nothing)
  const prompt = ui.prompt.value;
  if (!prompt.trim()) throw new Error("write a prompt first");
  const body = {
    model: ui.model.value || undefined,
    temperature: numberField("temperature", "temperature"),
    max_tokens: numberField("max-tokens", "max_tokens"),
    seed: numberField("seed", "seed"),
    return_unsteered: true,
    ...panel.request(),
    ...stopWhen(),
  };
  const chat = isChat();
  if (chat) body.messages = [{ role: "user", content: prompt }];
  else body.prompt = prompt;
  button.disabled = true;
  try {
    const path = chat ? "/v1/chat/completions" : "/v1/completions";
    const stops = { steered: $("stop-steered"), unsteered: $("stop-unsteered") };
    const out = await streamPair(path, body, $("out-steered"), $("out-unsteered"), stops);
    const text = out.steered ?? out.unsteered;
    const request = chat
      ? { messages: [...body.messages, { role: "assistant", content: text }] }
      : { text: prompt + text };
    const feature = chosenFeature();
    if (!feature.sae) return; // no SAE registered: nothing to read activations with
    lastInspected = { request, sae: feature.sae, steering: steeringOf(body) };
    await inspectLast(feature);
  } finally {
    button.disabled = false;
  }
}

// What steers a call as inspect's `generate` takes it: {steering, feature_logit_bias, variant}.
function steeringOf(body) {
  const variant = variantOfModel[body.model];
  const out = {};
  for (const key of ["steering", "feature_logit_bias"]) if (body[key]) out[key] = body[key];
  if (variant) out.variant = variant;
  return out;
}

async function inspectLast(feature) {
  lastInspected.sae = feature.sae;
  const steering = $("read-steered").checked ? lastInspected.steering : null;
  await view.inspect(lastInspected.request, feature.sae, feature, steering);
}

async function recolour() {
  const feature = chosenFeature();
  if (!lastInspected || !feature.sae) return;
  if (feature.sae !== lastInspected.sae) await inspectLast(feature);
  else view.colour(feature);
}

async function refreshModels() {
  const models = (await getJSON("/v1/models")).data;
  const current = ui.model.value;
  ui.model.replaceChildren(...models.map((m) => el("option", { value: m.id }, m.id)));
  if (models.some((m) => m.id === current)) ui.model.value = current;
  for (const m of models) if (m.parent) variantOfModel[m.id] = m.id.slice(m.parent.length + 1);
  const base = models.find((m) => !m.parent);
  $("model-name").textContent = base ? `serving ${base.id}` : "";
}

async function refreshAll() {
  await Promise.all([refreshModels(), refreshRegistry(ui)]);
  refreshColourOptions();
}

$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  setKey($("api-key").value.trim());
  guarded(refreshAll);
});
$("generate-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  guarded(generate);
});
ui.prompt.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    $("generate-form").requestSubmit();
  }
});
$("read-steered").addEventListener("change", () => guarded(async () => {
  if (lastInspected) await inspectLast(chosenFeature());
}));
ui.colour.addEventListener("change", () => {
  colourPick = ui.colour.value;
  guarded(recolour);
});
wireRegistry(panel, ui, {
  run: guarded,
  onSaved: async (id) => {
    await refreshAll();
    ui.variantSelect.value = id;
  },
});

$("api-key").value = getKey();
guarded(refreshAll);
