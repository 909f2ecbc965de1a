// The playground and admin page. Plain JavaScript, no build step, no third-party code: it talks to the
// server only through its public HTTP API (/v1 for tasks, /admin for prompt sets). Secrets (the API key
// and the admin token) live in this page's memory only: never in storage, cookies or the URL.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { tasks: [], controller: null };

// ---- HTTP ----------------------------------------------------------------------------------------------

function authHeaders(token) {
  return token ? { Authorization: `Bearer ${token}` } : {};
}

// The server's own error message, as it sent it ({"error": {"message": ...}}), else the status line.
async function errorMessage(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch (_) { /* not JSON: fall through */ }
  return `${response.status} ${response.statusText}${text ? `: ${text.slice(0, 500)}` : ""}`;
}

async function call(method, path, { token = "", json, body, headers = {}, signal } = {}) {
  const init = { method, headers: { ...authHeaders(token), ...headers }, signal };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (body !== undefined) {
    init.body = body;
  }
  const response = await fetch(path, init);
  if (!response.ok) throw new Error(await errorMessage(response));
  return response;
}

// ---- views ---------------------------------------------------------------------------------------------

function showView(name) {
  for (const tab of document.querySelectorAll("[role=tab]")) {
    const selected = tab.dataset.view === name;
    tab.setAttribute("aria-selected", String(selected));
    $(`view-${tab.dataset.view}`).hidden = !selected;
  }
}

function showError(element, message) {
  element.textContent = message || "";
  element.hidden = !message;
}

// ---- playground ----------------------------------------------------------------------------------------

async function loadTasks() {
  try {
    const response = await call("GET", "/v1/tasks", { token: $("api-key").value });
    state.tasks = (await response.json()).data;
  } catch (error) {
    showError($("playground-error"), `Could not list the tasks: ${error.message}`);
    return;
  }
  const select = $("task");
  const previous = select.value;
  select.replaceChildren(...state.tasks.map((task) => {
    const option = document.createElement("option");
    option.value = task.name;
    option.textContent = `${task.name} (${task.type})`;
    return option;
  }));
  const preferred = state.tasks.find((t) => t.name === previous) || state.tasks.find((t) => t.name === "chat");
  if (preferred) select.value = preferred.name;
  describeTask();
}

function currentTask() {
  return state.tasks.find((t) => t.name === $("task").value);
}

function describeTask() {
  const task = currentTask();
  if (!task) return;
  const parts = [task.type];
  if (task.kind) parts.push(`${task.kind} prompt set v${task.active_version}, ${task.num_virtual_tokens} virtual tokens`);
  else parts.push("the base model, no prompt set");
  if (task.labels.length) parts.push(`labels: ${task.labels.join(", ")}`);
  $("task-info").textContent = parts.join(" · ");
  for (const element of document.querySelectorAll(".generate-only")) element.hidden = task.type !== "generate";
  $("input").placeholder = task.type === "generate" ? "Ask something" : "Paste the text to label";
}

function clearResult() {
  $("chat-output").textContent = "";
  $("scores").replaceChildren();
  $("entity-text").replaceChildren();
  $("entity-list").replaceChildren();
  for (const id of ["chat-output", "scores", "entities"]) $(id).hidden = true;
  showError($("playground-error"), "");
}

async function run() {
  const task = currentTask();
  const text = $("input").value;
  if (!task) return showError($("playground-error"), "No task selected");
  clearResult();
  state.controller = new AbortController();
  $("run").disabled = true;
  $("stop").disabled = false;
  $("run-status").textContent = "running…";
  const started = performance.now();
  try {
    if (task.type === "generate") await streamChat(task, text, state.controller.signal);
    else if (task.type === "classify") renderScores(await label(task, text, state.controller.signal));
    else renderEntities(text, await label(task, text, state.controller.signal));
    $("run-status").textContent = `done in ${((performance.now() - started) / 1000).toFixed(2)} s`;
  } catch (error) {
    $("run-status").textContent = "";
    if (error.name !== "AbortError") showError($("playground-error"), error.message);
    else $("run-status").textContent = "stopped";
  } finally {
    $("run").disabled = false;
    $("stop").disabled = true;
    state.controller = null;
  }
}

async function label(task, text, signal) {
  const response = await call("POST", `/v1/tasks/${encodeURIComponent(task.name)}`,
    { token: $("api-key").value, json: { text }, signal });
  return response.json();
}

// Server-sent events from POST /v1/tasks/{task} with "stream": true: `data: {json}` blocks, `data: [DONE]`.
async function streamChat(task, text, signal) {
  const output = $("chat-output");
  output.hidden = false;
  const response = await call("POST", `/v1/tasks/${encodeURIComponent(task.name)}`, {
    token: $("api-key").value, signal,
    json: { messages: [{ role: "user", content: text }], stream: true,
            max_tokens: Number($("max-tokens").value) || 128 },
  });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffered.indexOf("\n\n")) >= 0) {
      const block = buffered.slice(0, end);
      buffered = buffered.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const event = JSON.parse(data);
        if (event.error) throw new Error(`${event.error.code}: ${event.error.message}`);
        output.textContent += event.text || "";
        if (event.finish_reason) output.dataset.finishReason = event.finish_reason;
      }
    }
  }
}

function renderScores(result) {
  const container = $("scores");
  container.hidden = false;
  const entries = Object.entries(result.scores).sort((a, b) => b[1] - a[1]);
  container.replaceChildren(...entries.map(([name, score]) => {
    const row = document.createElement("div");
    row.className = "score-row" + (name === result.label ? " winner" : "");
    row.dataset.label = name;
    row.dataset.score = String(score);
    const caption = document.createElement("span");
    caption.className = "score-label";
    caption.textContent = name;
    const track = document.createElement("span");
    track.className = "track";
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${(Math.max(0, Math.min(1, score)) * 100).toFixed(1)}%`;
    track.append(bar);
    const value = document.createElement("span");
    value.className = "score-value";
    value.textContent = `${(score * 100).toFixed(1)}%`;
    row.append(caption, track, value);
    return row;
  }));
}

// Entities come with character offsets into the text as the server counts characters (Unicode code
// points); JavaScript strings count UTF-16 units, so the text is split into code points first.
function renderEntities(text, result) {
  const container = $("entities");
  container.hidden = false;
  const chars = Array.from(text);
  const spans = [...result.entities].sort((a, b) => a.start - b.start);
  const pieces = [];
  let at = 0;
  for (const entity of spans) {
    if (entity.start < at) continue; // overlapping: the first one wins
    if (entity.start > at) pieces.push(document.createTextNode(chars.slice(at, entity.start).join("")));
    const mark = document.createElement("mark");
    mark.className = `entity entity-${entity.label.replace(/[^A-Za-z0-9_-]/g, "")}`;
    mark.dataset.label = entity.label;
    mark.title = entity.label;
    mark.textContent = chars.slice(entity.start, entity.end).join("");
    const tag = document.createElement("sup");
    tag.textContent = entity.label;
    mark.append(tag);
    pieces.push(mark);
    at = entity.end;
  }
  if (at < chars.length) pieces.push(document.createTextNode(chars.slice(at).join("")));
  $("entity-text").replaceChildren(...pieces);
  $("entity-list").replaceChildren(...(spans.length ? spans.map((e) => {
    const item = document.createElement("li");
    item.textContent = `${e.label}: ${e.text}`;
    return item;
  }) : [Object.assign(document.createElement("li"), { textContent: "no entities found" })]));
}

// ---- admin ---------------------------------------------------------------------------------------------

function adminToken() {
  return $("admin-token").value.trim();
}

function adminSays(message, isError = false) {
  const element = $("admin-message");
  element.textContent = message;
  element.className = isError ? "error" : "ok";
  element.hidden = !message;
}

async function loadPromptSets() {
  let sets;
  try {
    sets = await (await call("GET", "/admin/prompt-sets", { token: adminToken() })).json();
  } catch (error) {
    $("prompt-sets").replaceChildren();
    return adminSays(error.message, true);
  }
  $("prompt-sets").replaceChildren(...sets.map(renderTaskCard));
  if (!sets.length) $("prompt-sets").textContent = "No prompt sets stored yet.";
}

function button(text, className, onClick, disabled = false) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.className = className;
  b.disabled = disabled;
  b.addEventListener("click", onClick);
  return b;
}

function cell(row, text) {
  const td = document.createElement("td");
  if (text instanceof Node) td.append(text); else td.textContent = text;
  row.append(td);
  return td;
}

function renderTaskCard(task) {
  const card = document.createElement("div");
  card.className = "card task-card";
  card.dataset.task = task.name;
  const title = document.createElement("h2");
  title.textContent = `${task.name} `;
  const active = document.createElement("span");
  active.className = "muted";
  active.textContent = task.active_version ? `active v${task.active_version}` : "no active version";
  title.append(active, button("Delete task", "danger", () => adminAction(
    `Delete task '${task.name}' and all its versions?`, "DELETE",
    `/admin/prompt-sets/${encodeURIComponent(task.name)}`, `deleted task ${task.name}`)));
  const table = document.createElement("table");
  const head = table.createTHead().insertRow();
  for (const name of ["version", "kind", "type", "virtual tokens", "labels", "size", "uploaded", "sha256", ""]) {
    const th = document.createElement("th");
    th.textContent = name;
    head.append(th);
  }
  const body = table.createTBody();
  for (const v of [...task.versions].sort((a, b) => b.version - a.version)) {
    const row = body.insertRow();
    row.dataset.version = String(v.version);
    if (v.active) row.className = "active";
    cell(row, `v${v.version}${v.active ? " (active)" : ""}`);
    cell(row, v.kind);
    cell(row, v.task_type);
    cell(row, String(v.num_virtual_tokens));
    cell(row, v.labels.join(", "));
    cell(row, `${(v.size / 1024).toFixed(1)} KiB`);
    cell(row, new Date(v.created * 1000).toLocaleString());
    cell(row, v.sha256.slice(0, 12)).title = v.sha256;
    const actions = cell(row, "");
    const path = `/admin/prompt-sets/${encodeURIComponent(task.name)}/versions/${v.version}`;
    actions.append(
      button("Activate", "activate", () => adminAction(null, "POST", `${path}/activate`,
        `${task.name}: v${v.version} is active`), v.active),
      button("Delete", "delete danger", () => adminAction(`Delete ${task.name} v${v.version}?`, "DELETE", path,
        `deleted ${task.name} v${v.version}`)));
  }
  card.append(title, table);
  return card;
}

async function adminAction(question, method, path, done) {
  if (question && !window.confirm(question)) return;
  try {
    await call(method, path, { token: adminToken() });
    adminSays(done);
  } catch (error) {
    adminSays(error.message, true);
  }
  await loadPromptSets();
  await loadTasks();
}

async function upload(event) {
  event.preventDefault();
  const name = $("upload-name").value.trim();
  const file = $("upload-file").files[0];
  if (!file) return adminSays("Choose a .safetensors file or a zipped PEFT adapter", true);
  const zipped = file.name.toLowerCase().endsWith(".zip");
  const query = zipped ? `?task_type=${encodeURIComponent($("upload-task-type").value)}` : "";
  $("upload").disabled = true;
  try {
    const response = await call("PUT", `/admin/prompt-sets/${encodeURIComponent(name)}${query}`, {
      token: adminToken(), body: await file.arrayBuffer(),
      headers: { "Content-Type": zipped ? "application/zip" : "application/octet-stream" },
    });
    const stored = await response.json();
    adminSays(response.status === 201
      ? `stored ${stored.name} v${stored.version} (${stored.kind}, ${stored.task_type}) and made it active`
      : `already stored as ${stored.name} v${stored.version}: nothing new was stored`);
  } catch (error) {
    adminSays(error.message, true);
  } finally {
    $("upload").disabled = false;
  }
  await loadPromptSets();
  await loadTasks();
}

// ---- wiring --------------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  for (const tab of document.querySelectorAll("[role=tab]")) {
    tab.addEventListener("click", () => showView(tab.dataset.view));
  }
  $("task").addEventListener("change", () => { describeTask(); clearResult(); });
  $("run").addEventListener("click", run);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("input").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) run(); });
  $("api-key").addEventListener("change", loadTasks);
  $("admin-connect").addEventListener("click", loadPromptSets);
  $("admin-token").addEventListener("keydown", (e) => { if (e.key === "Enter") loadPromptSets(); });
  $("upload-form").addEventListener("submit", upload);
  loadTasks();
});
