// The page: settings, the chat and completion modes, streaming with stop and regenerate, errors, server state.

import { Answer } from "./answer.js";
import { drawAnswerRouting } from "./answer_routing.js";
import { APIError, getJSON, post, readEvents } from "./api.js";
import { ChatChunks, CompletionChunks } from "./chunks.js";
import { ServerState } from "./server_state.js";
import { Tooltip } from "./tooltip.js";

const $ = (id) => document.getElementById(id);
const TOP_LOGPROBS = 5;
const METRICS_POLL_MS = 2000;

const page = {
  mode: "chat",
  // Whether the server returns routed experts, learned from the first request: each asks for them until the API
  // answers 400 naming return_routed_experts (a server without --enable-return-routed-experts), then none does.
  routing: "unknown",
  turns: [], // chat: { role: "user", content } or { role: "assistant", answer, bubble }
  running: null, // the AbortController of the request in flight
  latest: null, // the Answer the routing view shows
};

const serverState = new ServerState($("server-state"), {
  running: $("state-running"), waiting: $("state-waiting"), kv: $("state-kv"), rate: $("state-rate"),
});

// The experts per layer: the server's count from /metrics, or what the answer's routing itself shows.
function numExperts(answer) {
  return Math.max(serverState.numExperts, answer.routed.maxExpert + 1);
}

const tooltip = new Tooltip($("tooltip"), numExperts);

// --- errors ---------------------------------------------------------------------------------------------------

function showError(error) {
  const api = error instanceof APIError;
  $("error-status").textContent = api ? (error.status ? `${error.status} ${error.type ?? ""}`.trim() : "network")
    : "error";
  $("error-message").textContent = error.message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
}

// Whatever goes wrong in the page's own code is shown too, never a blank page.
window.addEventListener("error", (event) => showError(event.error ?? new Error(event.message)));
window.addEventListener("unhandledrejection", (event) => showError(event.reason));

// --- settings -------------------------------------------------------------------------------------------------

function apiKey() {
  return $("api-key").value.trim();
}

// A number field as the API gets it; an empty field is left out (the API's default).
function numberField(id) {
  const text = $(id).value.trim();
  return text === "" ? undefined : Number(text);
}

function samplingFields() {
  const fields = {
    temperature: numberField("temperature"),
    top_p: numberField("top-p"),
    max_tokens: numberField("max-tokens"),
    seed: numberField("seed"),
  };
  for (const key of Object.keys(fields)) if (fields[key] === undefined) delete fields[key];
  const stops = $("stop").value.split("\n").filter((s) => s !== "").map((s) => s.replaceAll("\\n", "\n"));
  if (stops.length) fields.stop = stops;
  return fields;
}

// Streamed, with each token's id and logprob entry, and special tokens kept in the text, so every generated
// token (an EOS in the middle too) is a span of the answer.
function requestBody(fields) {
  return {
    ...fields, ...samplingFields(), stream: true, stream_options: { include_usage: true },
    return_token_ids: true, skip_special_tokens: false,
  };
}

function setRouting(routing) {
  page.routing = routing;
  $("routing-status").dataset.routing = routing;
  $("routing-status").textContent = routing === "on" ? "on (return_routed_experts)"
    : "off: the server runs without --enable-return-routed-experts";
}

async function loadModel() {
  try {
    const models = await getJSON("/v1/models", apiKey());
    const card = models.data[0];
    $("model-name").textContent = `model: ${card.id} · context ${card.max_model_len} tokens`;
    delete $("model-name").dataset.error;
  } catch (error) {
    $("model-name").textContent = `model: ${error.message}`;
    $("model-name").dataset.error = "1";
  }
}

// --- generation -----------------------------------------------------------------------------------------------

function setBusy(busy) {
  for (const id of ["chat-send", "chat-regenerate", "chat-clear", "completion-generate", "completion-regenerate",
    "tab-chat", "tab-completion"]) $(id).disabled = busy;
  $("chat-stop").disabled = !busy;
  $("completion-stop").disabled = !busy;
}

function drawRouting() {
  const answer = page.latest;
  drawAnswerRouting($("answer-routing"), answer, answer ? numExperts(answer) : 0);
}

async function postAskingRouting(path, body, signal, answer) {
  if (page.routing !== "off") {
    try {
      const response = await post(path, { ...body, return_routed_experts: true }, apiKey(), signal);
      setRouting("on");
      answer.routing = "on";
      return response;
    } catch (error) {
      if (!(error instanceof APIError && error.status === 400 && error.param === "return_routed_experts")) throw error;
      setRouting("off");
    }
  }
  answer.routing = "off";
  return post(path, body, apiKey(), signal);
}

function describeFinish(answer) {
  const tokens = `${answer.tokens.length} token${answer.tokens.length === 1 ? "" : "s"}`;
  const prompt = answer.promptTokens === null ? "" : ` after ${answer.promptTokens} prompt tokens`;
  if (answer.state === "stopped") return `stopped · ${tokens}${prompt}`;
  if (answer.state === "error") return `failed · ${tokens}${prompt}`;
  const reason = typeof answer.stopReason === "string" ? `stop string ${JSON.stringify(answer.stopReason)}`
    : answer.finishReason;
  return `${reason} · ${tokens}${prompt}`;
}

// Stream one request into `answer`; false when the API refused it or it failed.
async function generate(path, body, answer, meta) {
  const controller = new AbortController();
  page.running = controller;
  page.latest = answer;
  setBusy(true);
  clearError();
  drawRouting();
  let ok = true;
  try {
    const response = await postAskingRouting(path, body, controller.signal, answer);
    for await (const chunk of readEvents(response)) {
      answer.consume(chunk);
      tooltip.refresh();
      drawRouting();
    }
    if (answer.finishReason === "error") throw new APIError(500, "the model failed while generating this answer");
    answer.finish("done");
  } catch (error) {
    if (error.name === "AbortError") {
      answer.finish("stopped");
    } else {
      answer.finish("error");
      showError(error);
      ok = false;
    }
  } finally {
    page.running = null;
    setBusy(false);
  }
  meta.textContent = describeFinish(answer);
  tooltip.refresh();
  drawRouting();
  return ok;
}

function stop() {
  if (page.running) page.running.abort();
}

// --- chat -----------------------------------------------------------------------------------------------------

function bubble(role) {
  const div = document.createElement("div");
  div.className = `turn ${role}`;
  $("conversation").append(div);
  return div;
}

function history() {
  const system = $("system-prompt").value;
  const messages = system.trim() ? [{ role: "system", content: system }] : [];
  for (const turn of page.turns) {
    messages.push({ role: turn.role, content: turn.role === "user" ? turn.content : turn.answer.content });
  }
  return messages;
}

async function askAssistant() {
  const messages = history();
  const div = bubble("assistant");
  const text = document.createElement("div");
  const meta = document.createElement("div");
  meta.className = "answer-meta";
  div.append(text, meta);
  const answer = new Answer(text, new ChatChunks());
  page.turns.push({ role: "assistant", answer, bubble: div });
  const body = requestBody({ messages, logprobs: true, top_logprobs: TOP_LOGPROBS });
  const ok = await generate("/v1/chat/completions", body, answer, meta);
  if (!ok && answer.tokens.length === 0) {
    div.remove(); // the refused request leaves the user's message last: Regenerate sends it again
    page.turns.pop();
    page.latest = page.turns.findLast((turn) => turn.role === "assistant")?.answer ?? null;
    drawRouting();
  }
  div.scrollIntoView({ block: "end" });
}

function sendChat(event) {
  event.preventDefault();
  const content = $("chat-input").value;
  if (page.running || !content.trim()) return;
  $("chat-input").value = "";
  page.turns.push({ role: "user", content });
  bubble("user").textContent = content;
  askAssistant();
}

function regenerateChat() {
  if (page.running) return;
  const last = page.turns.at(-1);
  if (last?.role === "assistant") {
    last.bubble.remove();
    page.turns.pop();
  }
  if (page.turns.at(-1)?.role === "user") askAssistant();
}

function clearChat() {
  page.turns = [];
  $("conversation").replaceChildren();
  page.latest = null;
  drawRouting();
}

// --- completion -----------------------------------------------------------------------------------------------

async function complete(event) {
  event?.preventDefault();
  if (page.running) return;
  const prompt = $("prompt").value;
  const head = document.createElement("span");
  head.className = "prompt-text";
  head.textContent = prompt;
  const text = document.createElement("span");
  const meta = document.createElement("div");
  meta.className = "answer-meta";
  $("completion-output").replaceChildren(head, text, meta);
  const answer = new Answer(text, new CompletionChunks());
  await generate("/v1/completions", requestBody({ prompt, logprobs: TOP_LOGPROBS }), answer, meta);
}

// --- wiring ---------------------------------------------------------------------------------------------------

function selectMode(mode) {
  page.mode = mode;
  $("tab-chat").setAttribute("aria-selected", String(mode === "chat"));
  $("tab-completion").setAttribute("aria-selected", String(mode === "completion"));
  $("chat-view").hidden = mode !== "chat";
  $("completion-view").hidden = mode !== "completion";
}

$("tab-chat").addEventListener("click", () => selectMode("chat"));
$("tab-completion").addEventListener("click", () => selectMode("completion"));
$("chat-form").addEventListener("submit", sendChat);
$("chat-input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) sendChat(event);
});
$("chat-stop").addEventListener("click", stop);
$("chat-regenerate").addEventListener("click", regenerateChat);
$("chat-clear").addEventListener("click", clearChat);
$("completion-form").addEventListener("submit", complete);
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && event.ctrlKey) complete(event);
});
$("completion-stop").addEventListener("click", stop);
$("completion-regenerate").addEventListener("click", complete);
$("error-close").addEventListener("click", clearError);
$("api-key").addEventListener("change", loadModel);
tooltip.attach(document.querySelector("main"));

setBusy(false);
drawRouting();
loadModel();
serverState.start(METRICS_POLL_MS);
