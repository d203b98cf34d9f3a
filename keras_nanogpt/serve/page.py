"""The playground page `keras-nanogpt serve` answers at `/`: one HTML page, no build step, no assets.

It reads the model's name and size from `/v1/models`. In completion mode it sends the prompt to
`/v1/completions` with `stream: true` and writes the text in as the server-sent events come; in chat
mode it shows the conversation's turns and sends them (with an optional system message) to
`/v1/chat/completions`, streaming the assistant's reply into a new turn; Clear starts a new
conversation. Stop aborts the request, and the server then stops making tokens for it; the stop field
gives a stop string (`\\n` for a newline) in either mode. Its script and style are inline, allowed by their
hashes in the page's Content-Security-Policy (`page()` gives both), so it works offline and loads
nothing from anywhere.
"""

import base64
import hashlib

STYLE = """
:root { color-scheme: light dark; --accent: #c2410c; --muted: #6b7280; --line: #d1d5db; --panel: #f9fafb; }
@media (prefers-color-scheme: dark) { :root { --line: #374151; --panel: #111827; --muted: #9ca3af; } }
* { box-sizing: border-box; }
[hidden] { display: none !important; }
body { margin: 0; font: 15px/1.45 system-ui, sans-serif; }
header { display: flex; align-items: baseline; gap: 1em; padding: .7em 1.2em; border-bottom: 1px solid var(--line); }
header h1 { font-size: 1.1em; margin: 0; }
header #model { color: var(--muted); }
main { display: grid; grid-template-columns: 15em 1fr; gap: 1.2em; padding: 1.2em; max-width: 72em; }
aside label { display: block; margin-bottom: .8em; font-size: .9em; }
aside input { width: 100%; font: inherit; padding: .25em .4em; }
aside .pair { display: flex; gap: .5em; align-items: center; }
aside .pair input[type=range] { flex: 1; }
aside .pair input[type=number] { width: 5em; }
textarea { width: 100%; min-height: 6em; font: 14px/1.4 ui-monospace, monospace; padding: .5em; }
.buttons { display: flex; gap: .6em; align-items: center; margin: .6em 0; }
button { font: inherit; padding: .35em 1.1em; border-radius: .3em; border: 1px solid var(--line); cursor: pointer; }
button#generate { background: var(--accent); color: white; border-color: var(--accent); }
button:disabled { opacity: .45; cursor: default; }
#status { color: var(--muted); font-size: .9em; }
#status.error { color: #dc2626; }
#output { white-space: pre-wrap; font: 14px/1.5 ui-monospace, monospace; background: var(--panel);
          border: 1px solid var(--line); border-radius: .3em; padding: .8em; min-height: 12em; margin: 0; }
#completion { color: var(--accent); }
.modes { display: flex; gap: 1em; margin-bottom: .6em; }
#system { width: 100%; font: inherit; padding: .3em .5em; margin-bottom: .6em; }
#turns { display: flex; flex-direction: column; gap: .5em; margin-bottom: .6em; }
.turn { border: 1px solid var(--line); border-radius: .3em; padding: .4em .7em; background: var(--panel); }
.turn .role { font-size: .8em; color: var(--muted); }
.turn .content { white-space: pre-wrap; font: 14px/1.5 ui-monospace, monospace; }
.turn.assistant .content { color: var(--accent); }
"""

BODY = """
<header><h1>keras-nanogpt playground</h1><span id="model">loading the model&hellip;</span></header>
<main>
  <aside>
    <label>temperature <span class="pair"><input id="temperature-range" type="range" min="0" max="2" step="0.05"
      value="0.8"><input id="temperature" type="number" min="0" max="2" step="0.05" value="0.8"></span></label>
    <label>top-k (0: off) <input id="top_k" type="number" min="0" step="1" value="40"></label>
    <label>top-p <input id="top_p" type="number" min="0.01" max="1" step="0.01" value="1"></label>
    <label>max tokens <input id="max_tokens" type="number" min="1" step="1" value="200"></label>
    <label>seed (empty: random) <input id="seed" type="number" min="0" step="1"></label>
    <label>stop string (\\n: newline) <input id="stop_string" type="text" autocomplete="off"></label>
    <label id="key-row" hidden>API key <input id="key" type="password" autocomplete="off"></label>
  </aside>
  <section>
    <div class="modes"><label><input type="radio" name="mode" id="mode-completion" value="completion" checked>
      completion</label><label><input type="radio" name="mode" id="mode-chat" value="chat"> chat</label></div>
    <div id="chat-pane" hidden>
      <input id="system" type="text" placeholder="System message (optional)" autocomplete="off">
      <div id="turns"></div>
      <textarea id="message" placeholder="Type a message; Ctrl+Enter sends"></textarea>
    </div>
    <textarea id="prompt" placeholder="Type a prompt; Ctrl+Enter generates">It is a truth universally acknowledged</textarea>
    <div class="buttons"><button id="generate">Generate</button><button id="stop" disabled>Stop</button>
      <button id="clear" hidden>Clear</button><span id="status"></span></div>
    <pre id="output"><span id="echo"></span><span id="completion"></span></pre>
  </section>
</main>
"""

SCRIPT = """
const $ = (id) => document.getElementById(id);
let modelName = null, controller = null, mode = "completion", history = [], conversation = 0;

function headers() {
  const result = {"Content-Type": "application/json"};
  if ($("key").value) result.Authorization = "Bearer " + $("key").value;
  return result;
}

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function loadModel() {
  const health = await (await fetch("/health")).json();
  $("key-row").hidden = !health.auth;
  modelName = health.model;
  const response = await fetch("/v1/models", {headers: headers()});
  if (!response.ok) { $("model").textContent = modelName + " (enter the API key)"; return; }
  const card = (await response.json()).data[0];
  const millions = (card.parameters / 1e6).toFixed(card.parameters < 1e7 ? 2 : 1);
  $("model").textContent = `${card.id} \\u00b7 ${millions} M parameters \\u00b7 context ${card.context_length}` +
    ` \\u00b7 ${card.backend}`;
  $("max_tokens").max = card.max_tokens;
}

function settings() {
  const body = {model: modelName, stream: true, stream_options: {include_usage: true},
                max_tokens: Number($("max_tokens").value), temperature: Number($("temperature").value),
                top_p: Number($("top_p").value)};
  if (Number($("top_k").value) > 0) body.top_k = Number($("top_k").value);
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if ($("stop_string").value !== "") body.stop = [$("stop_string").value.replaceAll("\\\\n", "\\n")];
  return body;
}

function setMode(value) {
  mode = value;
  const chat = mode === "chat";
  $("chat-pane").hidden = !chat; $("clear").hidden = !chat;
  $("prompt").hidden = chat; $("output").hidden = chat;
  $("generate").textContent = chat ? "Send" : "Generate";
  status("");
}

function addTurn(role, text) {
  const turn = document.createElement("div"), label = document.createElement("div");
  const content = document.createElement("div");
  turn.className = "turn " + role; label.className = "role"; content.className = "content";
  label.textContent = role; content.textContent = text;
  turn.append(label, content);
  $("turns").append(turn);
  return content;
}

function clearChat() {
  if (controller) controller.abort();
  history = []; conversation += 1; $("turns").replaceChildren(); status("");
}

async function generate() {
  if (controller) return;
  let url, body, output;
  const current = conversation;
  if (mode === "chat") {
    const text = $("message").value;
    if (!text.trim()) return;
    history.push({role: "user", content: text});
    addTurn("user", text); $("message").value = "";
    output = addTurn("assistant", "");
    const system = $("system").value.trim() ? [{role: "system", content: $("system").value}] : [];
    url = "/v1/chat/completions"; body = {...settings(), messages: [...system, ...history]};
  } else {
    $("echo").textContent = $("prompt").value; $("completion").textContent = "";
    url = "/v1/completions"; body = {...settings(), prompt: $("prompt").value}; output = $("completion");
  }
  controller = new AbortController();
  $("generate").disabled = true; $("stop").disabled = false;
  const started = performance.now();
  let first = null, pieces = 0, reason = null, usage = null, failure = null;
  status("waiting for the first token\\u2026");
  try {
    const response = await fetch(url, {method: "POST", headers: headers(), body: JSON.stringify(body),
                                       signal: controller.signal});
    if (!response.ok) {
      const body = await response.json().catch(() => ({error: {message: response.statusText}}));
      if (response.status === 401) $("key-row").hidden = false;
      failure = `${response.status}: ${body.error.message}`;
      return;
    }
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let end;
      while ((end = buffer.indexOf("\\n\\n")) >= 0) {
        const line = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) { failure = chunk.error.message; continue; }
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices) {
          const text = choice.text ?? (choice.delta && choice.delta.content);
          if (text) {
            output.textContent += text;
            pieces += 1;
            if (first === null) first = performance.now();
          }
          if (choice.finish_reason) reason = choice.finish_reason;
        }
        const seconds = (performance.now() - (first ?? started)) / 1000;
        status(`${pieces} tokens \\u00b7 ${(pieces / Math.max(seconds, 1e-3)).toFixed(0)} tokens/s`);
      }
    }
  } catch (error) {
    failure = error.name === "AbortError" ? null : error.message;
    if (error.name === "AbortError") reason = "stopped";
  } finally {
    if (body.messages && current === conversation) {  // (Clear may have started a new one meanwhile)
      if (failure) history.pop();  // the turn failed: it is not part of the conversation
      else history.push({role: "assistant", content: output.textContent});
    }
    controller = null;
    $("generate").disabled = false; $("stop").disabled = true;
    const tokens = usage ? usage.completion_tokens : pieces;
    const seconds = (performance.now() - (first ?? started)) / 1000;
    if (failure) status(failure, true);
    else status(`${tokens} tokens \\u00b7 ${(tokens / Math.max(seconds, 1e-3)).toFixed(0)} tokens/s \\u00b7 ` +
                `first token after ${first === null ? "-" : ((first - started) / 1000).toFixed(2) + " s"}` +
                ` \\u00b7 ${reason ?? "ended"}`);
  }
}

$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", clearChat);
$("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && e.ctrlKey) generate(); });
$("message").addEventListener("keydown", (e) => { if (e.key === "Enter" && e.ctrlKey) generate(); });
for (const radio of document.querySelectorAll("input[name=mode]")) {
  radio.addEventListener("change", (e) => setMode(e.target.value));
}
$("temperature-range").addEventListener("input", (e) => { $("temperature").value = e.target.value; });
$("temperature").addEventListener("input", (e) => { $("temperature-range").value = e.target.value; });
$("key").addEventListener("change", loadModel);
loadModel().catch((error) => status(error.message, true));
"""


def page():
    """`(html, content_security_policy)`: the page, and the policy that allows exactly its script and style.

    Example:
        >>> html, policy = page()
        >>> html.startswith("<!doctype html>"), "connect-src 'self'" in policy
        (True, True)
    """
    html = ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<link rel=\"icon\" href=\"data:,\"><title>keras-nanogpt playground</title>"
            f"<style>{STYLE}</style></head><body>{BODY}<script>{SCRIPT}</script></body></html>\n")
    policy = (f"default-src 'none'; script-src {_hash(SCRIPT)}; style-src {_hash(STYLE)}; "
              "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html, policy


def _hash(source):
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"
