// Server state from GET /metrics (Prometheus text, already open to anyone who can reach the server): running and
// waiting requests, KV cache use, and tokens/s from the change of a counter between two polls.

import { getText } from "./api.js";

const SAMPLE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

// name -> [{ labels, value }] of every sample in an exposition text.
export function parseMetrics(text) {
  const samples = new Map();
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = SAMPLE.exec(line);
    if (!match) continue;
    const labels = {};
    for (const [, key, value] of (match[2] ?? "").matchAll(LABEL)) labels[key] = value;
    if (!samples.has(match[1])) samples.set(match[1], []);
    samples.get(match[1]).push({ labels, value: Number(match[3]) });
  }
  return samples;
}

function total(samples, name) {
  return (samples.get(name) ?? []).reduce((sum, s) => sum + s.value, 0);
}

export class ServerState {
  // fields: { running, waiting, kv, rate } elements; panel: gets data-ready once a poll succeeded.
  constructor(panel, fields) {
    this.panel = panel;
    this.fields = fields;
    this.last = null; // { tokens, time } of the previous poll
    this.numExperts = 0; // experts per MoE layer, once the expert-load counter has rows
  }

  start(intervalMs) {
    this.poll();
    setInterval(() => this.poll(), intervalMs);
  }

  async poll() {
    let samples;
    try {
      samples = parseMetrics(await getText("/metrics"));
    } catch (error) {
      this.panel.dataset.error = error.message;
      this.fields.running.textContent = "?";
      this.fields.waiting.textContent = "?";
      this.fields.kv.textContent = "?";
      this.fields.rate.textContent = "?";
      return;
    }
    delete this.panel.dataset.error;
    this.fields.running.textContent = String(total(samples, "customllm_num_requests_running"));
    this.fields.waiting.textContent = String(total(samples, "customllm_num_requests_waiting"));
    this.fields.kv.textContent = `${(100 * total(samples, "customllm_kv_cache_usage_ratio")).toFixed(1)} %`;
    // One inter-token gap is observed per generated token after each request's first, as it is generated (the
    // generation-token counter only moves when a request finishes).
    const tokens = total(samples, "customllm_inter_token_latency_seconds_count");
    const time = performance.now();
    if (this.last && tokens >= this.last.tokens && time > this.last.time) {
      const rate = (tokens - this.last.tokens) / ((time - this.last.time) / 1000);
      this.fields.rate.textContent = rate.toFixed(1);
    }
    this.last = { tokens, time };
    for (const s of samples.get("customllm_moe_expert_tokens_total") ?? []) {
      this.numExperts = Math.max(this.numExperts, Number(s.labels.expert) + 1);
    }
    this.panel.dataset.ready = "1";
  }
}
