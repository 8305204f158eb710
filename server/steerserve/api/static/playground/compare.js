// Steered vs unsteered: where the two texts part (highlighted in both), or a notice when they are
// identical, with what to change.

import { el } from "./dom.js";

// The length of the longest common prefix, backed up to the start of the word it cuts (so the
// highlight starts on a whole word, as a reader sees the change).
export function divergence(a, b) {
  let k = 0;
  while (k < a.length && k < b.length && a[k] === b[k]) k++;
  if (k === a.length && k === b.length) return -1; // identical
  while (k > 0 && /\S/.test(a[k - 1])) k--;
  return k;
}

// Show `texts` ({steered, unsteered}) in their <pre>s with the part after the divergence marked;
// the notice says how the two compare. `steered` null: nothing steered the call.
export function showComparison(outSteered, outUnsteered, noticeEl, texts) {
  const { steered, unsteered } = texts;
  noticeEl.className = "notice";
  if (steered === null || steered === undefined) {
    outSteered.textContent = "(nothing steers this call: see the unsteered completion)";
    outUnsteered.textContent = unsteered;
    noticeEl.hidden = true;
    return;
  }
  const at = divergence(steered, unsteered);
  if (at < 0) {
    outSteered.textContent = steered;
    outUnsteered.textContent = unsteered;
    noticeEl.classList.add("warn");
    noticeEl.replaceChildren(
      el("strong", {}, "Steered and unsteered are identical: "),
      "the steering did not change a single sampled token. Try a larger global strength multiplier " +
        "(x2, then x4), positions \u201call\u201d, a scale of \u201cmax activation\u201d, or another feature " +
        "of the same label (a feature's card shows which tokens it promotes).",
    );
    noticeEl.hidden = false;
    return;
  }
  mark(outSteered, steered, at);
  mark(outUnsteered, unsteered, at);
  const word = (t) => JSON.stringify(t.slice(at).trim().split(/\s+/)[0] || "");
  noticeEl.replaceChildren(
    `The texts part at character ${at} (highlighted): steered goes on with ${word(steered)}, unsteered with ${word(unsteered)}.`,
  );
  noticeEl.hidden = false;
}

function mark(pre, text, at) {
  pre.replaceChildren(text.slice(0, at), el("mark", { className: "diverge" }, text.slice(at)));
}
