// The registry side of the steering panel: feature search (by label or by effect) with each hit's
// explanation, score, SAE / site, max activation, density and top promoted tokens; the by-index form,
// the vector picker, and the pickers' contents.

import { getJSON } from "./api.js";
import { el, featureName } from "./dom.js";
import { featurePath } from "./steering.js";

const PAGE = 8; // hits shown per search; "More" asks the API for the next PAGE
const siteOf = {}; // sae id -> its site, from GET /v1/saes
// The pickers' latest fill: a handler that reads them waits for it, so an Add pressed while the page
// is still loading the registry is not told "no SAE is registered"; when the fill failed (no key, say),
// the handler throws its error, the reason the pickers are empty.
let pickersLoad = Promise.resolve();

export async function pickersFilled() {
  await pickersLoad;
}

const fmt = (v, digits = 4) => (v === null || v === undefined ? "unknown" : Number(v).toPrecision(digits));
const percent = (v) => (v === null || v === undefined ? "unknown" : `${(100 * v).toPrecision(2)}%`);

// One hit: its name and Add / Card buttons, the explanation, and a line of numbers. The card (max
// activation, density, promoted tokens) is fetched once and handed to Add, so Add needs no second call.
function hitItem(h, panel, openCard) {
  const name = featureName(h);
  const card = getJSON(featurePath(h.sae, h.index)).catch(() => ({}));
  const add = async () => panel.addFeature(h.sae, h.index, h.label, await card);
  const stats = el("span", { className: "muted" }, "loading its card...");
  const promotes = el("span", { className: "muted" });
  card.then((info) => {
    stats.textContent = `max activation ${fmt(info.max_activation)} · density ${percent(info.density)}`;
    const top = ((info.top_logits || {}).promoted || []).slice(0, 5).map((e) => JSON.stringify(e.token));
    promotes.textContent = top.length ? `promotes ${top.join(" ")}` : "";
  });
  const where = `score ${Number(h.score).toFixed(2)} · ${h.sae}${siteOf[h.sae] ? ` at ${siteOf[h.sae]}` : ""}`;
  const explanation = h.explanation && h.explanation !== h.label ? h.explanation : null;
  return el("li", { className: "hit" },
    el("div", { className: "row" },
      el("strong", { className: "grow name" }, name),
      el("button", { type: "button", className: "small", "aria-label": `Add ${name}`, onclick: add }, "Add"),
      el("button", { type: "button", className: "small", "aria-label": `Card of ${name}`, onclick: () => openCard(h.sae, h.index) }, "Card")),
    explanation && el("div", { className: "muted" }, explanation),
    el("div", { className: "muted" }, where, " · ", stats),
    el("div", {}, promotes));
}

// The search box, the by-index form and the vector picker (variants.js: the variant forms).
// `run(asyncFn)` runs a handler and shows what it throws.
export function wireRegistry(panel, ui, { openCard, run }) {
  const on = (form, handler) =>
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      run(handler);
    });
  let limit = PAGE;
  const search = async (more) => {
    const q = ui.query.value.trim();
    const byEffect = ui.searchKind.value === "promotes";
    if (!q) throw new Error(byEffect ? "type a token the feature should promote" : "type part of a feature label to search for");
    limit = more ? limit + PAGE : PAGE;
    const query = byEffect ? `promotes=${encodeURIComponent(ui.query.value)}` : `q=${encodeURIComponent(q)}`;
    const hits = (await getJSON(`/v1/features/search?${query}&limit=${limit}`)).data;
    const items = hits.map((h) => hitItem(h, panel, openCard));
    if (!items.length) items.push(el("li", { className: "muted" }, byEffect ? `no feature promotes "${q}"` : `no feature label matches "${q}"`));
    if (hits.length === limit) { // the API may have more
      const moreButton = el("button", { type: "button", className: "small", onclick: () => run(() => search(true)) }, `More results for "${q}"`);
      items.push(el("li", {}, moreButton));
    }
    ui.results.replaceChildren(...items);
    if (more && items[limit - PAGE]) items[limit - PAGE].querySelector("button")?.focus(); // the first new hit
  };
  on(ui.searchForm, () => search(false));
  ui.searchKind.addEventListener("change", () => {
    ui.query.placeholder = ui.searchKind.value === "promotes" ? "a token, e.g. \" snow\"" : "e.g. cold";
  });
  on(ui.indexForm, async () => {
    await pickersFilled();
    if (!ui.indexSae.value) throw new Error("no SAE is registered on this server");
    const index = Number(ui.indexNumber.value);
    const dSae = Number(ui.indexSae.selectedOptions[0]?.dataset.dSae);
    if (!Number.isInteger(index) || index < 0 || (dSae && index >= dSae)) {
      throw new Error(`feature index must be a whole number in 0..${dSae ? dSae - 1 : "d_sae - 1"}, got ${ui.indexNumber.value}`);
    }
    await panel.addFeature(ui.indexSae.value, index, null);
  });
  on(ui.vectorForm, async () => {
    await pickersFilled();
    if (!ui.vectorSelect.value) throw new Error("no steering vector is stored on this server");
    panel.addVector(ui.vectorSelect.value);
  });
}

// Fill the SAE, vector and variant pickers from the registry.
export function refreshRegistry(ui) {
  pickersLoad = fillPickers(ui);
  return pickersLoad;
}

async function fillPickers(ui) {
  const [saes, vectors, variants] = await Promise.all([
    getJSON("/v1/saes"), getJSON("/v1/vectors"), getJSON("/v1/variants"),
  ]);
  const options = (sel, data, text, extra = () => ({})) => {
    sel.replaceChildren(...data.map((d) => el("option", { value: d.id, ...extra(d) }, text(d))));
    sel.disabled = data.length === 0;
  };
  for (const s of saes.data) siteOf[s.id] = s.site;
  options(ui.indexSae, saes.data, (s) => `${s.id} (${s.site}, ${s.d_sae})`, (s) => ({ "data-d-sae": s.d_sae }));
  options(ui.vectorSelect, vectors.data, (v) => v.id);
  options(ui.variantSelect, variants.data, (v) => v.id);
  // an "Add" beside an empty picker does nothing: disable it and say why
  ui.vectorForm.querySelector("button").disabled = vectors.data.length === 0;
  ui.vectorForm.querySelector("button").title = vectors.data.length ? "" : "no steering vector is stored on this server";
  for (const button of ui.variantLoadForm.querySelectorAll("button")) button.disabled = variants.data.length === 0;
}
