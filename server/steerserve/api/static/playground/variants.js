// The variant forms: load a stored variant into the set (as one group), delete or export it, and save
// the current set as a variant (overwriting one of the same id only when asked to).

import { ApiError, deleteJSON, getJSON, postJSON } from "./api.js";
import { el } from "./dom.js";
import { pickersFilled } from "./search.js";

const path = (id) => `/v1/variants/${encodeURIComponent(id)}`;
// A stored variant as POST /v1/variants takes it (steering, feature_logit_bias, stop_when...).
const specOf = ({ object, created, ...spec }) => spec;

// `run(asyncFn)` runs a handler and shows what it throws; `onChanged(id)` after a save or delete
// refreshes the pickers; `onLoaded(id)` after a load.
export function wireVariants(panel, ui, { run, onLoaded, onChanged }) {
  const chosen = async () => {
    await pickersFilled();
    if (!ui.variantSelect.value) throw new Error("no variant is stored on this server");
    return ui.variantSelect.value;
  };
  ui.variantLoadForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    run(async () => {
      const id = await chosen();
      panel.load(await getJSON(path(id)), id);
      onLoaded(id);
    });
  });
  ui.variantDelete.addEventListener("click", () => run(async () => {
    const id = await chosen();
    if (!window.confirm(`Delete variant "${id}" from the server? The model serving it goes with it.`)) return;
    await deleteJSON(path(id));
    ui.variantOut.replaceChildren(`Deleted variant "${id}".`);
    await onChanged(null);
  }));
  ui.variantExport.addEventListener("click", () => run(async () => {
    const id = await chosen();
    const spec = await getJSON(path(id));
    const json = JSON.stringify(specOf(spec), null, 2);
    const href = URL.createObjectURL(new Blob([json], { type: "application/json" }));
    ui.variantOut.replaceChildren(
      el("a", { href, download: `${id}.json` }, `Download ${id}.json`), " (POST it to /v1/variants to store it elsewhere)",
      el("pre", { className: "export" }, json));
  }));
  ui.saveForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    run(async () => {
      const id = ui.variantId.value.trim();
      if (!id) throw new Error("give the variant an id");
      const body = { id, ...panel.request() };
      const saved = await save(body, ui.variantOverwrite.checked);
      ui.saved.textContent = `Saved variant "${saved.id}"; it is served as a model now.`;
      await onChanged(saved.id);
    });
  });
}

// POST the variant; on a conflict with "overwrite" ticked, replace the stored one, putting it back if
// the new one is refused (the API has no update: delete, then create).
async function save(body, overwrite) {
  try {
    return await postJSON("/v1/variants", body);
  } catch (err) {
    if (!(err instanceof ApiError) || err.status !== 409) throw err;
    if (!overwrite) throw new ApiError(`${err.message}: tick "overwrite" to replace it`, 409, "id");
  }
  const old = await getJSON(path(body.id));
  await deleteJSON(path(body.id));
  try {
    return await postJSON("/v1/variants", body);
  } catch (err) {
    await postJSON("/v1/variants", specOf(old));
    throw err;
  }
}
