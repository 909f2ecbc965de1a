// The playground and admin page. Plain JavaScript, no build step, no third-party code: it talks to the
// server only through its public HTTP API (/v1 for tasks, files and fine-tuning jobs, /admin for prompt sets). Secrets (the API key
// and the admin token) live in this page's memory only: never in storage, cookies or the URL.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { tasks: [], controller: null, job: null, poll: null };

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

// ---- fine-tune -----------------------------------------------------------------------------------------
// OpenAI's files and fine-tuning endpoints, as the openai SDK calls them: upload JSONL files, start a job,
// follow its events (the loss and validation curves are drawn from its `metrics` events), try the result.

const TERMINAL = ["succeeded", "failed", "cancelled"];

function ftToken() {
  return $("ft-token").value.trim() || adminToken();
}

function ftSays(message, isError = false) {
  const element = $("ft-message");
  element.textContent = message;
  element.className = isError ? "error" : "ok";
  element.hidden = !message;
}

async function uploadTrainingFile(file) {
  const form = new FormData();
  form.append("purpose", "fine-tune");
  form.append("file", file, file.name);
  return (await call("POST", "/v1/files", { token: ftToken(), body: form })).json();
}

function autoOr(value, parse) {
  const text = value.trim();
  return text === "" || text === "auto" ? "auto" : parse(text);
}

async function startJob(event) {
  event.preventDefault();
  const train = $("ft-train").files[0];
  if (!train) return ftSays("Choose a training file (JSONL)", true);
  $("ft-start").disabled = true;
  try {
    const training = await uploadTrainingFile(train);
    const valid = $("ft-valid").files[0] ? await uploadTrainingFile($("ft-valid").files[0]) : null;
    const models = await (await call("GET", "/v1/models", { token: $("api-key").value })).json();
    const promote = $("ft-promote").value.trim();
    const body = {
      model: models.data[0].id, training_file: training.id,
      hyperparameters: { n_epochs: autoOr($("ft-epochs").value, (t) => parseInt(t, 10)),
                         learning_rate_multiplier: autoOr($("ft-lrm").value, Number) },
    };
    if (valid) body.validation_file = valid.id;
    if ($("ft-suffix").value.trim()) body.suffix = $("ft-suffix").value.trim();
    // promoting: the task's own kind and size; otherwise the ones chosen here
    if (promote) body.metadata = { promote_to: promote };
    else body.prompt_set = { kind: $("ft-kind").value, virtual_tokens: parseInt($("ft-tokens").value, 10) };
    const job = await (await call("POST", "/v1/fine_tuning/jobs", { token: ftToken(), json: body })).json();
    ftSays(job.status === "failed" ? `job ${job.id} failed: ${job.error.message}` : `started ${job.id}`,
           job.status === "failed");
    await loadJobs();
    selectJob(job.id);
  } catch (error) {
    ftSays(error.message, true);
  } finally {
    $("ft-start").disabled = false;
  }
}

async function loadJobs() {
  let jobs;
  try {
    jobs = (await (await call("GET", "/v1/fine_tuning/jobs?limit=100", { token: ftToken() })).json()).data;
  } catch (error) {
    return ftSays(error.message, true);
  }
  const body = $("ft-jobs").tBodies[0];
  body.replaceChildren();
  for (const job of jobs) {
    const row = body.insertRow();
    row.dataset.job = job.id;
    row.dataset.status = job.status;
    if (job.id === state.job) row.className = "selected";
    cell(row, job.id);
    cell(row, job.status);
    cell(row, job.fine_tuned_model || "");
    cell(row, new Date(job.created_at * 1000).toLocaleString());
    cell(row, button("Show", "show", () => selectJob(job.id)));
  }
}

function selectJob(id) {
  state.job = id;
  clearInterval(state.poll);
  $("ft-detail").hidden = false;
  $("ft-detail-title").textContent = id;
  for (const row of $("ft-jobs").tBodies[0].rows) row.className = row.dataset.job === id ? "selected" : "";
  refreshJob();
  state.poll = setInterval(refreshJob, 1000);
}

async function refreshJob() {
  const id = state.job;
  let job, events;
  try {
    job = await (await call("GET", `/v1/fine_tuning/jobs/${id}`, { token: ftToken() })).json();
    events = (await (await call("GET", `/v1/fine_tuning/jobs/${id}/events?limit=1000`,
                                { token: ftToken() })).json()).data.reverse();  // oldest first
  } catch (error) {
    clearInterval(state.poll);
    return ftSays(error.message, true);
  }
  if (id !== state.job) return;  // another job was chosen meanwhile
  $("ft-status").textContent = job.status + (job.fine_tuned_model ? ` → ${job.fine_tuned_model}` : "");
  $("ft-detail").dataset.status = job.status;
  $("ft-cancel").hidden = TERMINAL.includes(job.status);
  $("ft-try").hidden = job.status !== "succeeded";
  $("ft-try").dataset.model = job.fine_tuned_model || "";
  const metrics = events.filter((e) => e.type === "metrics");
  drawChart($("ft-loss-chart"), metrics.filter((e) => "train_loss" in e.data).map((e) => e.data.train_loss));
  const validKey = metrics.some((e) => "valid_f1" in e.data) ? "valid_f1" : "valid_loss";
  $("ft-valid-caption").textContent = `validation (${validKey === "valid_f1" ? "F1" : "loss"}, each epoch)`;
  drawChart($("ft-valid-chart"), metrics.filter((e) => validKey in e.data).map((e) => e.data[validKey]), true);
  $("ft-events").replaceChildren(...events.filter((e) => e.type !== "metrics" || !("train_loss" in e.data))
    .map((e) => Object.assign(document.createElement("li"), {
      textContent: `${new Date(e.created_at * 1000).toLocaleTimeString()}  ${e.message}`, className: e.level })));
  if (TERMINAL.includes(job.status)) {
    clearInterval(state.poll);
    await loadJobs();
  }
}

// A line through the values (left to right, scaled to their range), with its first and last value written.
function drawChart(svg, values, dots = false) {
  const ns = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  svg.dataset.points = String(values.length);
  if (!values.length) return;
  const [w, h, pad] = [400, 160, 14];
  const lo = Math.min(...values), hi = Math.max(...values), span = hi - lo || 1;
  const xy = values.map((v, i) => [pad + (values.length > 1 ? i / (values.length - 1) : 0.5) * (w - 2 * pad),
                                   h - pad - ((v - lo) / span) * (h - 2 * pad)]);
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", xy.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" "));
  svg.append(line);
  if (dots) {
    for (const [x, y] of xy) {
      const dot = document.createElementNS(ns, "circle");
      dot.setAttribute("cx", x.toFixed(1));
      dot.setAttribute("cy", y.toFixed(1));
      dot.setAttribute("r", "3");
      svg.append(dot);
    }
  }
  for (const [text, x, anchor] of [[values[0], pad, "start"], [values[values.length - 1], w - pad, "end"]]) {
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", String(x));
    label.setAttribute("y", "11");
    label.setAttribute("text-anchor", anchor);
    label.textContent = text.toFixed(4);
    svg.append(label);
  }
}

async function cancelJob() {
  try {
    await call("POST", `/v1/fine_tuning/jobs/${state.job}/cancel`, { token: ftToken() });
    ftSays(`cancelled ${state.job}`);
  } catch (error) {
    ftSays(error.message, true);
  }
  refreshJob();
}

async function tryResult() {
  const model = $("ft-try").dataset.model;
  showView("playground");
  await loadTasks();
  $("task").value = model;
  describeTask();
  clearResult();
  $("input").focus();
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
  // one admin token for both tabs: typed in either, the other follows
  $("ft-token").addEventListener("input", () => { $("admin-token").value = $("ft-token").value; });
  $("admin-token").addEventListener("input", () => { $("ft-token").value = $("admin-token").value; });
  $("ft-connect").addEventListener("click", loadJobs);
  $("ft-refresh").addEventListener("click", loadJobs);
  $("ft-form").addEventListener("submit", startJob);
  $("ft-cancel").addEventListener("click", cancelJob);
  $("ft-try").addEventListener("click", tryResult);
  loadTasks();
});
