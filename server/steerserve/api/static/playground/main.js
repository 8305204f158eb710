// Wires the page: key, models, steering panel, generation, comparison, run links, activations,
// feature card, errors.

import { getJSON, getKey, setKey } from "./api.js";
import { Conversations, streamTurn } from "./chat.js";
import { showComparison } from "./compare.js";
import { el, featureName } from "./dom.js";
import { refreshRegistry, wireRegistry } from "./search.js";
import { runFromLocation, runLink } from "./share.js";
import { SteeringPanel } from "./steering.js";
import { wireVariants } from "./variants.js";
import { ActivationView, showFeatureCard, showLogprobs, streamPair } from "./view.js";

const $ = (id) => document.getElementById(id);
const ui = {
  error: $("error"),
  searchForm: $("search-form"), query: $("feature-query"), searchKind: $("search-kind"), results: $("search-results"),
  indexForm: $("index-form"), indexSae: $("index-sae"), indexNumber: $("index-number"),
  vectorForm: $("vector-form"), vectorSelect: $("vector-select"),
  variantLoadForm: $("variant-load-form"), variantSelect: $("variant-select"),
  saveForm: $("variant-save-form"), variantId: $("variant-id"), saved: $("variant-saved"),
  variantDelete: $("variant-delete"), variantExport: $("variant-export"), variantOut: $("variant-out"),
  variantOverwrite: $("variant-overwrite"),
  model: $("model-select"), modelNote: $("model-note"), prompt: $("prompt"), colour: $("colour-feature"),
  stopFeature: $("stop-feature"), stopAbove: $("stop-above"),
  multiplier: $("multiplier"), multiplierSlider: $("multiplier-slider"),
  compareNote: $("compare-note"), runLink: $("run-link"), shareNote: $("share-note"),
};
const pinned = []; // features chosen to colour by from a token's list, beside the steered ones
let colourPick = null; // the colour-by option the user chose last
let pendingStop = null; // a restored run's stop feature, chosen once it is listed

// The index box of "stop when" shows only for "another feature (by index)".
function showStopIndex() {
  const other = ui.stopFeature.value === "other";
  $("stop-index").hidden = !other;
  document.querySelector('label[for="stop-index"]').hidden = !other;
}

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
  return guarded(() => showFeatureCard($("feature-card"), sae, index, {
    addFeature: (s, i, l, info) => panel.addFeature(s, i, l, info),
  }));
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
  const other = ui.indexSae.value ? [el("option", { value: "other" }, `another feature of ${ui.indexSae.value} (by index)`)] : [];
  ui.stopFeature.replaceChildren(el("option", { value: "" }, "never"), ...named, ...other);
  const keep = pendingStop || stopPick;
  if ([...ui.stopFeature.options].some((o) => o.value === keep)) ui.stopFeature.value = keep;
  if (ui.stopFeature.value === pendingStop) pendingStop = null;
  showStopIndex();
  ui.colour.replaceChildren(...options);
  // the user's pick while it exists; else the first steered feature, else the first SAE's strongest
  if ([...ui.colour.options].some((o) => o.value === colourPick)) ui.colour.value = colourPick;
}

// {stop_when: [condition]} from the "stop when" row, or {} when it says never.
function stopWhen() {
  if (!ui.stopFeature.value) return {};
  let [sae, index] = ui.stopFeature.value.split("|");
  if (ui.stopFeature.value === "other") [sae, index] = [ui.indexSae.value, numberField("stop-index", "the stop feature index")];
  const above = numberField("stop-above", "the stop threshold");
  if (above === undefined) throw new Error("give the stop threshold a number");
  if (index === undefined) throw new Error("give the stop feature an index");
  return { stop_when: [{ feature: { sae, index: Number(index) }, above }] };
}

function chosenFeature() {
  const [sae, index] = (ui.colour.value || "|").split("|");
  return { sae, index: index === "" ? null : Number(index) };
}

const panel = new SteeringPanel($("steering-list"), $("steering-empty"), $("steering-note"), {
  onChange: refreshColourOptions,
  openCard,
});
const view = new ActivationView($("tokens"), $("tokens-twin"), $("activation-legend"), $("token-detail"), $("activation-note"), {
  openCard,
  colourBy: (sae, index, label) => {
    pinned.push({ sae, index, label });
    colourPick = `${sae}|${index}`;
    refreshColourOptions();
    view.colour(chosenFeature());
    $("tokens").focus(); // the button that was clicked is gone with the re-rendered detail
  },
});
const conversations = new Conversations({ steered: $("transcript-steered"), unsteered: $("transcript-unsteered") });

function showChatControls() {
  $("chat-controls").hidden = !isChat();
}

let lastInspected = null; // {request, sae, steering} of the text in the activation view
let lastRun = null; // what a link to the last run carries (share.js)
let pendingModel = null; // a restored run's model, chosen once the model list is in
const variantOfModel = {}; // "model:variant" -> "variant", from /v1/models
const parentOfModel = {}; // "model:variant" -> "model"

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
    ...(isChat() ? { logprobs: true, top_logprobs: 1 } : { logprobs: 1 }), // per-token, for both texts
    ...stopWhen(),
  };
  const chat = isChat();
  const continued = chat && $("chat-continue").checked;
  if (!continued) conversations.reset(); // one turn: the conversation starts again
  if (!chat) body.prompt = prompt;
  button.disabled = true;
  ui.compareNote.hidden = true;
  try {
    const path = chat ? "/v1/chat/completions" : "/v1/completions";
    const stops = { steered: $("stop-steered"), unsteered: $("stop-unsteered") };
    const outs = { steered: $("out-steered"), unsteered: $("out-unsteered") };
    const base = parentOfModel[body.model] || body.model;
    const out = chat
      ? await streamTurn(path, body, base, conversations, prompt, outs, stops)
      : await streamPair(path, body, outs.steered, outs.unsteered, stops);
    if (chat) conversations.push(prompt, out.steered, out.unsteered);
    showComparison($("out-steered"), $("out-unsteered"), ui.compareNote, out);
    for (const key of ["steered", "unsteered"]) showLogprobs($(`lp-${key}`), $(`lp-${key}-summary`), out.logprobs[key]);
    lastRun = runState({ steered: out.steered, unsteered: out.unsteered }); // a link carries the texts only
    ui.runLink.hidden = true;
    ui.shareNote.hidden = true;
    // the address bar's run is not this one any more: a reload must not bring it back
    if (window.location.hash) history.replaceState(null, "", window.location.pathname + window.location.search);
    if (continued) ui.prompt.value = ""; // the next turn's message goes here
    const textOf = (side, completion) => (chat ? { messages: conversations.history(side) } : { text: prompt + completion });
    const request = textOf("steered", out.steered ?? out.unsteered);
    const twinRequest = out.steered === null ? null : textOf("unsteered", out.unsteered);
    const feature = chosenFeature();
    if (!feature.sae) return; // no SAE registered: nothing to read activations with
    lastInspected = { request, twinRequest, sae: feature.sae, steering: steeringOf(body) };
    await inspectLast(feature);
  } finally {
    button.disabled = false;
  }
}

// Everything a link needs to show this run again and rerun it (share.js).
function runState(out) {
  return {
    model: ui.model.value, chat: isChat(), prompt: ui.prompt.value,
    temperature: $("temperature").value, max_tokens: $("max-tokens").value, seed: $("seed").value,
    stop: { feature: ui.stopFeature.value, index: $("stop-index").value, above: ui.stopAbove.value },
    multiplier: panel.multiplier, items: JSON.parse(JSON.stringify(panel.items)), out,
    turns: isChat() ? JSON.parse(JSON.stringify(conversations.turns)) : [], continued: $("chat-continue").checked,
  };
}

function restoreRun(run) {
  pendingModel = run.model || null;
  document.querySelector(`input[name="mode"][value="${run.chat ? "chat" : "completion"}"]`).checked = true;
  ui.prompt.value = run.prompt ?? "";
  $("temperature").value = run.temperature ?? "";
  $("max-tokens").value = run.max_tokens ?? "";
  $("seed").value = run.seed ?? "";
  setMultiplier(run.multiplier ?? 1);
  panel.restore(run.items);
  conversations.reset(run.turns || []);
  $("chat-continue").checked = Boolean(run.chat && run.continued);
  if (run.chat && run.continued) ui.prompt.value = ""; // a continued chat goes on from its last turn
  showChatControls();
  ui.stopAbove.value = run.stop?.above ?? "1";
  $("stop-index").value = run.stop?.index ?? "0";
  pendingStop = run.stop?.feature || null; // "other" is listed once the SAEs are in
  if (pendingStop) ui.stopFeature.value = pendingStop;
  showStopIndex();
  showComparison($("out-steered"), $("out-unsteered"), ui.compareNote, run.out || {});
  lastRun = run;
  ui.shareNote.textContent = run.chat && run.continued
    ? "A saved chat, from its link: the replies are as saved. Write the next message to go on with both sides."
    : "A saved run, from its link: the outputs are as saved. Generate reruns it with the same seed.";
  ui.shareNote.hidden = false;
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
  await view.inspect(lastInspected.request, lastInspected.twinRequest, feature.sae, feature, steering);
}

async function recolour() {
  const feature = chosenFeature();
  if (!lastInspected || !feature.sae) return;
  if (feature.sae !== lastInspected.sae) await inspectLast(feature);
  else view.colour(feature);
}

async function refreshModels() {
  const models = (await getJSON("/v1/models")).data;
  const current = pendingModel || ui.model.value;
  ui.model.replaceChildren(...models.map((m) => el("option", { value: m.id }, m.id)));
  if (models.some((m) => m.id === current)) ui.model.value = current;
  pendingModel = null;
  for (const m of models) {
    if (!m.parent) continue;
    variantOfModel[m.id] = m.id.slice(m.parent.length + 1);
    parentOfModel[m.id] = m.parent;
  }
  return models.find((m) => !m.parent);
}

// "serving <model>" is shown once the pickers are filled too: the page is ready to use then.
async function refreshAll() {
  const [base] = await Promise.all([refreshModels(), refreshRegistry(ui)]);
  refreshColourOptions();
  $("model-name").textContent = base ? `serving ${base.id}` : "";
}

// A variant applied twice (its model chosen and its rows loaded) would double every edit: loading
// rows switches the model back to the base, and says so.
function onVariantLoaded(id) {
  const variant = variantOfModel[ui.model.value];
  if (!variant) return;
  const base = parentOfModel[ui.model.value];
  ui.model.value = base;
  ui.modelNote.textContent = `Model set to ${base}: model ${base}:${variant} applies variant "${variant}" itself, ` +
    `and the loaded rows of "${id}" would come on top of it.`;
  ui.modelNote.hidden = false;
}

function setMultiplier(value) {
  panel.multiplier = value;
  ui.multiplier.value = String(value);
  ui.multiplierSlider.value = String(value);
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
document.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey) && !ev.defaultPrevented) {
    ev.preventDefault();
    $("generate-form").requestSubmit();
  }
});
ui.model.addEventListener("change", () => (ui.modelNote.hidden = true));
ui.stopFeature.addEventListener("change", showStopIndex);
for (const radio of document.querySelectorAll('input[name="mode"]')) radio.addEventListener("change", showChatControls);
$("chat-new").addEventListener("click", () => {
  conversations.reset();
  for (const id of ["out-steered", "out-unsteered"]) $(id).textContent = "";
  ui.compareNote.hidden = true;
  ui.prompt.focus();
});
ui.multiplier.addEventListener("change", () => {
  const value = Number(ui.multiplier.value);
  if (ui.multiplier.value.trim() !== "" && Number.isFinite(value)) setMultiplier(value);
});
ui.multiplierSlider.addEventListener("input", () => setMultiplier(Number(ui.multiplierSlider.value)));
$("read-steered").addEventListener("change", () => guarded(async () => {
  if (lastInspected) await inspectLast(chosenFeature());
}));
ui.colour.addEventListener("change", () => {
  colourPick = ui.colour.value;
  guarded(recolour);
});
$("share-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  guarded(async () => {
    if (!lastRun) throw new Error("generate first: a link carries a run's prompt, settings, steering and outputs");
    const link = runLink(lastRun);
    history.replaceState(null, "", link);
    ui.runLink.value = link;
    ui.runLink.hidden = false;
    ui.runLink.select();
    ui.shareNote.textContent = "The link holds the prompt, settings, steering and both outputs (nothing is stored on the server).";
    ui.shareNote.hidden = false;
  });
});
// the id pattern blocks the submit before any handler: say why, in place of an older unrelated error
ui.variantId.addEventListener("invalid", () => showError(new Error(
  `variant id "${ui.variantId.value}": use letters, digits, . _ - (starting with a letter or digit)`)));
wireRegistry(panel, ui, { run: guarded, openCard });
wireVariants(panel, ui, {
  run: guarded,
  onLoaded: onVariantLoaded,
  onChanged: async (id) => {
    await refreshAll();
    if (id) ui.variantSelect.value = id;
  },
});

// a phone: the prompt and outputs first, the settings folded away
if (window.matchMedia("(max-width: 600px)").matches) {
  $("settings").open = false;
  $("more-steering").open = false;
}
$("api-key").value = getKey();
guarded(async () => {
  const run = runFromLocation();
  if (run) restoreRun(run);
});
guarded(refreshAll);
