// One generated answer: a span per generated token, whose texts partition the API's text exactly.
// Token i's text is text[offset_i : offset_(i+1)] of the text streamed so far, so a token whose text is held back
// (a split character, a possible stop string) fills in when the text arrives; a token with no text (the EOS that
// ended the answer, tokens cut by a stop string, the first half of a character) shows its label in grey, by CSS
// alone, so the spans' textContent stays the API's text.

import { RoutedRows } from "./routing.js";

const answers = new WeakMap(); // .answer element -> Answer, for the tooltip

export function answerOf(element) {
  const holder = element.closest(".answer");
  return holder ? answers.get(holder) : undefined;
}

export class Answer {
  // element: the (empty) .answer element; reader: a ChatChunks or CompletionChunks for this request.
  constructor(element, reader) {
    this.element = element;
    this.reader = reader;
    this.text = []; // code points
    this.tokens = [];
    this.spans = [];
    this.open = 0; // the first token whose text may still change
    this.promptTokens = null;
    this.usage = null;
    this.routed = new RoutedRows();
    this.routing = "unknown"; // "on" or "off": whether this request asked for routed_experts
    this.finishReason = null;
    this.stopReason = null;
    element.classList.add("answer");
    element.dataset.state = "streaming";
    answers.set(element, this);
  }

  get content() {
    return this.text.join("");
  }

  get state() {
    return this.element.dataset.state;
  }

  consume(chunk) {
    const part = this.reader.read(chunk);
    if (part.promptTokens !== null) this.promptTokens = part.promptTokens;
    if (part.usage) {
      this.usage = part.usage;
      this.promptTokens ??= part.usage.prompt_tokens;
    }
    if (part.routed) this.routed.append(part.routed);
    for (const token of part.tokens) this.addToken(token);
    this.text.push(...part.text);
    if (part.finishReason) {
      this.finishReason = part.finishReason;
      this.stopReason = part.stopReason;
    }
    this.render();
  }

  addToken(token) {
    const span = document.createElement("span");
    span.className = "tok";
    span.tabIndex = 0; // focusable: the tooltip opens for keyboard users too
    span.dataset.index = String(this.tokens.length);
    span.dataset.logprob = String(token.logprob);
    span.dataset.label = token.label;
    if (token.id !== null) span.dataset.tokenId = String(token.id);
    span.setAttribute("aria-describedby", "tooltip");
    this.tokens.push(token);
    this.spans.push(span);
    this.element.append(span);
  }

  render() {
    const n = this.tokens.length;
    const length = this.text.length;
    for (let i = this.open; i < n; i++) {
      const start = Math.min(this.tokens[i].offset, length);
      const end = i + 1 < n ? Math.min(this.tokens[i + 1].offset, length) : length;
      this.spans[i].textContent = this.text.slice(start, end).join("");
    }
    while (this.open < n - 1 && this.tokens[this.open + 1].offset <= length) this.open++;
  }

  // state: "done", "stopped" (the user stopped it) or "error".
  finish(state) {
    this.element.dataset.state = state;
    this.render();
    this.spans.forEach((span, i) => span.classList.toggle("cut", this.tokens[i].offset >= this.text.length));
  }

  // Generated token i's own routing: { status: "ok", row } or { status, reason } when there is none to show.
  routingOf(i) {
    if (this.routing === "off") {
      return { status: "off", reason: "routing is off: the server runs without --enable-return-routed-experts" };
    }
    const row = this.promptTokens === null ? -1 : this.promptTokens + i;
    if (row >= 0 && row < this.routed.length) return { status: "ok", row };
    if (this.state !== "streaming" && i === this.tokens.length - 1) {
      return { status: "none", reason: "no routing: the model never read this token (the answer ended with it)" };
    }
    if (this.state !== "streaming") return { status: "none", reason: "no routing arrived for this token" };
    return { status: "pending", reason: "routing arrives with the next token (the model reads this one then)" };
  }
}
