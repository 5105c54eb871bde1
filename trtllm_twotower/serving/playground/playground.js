"use strict";
// The playground page. A run is one POST to v1/playground/events (server-sent events, read from the
// fetch body because EventSource cannot POST); each event draws what one forward did.

const KNOBS = ["mode", "confidence_threshold", "steps_per_block", "block_size", "temperature", "seed", "max_tokens"];
const $ = (id) => document.getElementById(id);
let controller = null;

function requestBody() {
  const body = {};
  for (const knob of KNOBS) {
    const value = $(knob).value;
    // an empty or malformed number goes as null, so that the server names the knob
    body[knob] = knob === "mode" ? value : value === "" ? null : Number(value);
  }
  const prompt = $("prompt").value;
  const ids = () => prompt.split(",").map((id) => (id.trim() === "" ? null : Number(id)));
  body.prompt = $("prompt_ids").checked ? ids() : prompt;
  return body;
}

// A token as a cell shows it: its text with whitespace made visible, or its id without a tokenizer.
function shown(piece, token) {
  if (piece === null || piece === undefined) return String(token);
  if (piece === "" || piece === "\ufffd") return "#" + token; // one byte of a multi-byte character
  return piece.replace(/ /g, "␣").replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/[\x00-\x1f\x7f]/g, "·");
}

// Blue for a block's first step to orange for its last.
function stepColour(step, steps) {
  const f = steps > 1 ? step / (steps - 1) : 0;
  return `hsl(${210 - 175 * f}, 80%, ${82 - 10 * f}%)`;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

class RunView {
  constructor(title, prompt) {
    this.root = element("section", "run");
    this.root.append(element("h2", "", title));
    this.figures = this.root.appendChild(element("p", "figures", "running…"));
    this.legend = this.root.appendChild(element("div", "legend"));
    this.blocks = this.root.appendChild(element("div", "blocks"));
    const text = this.root.appendChild(element("pre", "text"));
    text.append(element("span", "prompt-echo", prompt));
    this.text = text.appendChild(element("span", "output"));
    this.rows = []; // per block: its cells
    this.given = null; // speculative: the AR token that opens the next block
    $("runs").append(this.root);
  }

  on(event) {
    if (event.row !== undefined && event.row !== 0) return; // the page asks for one row
    this[event.type](event);
  }

  start(e) {
    this.mode = e.mode;
    this.size = e.block_size;
    this.steps = e.steps_per_block;
    this.tokenMode = e.mode === "ar" || e.mode === "mock-ar";
    if (this.tokenMode) return;
    this.legend.append(element("span", "", "step 1 "));
    for (let s = 0; s < this.steps; s++) {
      const swatch = this.legend.appendChild(element("span", "swatch"));
      swatch.style.background = stepColour(s, this.steps);
      swatch.title = `step ${s + 1}`;
    }
    this.legend.append(element("span", "", ` step ${this.steps}`));
  }

  row(block) {
    while (this.rows.length <= block) {
      const line = this.blocks.appendChild(element("div", "block"));
      line.append(element("span", "label", String(this.rows.length)));
      const cells = [];
      for (let p = 0; p < (this.tokenMode ? 0 : this.size); p++) cells.push(line.appendChild(element("span", "cell masked", "·")));
      if (this.mode === "speculative") this.openWithGiven(cells[0]);
      this.rows.push({ line, cells });
    }
    return this.rows[block];
  }

  openWithGiven(cell) {
    cell.className = "cell given";
    cell.title = "the known AR token";
    if (this.given === null) return; // block 0: the prefill's token arrives with the block
    cell.textContent = this.given.text;
    cell.dataset.token = this.given.token;
    cell.classList.add("committed");
  }

  fill(cell, token, piece, title, colour) {
    cell.classList.remove("masked");
    cell.classList.add("committed");
    cell.textContent = shown(piece, token);
    cell.dataset.token = token;
    cell.title = `${title} · id ${token}`;
    if (colour) cell.style.background = colour;
  }

  step(e) {
    const { cells } = this.row(e.block);
    e.positions.forEach((p, j) => {
      const confidence = e.confidences[j].toFixed(3);
      this.fill(cells[p], e.tokens[j], e.pieces && e.pieces[j],
        `block ${e.block}, position ${p}: step ${e.step + 1}, confidence ${confidence}`, stepColour(e.step, this.steps));
    });
  }

  block(e) {
    const { cells } = this.row(e.block);
    e.tokens.forEach((token, p) => {
      if (p === 0 && this.mode === "speculative") this.fill(cells[0], token, e.pieces && e.pieces[0], "the known AR token");
      cells[p].classList.add("kept");
      this.append(token, e.pieces && e.pieces[p]);
    });
    for (let p = e.tokens.length; p < cells.length; p++) {
      cells[p].classList.add(this.mode === "speculative" ? "discarded" : "dropped");
    }
    if (this.mode !== "speculative" || e.accepted === null) return;
    for (let p = 1; p <= e.accepted; p++) cells[p].classList.add("accepted");
    const rejected = cells[e.accepted + 1];
    const text = shown(e.corrected_piece, e.corrected);
    if (rejected) { // else every draft was accepted and the corrected token is the free one after them
      rejected.classList.replace("discarded", "rejected");
      rejected.dataset.correctedPiece = text;
      rejected.title += ` · rejected: the AR token is ${text} (id ${e.corrected})`;
    }
    this.given = { token: e.corrected, text };
  }

  token(e) {
    const { line } = this.row(Math.floor(e.block / this.size));
    const cell = line.appendChild(element("span", "cell token kept"));
    this.fill(cell, e.tokens[0], e.pieces && e.pieces[0],
      `token ${e.block}: step ${e.step + 1}, probability ${e.confidences[0].toFixed(3)}`);
    this.append(e.tokens[0], e.pieces && e.pieces[0]);
  }

  append(token, piece) {
    this.text.textContent += piece === null || piece === undefined ? `${token} ` : piece;
  }

  result(e) {
    const ids = e.output_ids[0];
    this.text.textContent = e.text === null ? ids.join(" ") : e.text[0];
    const figures = [
      ["tokens", ids.length], ["forwards", e.nfe], ["tokens per step", e.tokens_per_step.toFixed(2)],
      ["forwards per token", e.forwards_per_token.toFixed(2)],
      ["time to first block", e.time_to_first_block === null ? "–" : `${e.time_to_first_block.toFixed(3)} s`],
      ["tokens/s", e.tokens_per_second.toFixed(1)],
    ];
    if (e.stats.accepted_per_block !== undefined) figures.push(["drafts accepted per block", e.stats.accepted_per_block.toFixed(2)]);
    this.figures.replaceChildren(...figures.map(([name, value]) => {
      const item = element("span", "", `${name} `);
      item.append(element("b", "", String(value)));
      return item;
    }));
    this.root.dataset.tokens = ids.length;
    this.root.classList.add("done");
  }
}

async function errorOf(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return `the server answered ${response.status} ${response.statusText}`;
  }
}

async function stream(body, view, signal) {
  const response = await fetch("v1/playground/events", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal,
  });
  if (!response.ok) throw new Error(await errorOf(response));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error("the server closed the stream before its end");
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, end).replace(/^data: /, "");
      buffer = buffer.slice(end + 2);
      if (data === "[DONE]") return;
      const event = JSON.parse(data);
      if (event.type === "error") throw new Error(event.error.message);
      view.on(event);
    }
  }
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

async function generate(submit) {
  submit.preventDefault();
  $("error").hidden = true;
  $("runs").replaceChildren();
  controller = new AbortController();
  $("generate").disabled = true;
  $("stop").disabled = false;
  const body = requestBody();
  const prompt = $("prompt").value + ($("prompt_ids").checked ? " → " : "");
  const runs = [stream(body, new RunView(body.mode, prompt), controller.signal)];
  if ($("compare").checked && body.mode !== "ar") {
    runs.push(stream({ ...body, mode: "ar" }, new RunView("ar (side by side)", prompt), controller.signal));
  }
  try {
    await Promise.all(runs);
  } catch (err) {
    controller.abort(); // one run failed: stop the other too
    showError(err.name === "AbortError" ? "stopped" : err.message);
  } finally {
    $("generate").disabled = false;
    $("stop").disabled = true;
  }
}

$("form").addEventListener("submit", generate);
$("stop").addEventListener("click", () => controller && controller.abort());
