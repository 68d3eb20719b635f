// The chat page of `gemma4 serve`. It talks only to this server's OpenAI-compatible API
// (GET /v1/models, POST /v1/chat/completions with stream: true) and keeps conversations,
// settings and the API key in localStorage. Model text is rendered by markdown.js, which
// builds DOM nodes with textContent only; nothing here assigns innerHTML.

import { render } from "./markdown.js";

const STORE = "gemma4.chat.conversations";
const SETTINGS = "gemma4.chat.settings";
const API_KEY = "gemma4.chat.apiKey";
const NUMBERS = ["temperature", "top_p", "top_k", "max_tokens", "seed"];

const $ = (id) => document.getElementById(id);
const state = { chats: [], current: null, model: null, capabilities: {}, busy: null, attachments: [], opened: new Set() };

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function button(text, className, onClick) {
  const b = el("button", className, text);
  b.type = "button";
  b.addEventListener("click", onClick);
  return b;
}

const newId = () => Math.random().toString(36).slice(2, 10) + Date.now().toString(36);

function notice(text, kind = "error") {
  const n = $("notice");
  n.textContent = text;
  n.className = text ? kind : "";
}

// -- storage -------------------------------------------------------------------------------------

function loadStore() {
  try {
    const data = JSON.parse(localStorage.getItem(STORE) || "null");
    if (data && Array.isArray(data.chats)) {
      state.chats = data.chats.filter((c) => c && Array.isArray(c.messages));
      state.current = data.current;
    }
  } catch {
    notice("The saved conversations could not be read; starting afresh.");
  }
  for (const chat of state.chats) {  // a reply cut off by closing the page is no longer running
    for (const m of chat.messages) if (m.meta?.pending) { delete m.meta.pending; m.meta.finish ??= "stopped"; }
  }
}

function save() {
  try {
    localStorage.setItem(STORE, JSON.stringify({ version: 1, current: state.current, chats: state.chats }));
  } catch (error) {
    notice(`Could not save the conversation in this browser: ${error.message}`);
  }
}

function settings() {
  const s = { system: $("system-prompt").value, thinking: $("thinking").checked, tools: $("tools").value };
  for (const name of NUMBERS) s[name] = $(name).value;
  return s;
}

function loadSettings() {
  let s = {};
  try { s = JSON.parse(localStorage.getItem(SETTINGS) || "{}") || {}; } catch { /* defaults */ }
  $("system-prompt").value = s.system || "";
  $("thinking").checked = !!s.thinking;
  $("tools").value = s.tools || "";
  for (const name of NUMBERS) $(name).value = s[name] ?? "";
  $("api-key").value = localStorage.getItem(API_KEY) || "";
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

// -- conversations -------------------------------------------------------------------------------

const currentChat = () => state.chats.find((c) => c.id === state.current) || null;

function newChat() {
  const chat = { id: newId(), title: "New chat", created: Date.now(), messages: [] };
  state.chats.unshift(chat);
  state.current = chat.id;
  return chat;
}

function renderChatList() {
  const list = $("chat-list");
  list.replaceChildren();
  for (const chat of state.chats) {
    const li = el("li", chat.id === state.current ? "active" : "");
    const open = button(chat.title || "New chat", "chat-title", () => {
      if (state.busy) return;
      state.current = chat.id;
      save();
      renderAll();
    });
    open.title = chat.title;
    const remove = button("×", "chat-delete", () => {
      if (state.busy?.chat === chat) return;
      state.chats = state.chats.filter((c) => c !== chat);
      if (state.current === chat.id) state.current = state.chats[0]?.id ?? null;
      save();
      renderAll();
    });
    remove.title = "delete this conversation";
    remove.setAttribute("aria-label", "delete this conversation");
    li.append(open, remove);
    list.append(li);
  }
}

// -- rendering messages --------------------------------------------------------------------------

function meta(msg) {
  const m = msg.meta || {};
  const parts = [m.model || "?"];
  if (m.tokens !== undefined) parts.push(`${m.tokens} tokens`);
  if (m.tps !== undefined) parts.push(`${m.tps.toFixed(1)} tok/s`);
  if (m.finish === "length") parts.push("cut at max tokens");
  if (m.finish === "stopped") parts.push("stopped");
  if (m.pending) parts.push("…");
  return parts.join(" · ");
}

function attachmentNodes(msg) {
  const box = el("div", "attachment-list");
  for (const a of msg.attachments || []) {
    if (a.kind === "image" && a.url.startsWith("data:image/")) {
      const img = el("img", "attached-image");
      img.src = a.url;
      img.alt = a.name;
      box.append(img);
    } else {
      box.append(el("span", "chip", `${a.kind}: ${a.name}`));
    }
  }
  return box;
}

function toolCallNode(call) {
  const box = el("div", "tool-call");
  box.append(el("div", "tool-title", `Tool call: ${call.function?.name || "?"}`));
  let args = call.function?.arguments || "";
  try { args = JSON.stringify(JSON.parse(args), null, 2); } catch { /* still streaming, or not JSON */ }
  box.append(el("pre", "tool-args", args));
  return box;
}

function toolResultForm(chat, msg) {
  const form = el("form", "tool-results");
  const fields = msg.tool_calls.map((call) => {
    const label = el("label", "", `Result of ${call.function?.name || "the call"}`);
    const area = el("textarea");
    area.rows = 2;
    label.append(area);
    form.append(label);
    return [call, area];
  });
  const send = el("button", "", "Send results");
  send.type = "submit";
  form.append(send);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (state.busy) return;
    for (const [call, area] of fields) {
      chat.messages.push({ id: newId(), role: "tool", tool_call_id: call.id, name: call.function?.name,
                           content: area.value });
    }
    generate(chat);
  });
  return form;
}

function messageNode(chat, msg, index) {
  const node = el("div", `msg ${msg.role}`);
  node.dataset.id = msg.id;
  const last = index === chat.messages.length - 1;
  if (msg.role === "tool") {
    node.append(el("div", "role", `Tool result: ${msg.name || msg.tool_call_id || ""}`));
    node.append(el("pre", "tool-output", msg.content));
    return node;
  }
  node.append(el("div", "role", msg.role === "user" ? "You" : "Assistant"));
  if (msg.role === "user") {
    if (msg.editing) {
      const area = el("textarea", "edit-box");
      area.value = msg.content;
      area.rows = Math.min(12, msg.content.split("\n").length + 1);
      node.append(area, el("div", "actions"));
      node.lastChild.append(
        button("Send", "save-edit", () => {
          delete msg.editing;
          msg.content = area.value;
          chat.messages.splice(index + 1);
          generate(chat);
        }),
        button("Cancel", "cancel-edit", () => { delete msg.editing; renderMessages(); }));
      return node;
    }
    node.append(attachmentNodes(msg));
    node.append(el("div", "content plain", msg.content));
    const actions = node.appendChild(el("div", "actions"));
    actions.append(button("Edit", "edit", () => {
      if (state.busy) return;
      msg.editing = true;
      renderMessages();
    }));
    return node;
  }
  if (msg.reasoning) {
    const details = el("details", "thinking");
    details.open = state.opened.has(msg.id);
    details.addEventListener("toggle", () => {
      if (details.open) state.opened.add(msg.id); else state.opened.delete(msg.id);
    });
    details.append(el("summary", "", msg.meta?.pending && !msg.content ? "Thinking…" : "Thinking"));
    details.append(el("div", "thinking-text", msg.reasoning));
    node.append(details);
  }
  const content = el("div", msg.raw ? "content raw" : "content md");
  if (msg.raw) content.append(el("pre", "source", msg.content));
  else content.append(render(msg.content));
  node.append(content);
  for (const call of msg.tool_calls || []) node.append(toolCallNode(call));
  if (msg.meta?.error) node.append(el("div", "error", msg.meta.error));
  node.append(el("div", "meta", meta(msg)));
  if (!msg.meta?.pending) {
    const actions = node.appendChild(el("div", "actions"));
    actions.append(
      button("Regenerate", "regenerate", () => {
        if (state.busy) return;
        chat.messages.splice(index);
        generate(chat);
      }),
      button(msg.raw ? "Rendered" : "Source", "toggle-source", () => { msg.raw = !msg.raw; renderMessages(); }),
      button("Copy", "copy", () => navigator.clipboard?.writeText(msg.content)));
    if (last && msg.meta?.finish === "tool_calls" && msg.tool_calls?.length) node.append(toolResultForm(chat, msg));
  }
  return node;
}

function renderMessages() {
  const box = $("messages");
  const chat = currentChat();
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  box.replaceChildren();
  if (!chat || !chat.messages.length) {
    box.append(el("p", "empty", "Send a message to start."));
    return;
  }
  chat.messages.forEach((msg, i) => box.append(messageNode(chat, msg, i)));
  if (atBottom || state.busy) box.scrollTop = box.scrollHeight;
}

function renderOne(chat, msg) {
  const old = document.querySelector(`#messages .msg[data-id="${msg.id}"]`);
  if (!old || currentChat() !== chat) return;
  const box = $("messages");
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  old.replaceWith(messageNode(chat, msg, chat.messages.indexOf(msg)));
  if (atBottom) box.scrollTop = box.scrollHeight;
}

function renderAll() {
  renderChatList();
  renderMessages();
}

// -- talking to the server -----------------------------------------------------------------------

async function errorText(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body?.error?.message) message = `${response.status}: ${body.error.message}`;
  } catch { /* not JSON */ }
  if (response.status === 401) message += " Enter the server's API key in Settings.";
  return message;
}

async function loadModels() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (response.status === 503) {
      $("model-name").textContent = "model loading…";
      setTimeout(loadModels, 2000);
      return;
    }
    if (!response.ok) throw new Error(await errorText(response));
    const entry = (await response.json()).data?.[0];
    if (!entry) throw new Error("the server lists no model");
    state.model = entry.id;
    state.capabilities = entry.capabilities || {};
    $("model-name").textContent = entry.id;
    $("model-name").title = `context: ${entry.max_model_len ?? "?"} tokens`;
    notice("");
  } catch (error) {
    state.model = null;
    $("model-name").textContent = "not connected";
    notice(error.message);
  }
  const caps = state.capabilities;
  $("attach-image").hidden = caps.image !== true;
  $("attach-audio").hidden = caps.audio !== true;
  $("thinking-row").hidden = caps.thinking === false;
  $("tools-row").hidden = caps.tools === false;
}

function apiMessages(chat) {
  const s = settings();
  const out = s.system.trim() ? [{ role: "system", content: s.system }] : [];
  for (const m of chat.messages) {
    if (m.role === "user") {
      if (!m.attachments?.length) { out.push({ role: "user", content: m.content }); continue; }
      const parts = [{ type: "text", text: m.content }];
      for (const a of m.attachments) {
        if (a.kind === "image") parts.push({ type: "image_url", image_url: { url: a.url } });
        else parts.push({ type: "input_audio", input_audio: { data: a.url.split(",")[1] || "", format: a.format } });
      }
      out.push({ role: "user", content: parts });
    } else if (m.role === "assistant") {
      const entry = { role: "assistant", content: m.content || "" };
      if (m.tool_calls?.length) {
        entry.tool_calls = m.tool_calls.map((c) => ({ id: c.id, type: "function", function: c.function }));
      }
      out.push(entry);
    } else if (m.role === "tool") {
      out.push({ role: "tool", tool_call_id: m.tool_call_id, content: m.content });
    }
  }
  return out;
}

function requestBody(chat) {
  const s = settings();
  const body = { model: state.model, messages: apiMessages(chat), stream: true,
                 stream_options: { include_usage: true } };
  for (const name of NUMBERS) {
    if (s[name] === "") continue;
    const value = Number(s[name]);
    if (!Number.isFinite(value)) throw new Error(`${name} must be a number`);
    body[name] = ["top_k", "max_tokens", "seed"].includes(name) ? Math.trunc(value) : value;
  }
  if (s.thinking && state.capabilities.thinking !== false) body.chat_template_kwargs = { enable_thinking: true };
  if (s.tools.trim() && state.capabilities.tools !== false) {
    let tools;
    try { tools = JSON.parse(s.tools); } catch (error) { throw new Error(`Tools are not valid JSON: ${error.message}`); }
    if (!Array.isArray(tools)) throw new Error("Tools must be a JSON list");
    if (tools.length) body.tools = tools;
  }
  return body;
}

/** The JSON payloads of a server-sent event stream, up to `data: [DONE]`. */
async function* events(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = frame.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;  // a comment (keep-alive) or an empty frame
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

function applyDelta(msg, delta) {
  if (delta.content) msg.content += delta.content;
  const thought = delta.reasoning ?? delta.reasoning_content;
  if (thought) msg.reasoning = (msg.reasoning || "") + thought;
  for (const part of delta.tool_calls || []) {
    msg.tool_calls ??= [];
    const call = msg.tool_calls[part.index] ??= { id: "", type: "function", function: { name: "", arguments: "" } };
    if (part.id) call.id = part.id;
    if (part.function?.name) call.function.name += part.function.name;
    if (part.function?.arguments) call.function.arguments += part.function.arguments;
  }
  return !!(delta.content || thought || delta.tool_calls?.length);
}

async function generate(chat) {
  if (state.busy) return;
  if (!state.model) await loadModels();
  let body = null;
  let invalid = null;  // shown on the reply, as any other failure
  try { body = requestBody(chat); } catch (error) { invalid = error; }
  const msg = { id: newId(), role: "assistant", content: "", meta: { model: state.model, pending: true } };
  chat.messages.push(msg);
  const controller = new AbortController();
  state.busy = { chat, msg, controller };
  setBusy(true);
  save();
  renderAll();
  let first = null;
  let deltas = 0;
  let usage = null;
  let timer = null;
  const redraw = () => {
    if (timer === null) timer = setTimeout(() => { timer = null; renderOne(chat, msg); }, 30);
  };
  try {
    if (!state.model) throw new Error("No model to talk to: is the server running?");
    if (invalid) throw invalid;
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const event of events(response.body)) {
      if (event.error) throw new Error(event.error.message || "the server reported an error");
      if (event.usage) usage = event.usage;
      for (const choice of event.choices || []) {
        if (choice.delta && applyDelta(msg, choice.delta)) {
          deltas++;
          first ??= performance.now();
        }
        if (choice.finish_reason) msg.meta.finish = choice.finish_reason;
      }
      redraw();
    }
  } catch (error) {
    if (error.name === "AbortError") msg.meta.finish = "stopped";
    else msg.meta.error = error.message;
  } finally {
    clearTimeout(timer);
    const seconds = first === null ? 0 : (performance.now() - first) / 1000;
    const tokens = usage?.completion_tokens ?? deltas;
    if (tokens) msg.meta.tokens = tokens;
    if (tokens > 1 && seconds > 0) msg.meta.tps = (tokens - 1) / seconds;  // after the first token: decode speed
    delete msg.meta.pending;
    state.busy = null;
    setBusy(false);
    save();
    renderAll();
  }
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  document.body.classList.toggle("busy", busy);
}

// -- composing -----------------------------------------------------------------------------------

function renderAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  state.attachments.forEach((a, i) => {
    const chip = el("span", "chip", `${a.kind}: ${a.name} `);
    chip.append(button("×", "chip-remove", () => { state.attachments.splice(i, 1); renderAttachments(); }));
    box.append(chip);
  });
}

function attach(kind, input) {
  const file = input.files?.[0];
  input.value = "";
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    // OpenAI's input_audio names only wav or mp3; the server decodes FLAC, OGG, ... from the bytes.
    const format = (file.name.split(".").pop() || "").toLowerCase() === "mp3" ? "mp3" : "wav";
    state.attachments.push({ kind, name: file.name, url: String(reader.result), format });
    renderAttachments();
  };
  reader.onerror = () => notice(`Could not read ${file.name}`);
  reader.readAsDataURL(file);
}

function send(event) {
  event?.preventDefault();
  const text = $("input").value;
  if (state.busy || (!text.trim() && !state.attachments.length)) return;
  const chat = currentChat() || newChat();
  const msg = { id: newId(), role: "user", content: text };
  if (state.attachments.length) msg.attachments = state.attachments;
  chat.messages.push(msg);
  if (chat.title === "New chat") chat.title = text.trim().split("\n")[0].slice(0, 60) || "Attachment";
  state.attachments = [];
  renderAttachments();
  $("input").value = "";
  generate(chat);
}

function saveSettings() {
  localStorage.setItem(SETTINGS, JSON.stringify(settings()));
}

function init() {
  loadStore();
  loadSettings();
  renderAll();
  $("composer").addEventListener("submit", send);
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) send(event);
  });
  $("stop").addEventListener("click", () => state.busy?.controller.abort());
  $("new-chat").addEventListener("click", () => {
    if (state.busy) return;
    const chat = currentChat();
    if (!chat || chat.messages.length) newChat();
    save();
    renderAll();
    $("input").focus();
  });
  $("settings-toggle").addEventListener("click", () => {
    const panel = $("settings");
    panel.hidden = !panel.hidden;
    $("settings-toggle").setAttribute("aria-expanded", String(!panel.hidden));
  });
  $("settings").addEventListener("change", saveSettings);
  $("settings").addEventListener("input", saveSettings);
  $("api-key").addEventListener("change", () => {
    localStorage.setItem(API_KEY, $("api-key").value.trim());
    loadModels();
  });
  $("attach-image").addEventListener("click", () => $("image-file").click());
  $("attach-audio").addEventListener("click", () => $("audio-file").click());
  $("image-file").addEventListener("change", () => attach("image", $("image-file")));
  $("audio-file").addEventListener("change", () => attach("audio", $("audio-file")));
  loadModels();
  $("input").focus();
}

init();
