// A streamed chunk of /v1/chat/completions or /v1/completions, read into one shape the answer view uses:
//   { text, tokens: [{ id, label, logprob, top: [{ label, logprob }], offset }], promptTokens, finishReason,
//     stopReason, usage, routed }
// `offset` is where the token's text starts in the answer, in code points (Python's str indices, not UTF-16's).

function choiceOf(chunk) {
  return chunk.choices && chunk.choices.length ? chunk.choices[0] : null;
}

function common(chunk, choice) {
  return {
    text: "",
    tokens: [],
    promptTokens: null,
    finishReason: choice ? choice.finish_reason ?? null : null,
    stopReason: choice ? choice.stop_reason ?? null : null,
    usage: chunk.usage ?? null,
    routed: choice ? choice.routed_experts ?? null : null,
  };
}

// Chat logprob entries carry each token's UTF-8 bytes; decoding them as a stream gives each token's offset in the
// text (a character split over two tokens belongs to the second), so one decoder lives as long as the answer.
export class ChatChunks {
  constructor() {
    this.decoder = new TextDecoder("utf-8", { ignoreBOM: true }); // keep a leading U+FEFF, as the API does
    this.decoded = 0;
  }

  read(chunk) {
    const choice = choiceOf(chunk);
    const part = common(chunk, choice);
    if (chunk.prompt_token_ids) part.promptTokens = chunk.prompt_token_ids.length;
    if (!choice) return part;
    part.text = choice.delta?.content ?? "";
    const entries = choice.logprobs?.content ?? [];
    entries.forEach((entry, i) => {
      const offset = this.decoded;
      this.decoded += [...this.decoder.decode(new Uint8Array(entry.bytes ?? []), { stream: true })].length;
      part.tokens.push({
        id: choice.token_ids ? choice.token_ids[i] : null,
        label: entry.token,
        logprob: entry.logprob,
        top: (entry.top_logprobs ?? []).map((t) => ({ label: t.token, logprob: t.logprob })),
        offset,
      });
    });
    return part;
  }
}

// Completion logprobs are OpenAI's legacy parallel lists, with each token's text_offset given by the server.
export class CompletionChunks {
  read(chunk) {
    const choice = choiceOf(chunk);
    const part = common(chunk, choice);
    if (!choice) return part;
    if (choice.prompt_token_ids) part.promptTokens = choice.prompt_token_ids.length;
    part.text = choice.text ?? "";
    const lp = choice.logprobs;
    (lp?.tokens ?? []).forEach((label, i) => {
      const top = Object.entries(lp.top_logprobs?.[i] ?? {}).map(([l, logprob]) => ({ label: l, logprob }));
      top.sort((a, b) => b.logprob - a.logprob);
      part.tokens.push({
        id: choice.token_ids ? choice.token_ids[i] : null,
        label,
        logprob: lp.token_logprobs[i],
        top,
        offset: lp.text_offset[i],
      });
    });
    return part;
  }
}
