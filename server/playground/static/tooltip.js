// The token tooltip: shown while a token span is hovered or focused; its logprob, the top alternatives and the
// experts it was routed to in each layer (a layers x experts grid).

import { answerOf } from "./answer.js";
import { drawGrid } from "./routing.js";

function formatLogprob(logprob) {
  return logprob.toFixed(4);
}

function percent(logprob) {
  return `${(Math.exp(logprob) * 100).toFixed(2)} %`;
}

function element(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

export class Tooltip {
  // numExperts(answer): the experts per layer to draw (the server's count once /metrics has it).
  constructor(element, numExperts) {
    this.element = element;
    this.numExperts = numExperts;
    this.current = null;
  }

  attach(root) {
    root.addEventListener("mouseover", (event) => {
      const span = event.target.closest(".tok");
      if (span) this.show(span);
    });
    root.addEventListener("mouseout", (event) => {
      const span = event.target.closest(".tok");
      if (span && !span.contains(event.relatedTarget) && document.activeElement !== span) this.hide();
    });
    root.addEventListener("focusin", (event) => {
      if (event.target.matches(".tok")) this.show(event.target);
    });
    root.addEventListener("focusout", () => this.hide());
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape") this.hide();
    });
  }

  hide() {
    this.current = null;
    this.element.hidden = true;
  }

  // Redraw for what arrived since (a pending token's routing comes with the next token).
  refresh() {
    if (this.current && this.current.isConnected) this.show(this.current);
  }

  show(span) {
    const answer = answerOf(span);
    if (!answer) return;
    const i = Number(span.dataset.index);
    const token = answer.tokens[i];
    this.current = span;
    const parts = [];

    const head = element("div", "tip-token");
    head.append(element("code", "label", JSON.stringify(token.label)));
    head.append(element("span", "meta", token.id === null ? ` token ${i}` : ` token ${i} · id ${token.id}`));
    parts.push(head);

    const lp = element("div", "tip-logprob", "logprob ");
    lp.append(element("span", "logprob", formatLogprob(token.logprob)), ` (p ${percent(token.logprob)})`);
    parts.push(lp);

    if (token.top.length) {
      const list = element("ol", "alternatives");
      for (const alt of token.top) {
        const item = element("li", alt.label === token.label ? "chosen" : "");
        item.append(element("code", "label", JSON.stringify(alt.label)),
          element("span", "alt-logprob", formatLogprob(alt.logprob)));
        list.append(item);
      }
      parts.push(element("div", "tip-heading", "top alternatives"), list);
    }

    const routing = answer.routingOf(i);
    const box = element("div", "tip-routing");
    if (routing.status === "ok") {
      const rows = answer.routed;
      const rank = (layer, expert) => rows.experts(routing.row, layer).indexOf(expert) + 1;
      drawGrid(box, rows.numLayers, this.numExperts(answer), (layer, expert) => {
        const r = rank(layer, expert);
        return { text: r ? String(r) : "", share: r ? 1 - (r - 1) / (rows.topK + 1) : 0, data: r ? { rank: r } : {} };
      }, `experts this token was routed to (top-${rows.topK} rank; routing row ${routing.row})`);
    } else {
      box.append(element("p", `routing-note ${routing.status}`, routing.reason));
    }
    parts.push(box);
    this.element.replaceChildren(...parts);
    this.element.hidden = false;
    this.place(span);
  }

  place(span) {
    const at = span.getBoundingClientRect();
    const tip = this.element.getBoundingClientRect();
    const margin = 8;
    let top = at.bottom + margin;
    if (top + tip.height > window.innerHeight && at.top - margin - tip.height > 0) top = at.top - margin - tip.height;
    const left = Math.max(margin, Math.min(at.left, window.innerWidth - tip.width - margin));
    this.element.style.setProperty("left", `${left}px`);
    this.element.style.setProperty("top", `${Math.max(margin, top)}px`);
  }
}
