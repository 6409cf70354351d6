// The routing view of a whole answer: per layer, how many of its tokens each expert took.

import { drawGrid } from "./routing.js";

function note(container, text) {
  const p = document.createElement("p");
  p.className = "routing-note";
  p.textContent = text;
  container.replaceChildren(p);
}

export function drawAnswerRouting(container, answer, numExperts) {
  if (!answer) return note(container, "Generate an answer to see how its tokens were routed.");
  if (answer.routing === "off") {
    return note(container, "Routing is off: the server runs without --enable-return-routed-experts.");
  }
  const first = answer.promptTokens;
  const rows = answer.routed;
  if (first === null || rows.length <= first) {
    return note(container, "No generated token has been read by the model yet.");
  }
  // Rows first.. are the generated tokens the model read: all but the last one.
  const read = rows.length - first;
  const counts = rows.counts(first, numExperts);
  drawGrid(container, rows.numLayers, numExperts, (layer, expert) => {
    const count = counts[layer][expert];
    return { text: String(count), share: count / read, data: { count } };
  }, `tokens per expert in each layer, over the answer's ${read} token${read === 1 ? "" : "s"} the model read`);
}
