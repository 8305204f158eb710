// Multi-turn chat with the two conversations side by side: each side keeps its own replies, so the
// unsteered side is what the model says unsteered to its own earlier answers.

import { el } from "./dom.js";
import { streamOne, streamPair } from "./view.js";

export class Conversations {
  constructor(transcripts) {
    this.transcripts = transcripts; // {steered, unsteered}: where the earlier turns show
    this.turns = []; // [{user, steered, unsteered}]; steered null where nothing steered the turn
  }

  // The conversation of `side` so far as chat messages.
  history(side) {
    return this.turns.flatMap((t) => [
      { role: "user", content: t.user },
      { role: "assistant", content: t[side] ?? t.unsteered },
    ]);
  }

  messages(side, prompt) {
    return [...this.history(side), { role: "user", content: prompt }];
  }

  push(user, steered, unsteered) {
    this.turns.push({ user, steered, unsteered });
    this.render();
  }

  reset(turns = []) {
    this.turns = turns;
    this.render();
  }

  // Every turn but the last (the last is in the output boxes, where the comparison marks it).
  render() {
    for (const side of ["steered", "unsteered"]) {
      const earlier = this.turns.slice(0, -1).flatMap((t, k) => [
        el("p", { className: "turn user" }, el("strong", {}, `you (${k + 1}) `), t.user),
        el("p", { className: "turn assistant" }, t[side] ?? t.unsteered),
      ]);
      this.transcripts[side].replaceChildren(...earlier);
      this.transcripts[side].hidden = earlier.length === 0;
    }
  }
}

// One chat turn. The first is one call with return_unsteered (as in completion mode); later ones are
// two calls at once with the same seed: the steered side's history with the steering, the unsteered
// side's own history without it (on `baseModel`, so a variant model does not steer it either).
export async function streamTurn(path, body, baseModel, conv, prompt, outs, stops) {
  if (!conv.turns.length) {
    return streamPair(path, { ...body, messages: conv.messages("steered", prompt) }, outs.steered, outs.unsteered, stops);
  }
  const { steering, feature_logit_bias, stop_when, return_unsteered, ...plain } = body;
  const steers = Boolean(steering || feature_logit_bias || stop_when || baseModel !== body.model);
  const unsteeredCall = streamOne(path, { ...plain, model: baseModel, messages: conv.messages("unsteered", prompt) },
    outs.unsteered, stops.unsteered);
  if (!steers) {
    outs.steered.textContent = "(nothing steers this call: see the unsteered completion)";
    const u = await unsteeredCall;
    return { steered: null, unsteered: u.text, logprobs: { steered: [], unsteered: u.logprobs } };
  }
  const steeredCall = streamOne(path, { ...body, return_unsteered: false, messages: conv.messages("steered", prompt) },
    outs.steered, stops.steered);
  const [s, u] = await Promise.all([steeredCall, unsteeredCall]);
  return { steered: s.text, unsteered: u.text, logprobs: { steered: s.logprobs, unsteered: u.logprobs } };
}
