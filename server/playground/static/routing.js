// The routed experts of an answer (the API's `routed_experts`, base64 of little-endian int32 [T, L, K]) and the
// layers x experts tables that show them.
// Row r is the routing of the r-th token the model read: the prompt's tokens, then each generated token but the
// last, so generated token i's own routing is row promptTokens + i.

export class RoutedRows {
  constructor() {
    this.rows = []; // one Int32Array(numLayers * topK) per token read
    this.numLayers = 0;
    this.topK = 0;
    this.maxExpert = -1;
  }

  get length() {
    return this.rows.length;
  }

  append(routed) {
    const [numTokens, numLayers, topK] = routed.shape;
    if (routed.dtype !== "int32") throw new Error(`routed_experts: dtype ${routed.dtype}, expected int32`);
    const bytes = Uint8Array.from(atob(routed.data), (c) => c.charCodeAt(0));
    const size = numLayers * topK;
    if (bytes.length !== numTokens * size * 4) {
      throw new Error(`routed_experts: ${bytes.length} bytes for shape [${routed.shape}]`);
    }
    const view = new DataView(bytes.buffer);
    for (let t = 0; t < numTokens; t++) {
      const row = new Int32Array(size);
      for (let j = 0; j < size; j++) {
        row[j] = view.getInt32((t * size + j) * 4, true);
        this.maxExpert = Math.max(this.maxExpert, row[j]);
      }
      this.rows.push(row);
    }
    this.numLayers = numLayers;
    this.topK = topK;
  }

  // The expert ids of row r in one layer, in the router's top-k order.
  experts(r, layer) {
    return Array.from(this.rows[r].subarray(layer * this.topK, (layer + 1) * this.topK));
  }

  // Per layer, how many of the rows from `first` on went to each expert: counts[layer][expert].
  counts(first, numExperts) {
    const counts = Array.from({ length: this.numLayers }, () => new Array(numExperts).fill(0));
    for (let r = first; r < this.rows.length; r++) {
      for (let layer = 0; layer < this.numLayers; layer++) {
        for (const expert of this.experts(r, layer)) counts[layer][expert] += 1;
      }
    }
    return counts;
  }
}

// A layers x experts table into `container`; cell(layer, expert) gives { text, share (0..1), data: {...} }.
export function drawGrid(container, numLayers, numExperts, cell, caption) {
  const table = document.createElement("table");
  table.className = "experts";
  const title = table.createCaption();
  title.textContent = caption;
  const head = table.createTHead().insertRow();
  const corner = document.createElement("th");
  corner.textContent = "layer \\ expert";
  head.append(corner);
  for (let e = 0; e < numExperts; e++) {
    const th = document.createElement("th");
    th.scope = "col";
    th.textContent = String(e);
    head.append(th);
  }
  const body = table.createTBody();
  for (let layer = 0; layer < numLayers; layer++) {
    const row = body.insertRow();
    const th = document.createElement("th");
    th.scope = "row";
    th.textContent = String(layer);
    row.append(th);
    for (let e = 0; e < numExperts; e++) {
      const { text, share, data } = cell(layer, e);
      const td = row.insertCell();
      td.className = "cell";
      td.textContent = text;
      td.dataset.layer = String(layer);
      td.dataset.expert = String(e);
      for (const [k, v] of Object.entries(data)) td.dataset[k] = String(v);
      td.style.setProperty("--share", String(share));
    }
  }
  container.replaceChildren(table);
}
