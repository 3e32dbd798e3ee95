// The Keel web UI: every action is one call to /api/ (or keel deploy's /v1/); errors show on the page.
const $ = id => document.getElementById(id);
const keyBox = $("key");
keyBox.value = localStorage.getItem("keel-key") || "";  // the same key the chat page (keel deploy's) reads
keyBox.onchange = () => localStorage.setItem("keel-key", keyBox.value);
const state = {rows: null, kinds: [], run: null, next: 0, points: {}, job: null};

function headers() {
  const h = {"Content-Type": "application/json"};
  if (keyBox.value) h["Authorization"] = "Bearer " + keyBox.value;
  return h;
}
async function api(method, path, body) {
  const r = await fetch(path, {method, headers: headers(), body: body === undefined ? undefined : JSON.stringify(body)});
  const d = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(d.error ? d.error.message : `HTTP ${r.status}`);
  return d;
}
function say(id, text, error) { const el = $(id); el.textContent = text; el.className = "msg" + (error ? " error" : ""); }
async function guarded(id, fn) {
  try { say(id, ""); await fn(); } catch (e) { say(id, e.message, true); }
}

// --- tabs
document.querySelectorAll("nav button").forEach(b => b.onclick = () => {
  document.querySelectorAll("nav button, .tab").forEach(x => x.classList.remove("on"));
  b.classList.add("on"); $(b.dataset.tab).classList.add("on");
  $("ckptbar").classList.toggle("on", ["compare", "chat", "export"].includes(b.dataset.tab));
  if (b.dataset.tab === "chat" && !$("chat_frame").src) $("chat_frame").src = "/chat";
});

// --- identity
function identity() {
  return {name_zh: $("name_zh").value, name_en: $("name_en").value, author_zh: $("author_zh").value,
          author_en: $("author_en").value, system: $("system").value, model: $("model").value};
}
function showRows(findings) {
  const byRow = {};
  findings.filter(f => f.row).forEach(f => (byRow[f.row] = byRow[f.row] || []).push(f.message));
  $("findings").textContent = findings.length ? `keel data check: ${findings.length} finding(s)` : "keel data check: no problems found";
  findings.filter(f => !f.row).forEach(f => { const p = document.createElement("div"); p.className = "finding"; p.textContent = f.message; $("findings").appendChild(p); });
  const table = $("rows"); table.innerHTML = "<tr><th>#</th><th>kind</th><th>conversation (answers are editable)</th><th>drop</th></tr>";
  state.rows.forEach((row, i) => {
    const tr = table.insertRow(); tr.className = "row";
    tr.insertCell().textContent = i + 1;
    tr.insertCell().innerHTML = `<span class="kind">${state.kinds[i] || "edited"}</span>`;
    const cell = tr.insertCell();
    row.messages.forEach(m => {
      if (m.role === "assistant") {
        const t = document.createElement("textarea"); t.value = m.content;
        t.oninput = () => { m.content = t.value; }; cell.appendChild(t);
      } else {
        const d = document.createElement("div"); d.textContent = `${m.role}: ${m.content}`; cell.appendChild(d);
      }
    });
    (byRow[i + 1] || []).forEach(msg => { const d = document.createElement("div"); d.className = "finding"; d.textContent = msg; cell.appendChild(d); });
    const drop = document.createElement("input"); drop.type = "checkbox";
    drop.onchange = () => { row.dropped = drop.checked; }; tr.insertCell().appendChild(drop);
  });
}
function keptRows() { return state.rows ? state.rows.filter(r => !r.dropped).map(r => ({messages: r.messages})) : null; }
$("preview").onclick = () => guarded("identity_msg", async () => {
  say("identity_msg", "building rows…");
  const d = await api("POST", "/api/identity/preview", identity());
  state.rows = d.rows; state.kinds = d.kinds; showRows(d.findings);
  say("identity_msg", `${d.rows.length} rows for ${d.names.join(" / ")} by ${d.authors.join(" / ")}`);
});
$("recheck").onclick = () => guarded("identity_msg", async () => {
  if (!state.rows) throw new Error("press Preview rows first");
  const d = await api("POST", "/api/identity/check", {...identity(), rows: keptRows()});
  state.rows = state.rows.filter(r => !r.dropped); state.kinds = []; showRows(d.findings);
});

// --- train
function number(id) { const s = $(id).value, v = Number(s); return s.trim() !== "" && isFinite(v) ? v : s; }
function runForm() {
  return {...identity(), folder: $("folder").value, general: $("general").value, rows: keptRows(),
          num_train_epochs: number("epochs"), learning_rate: number("lr"), lora_rank: number("rank"),
          max_length: number("max_length"), probes: $("probes").checked, eval_steps: number("eval_steps")};
}
$("estimate").onclick = () => guarded("train_msg", async () => {
  const e = await api("POST", "/api/estimate", runForm());
  $("estimate_out").textContent = `${e.rows} rows, ${e.tokens_per_epoch} tokens an epoch, ${e.train_tokens} in all; ` +
    `weights ${e.weights_gb >= 1 ? e.weights_gb + " GB" : Math.round(e.weights_gb * 1e4) / 10 + " MB"} in memory.\n` + (e.seconds !== undefined
      ? `about ${Math.round(e.seconds / 60 * 10) / 10} min at ${e.tokens_per_second} tokens/s, peak memory ${e.peak_memory_gb} GB (measured on ${e.measured_on})`
      : "no earlier run of this model to measure its speed from: the first run measures it");
});
$("start").onclick = () => guarded("train_msg", async () => {
  const job = await api("POST", "/api/runs", runForm());
  state.job = job.id; state.run = null; state.next = 0; state.points = {};
  say("train_msg", `started ${job.id}`);
  refreshRuns();
});
$("stop").onclick = () => guarded("train_msg", async () => {
  const job = await api("POST", `/api/jobs/${state.job}/stop`);
  say("train_msg", `${job.id}: ${job.status}`);
  refreshRuns();
});

async function refreshRuns() {
  let runs;
  try { runs = (await api("GET", "/api/runs")).runs; } catch (e) { return say("train_msg", e.message, true); }
  const body = $("runs").tBodies[0]; body.innerHTML = "";
  if (!state.run && state.job) {  // a run just started: follow it once its folder exists
    const mine = runs.find(r => r.job === state.job && r.path);
    if (mine) state.run = mine.path;
  }
  const select = $("ckpt"), chosen = select.value; select.innerHTML = "";
  runs.forEach(r => {
    const tr = body.insertRow(); tr.className = "run" + (r.path && r.path === state.run ? " chosen" : "");
    tr.dataset.path = r.path || ""; tr.dataset.status = r.status;
    tr.insertCell().textContent = r.name;
    const st = tr.insertCell(); st.textContent = r.status; st.className = "status status-" + r.status;
    tr.insertCell().textContent = r.step == null ? "" : `${r.step}/${r.total_steps}`;
    tr.insertCell().textContent = r.loss == null ? "" : r.loss;
    const err = tr.insertCell(); err.className = "error"; err.textContent = r.error || "";
    tr.onclick = () => { if (r.path) { state.run = r.path; state.next = 0; state.points = {}; state.job = r.job; refreshRuns(); } };
    r.checkpoints.forEach(c => { const o = document.createElement("option"); o.value = o.textContent = c; select.appendChild(o); });
    if (r.job === state.job && r.status === "failed") say("train_msg", r.error || "the run failed", true);
  });
  if (chosen) select.value = chosen;
  const mine = runs.find(r => r.job && r.job === state.job);
  $("stop").disabled = !(mine && mine.status === "running");
  if (state.run) await refreshCurves();
}
// One chart per scale: losses, accuracies, then the probes (rates in [0, 1] and the KL to the base).
const LOSS_KEYS = ["loss", "eval_loss"], ACC_KEYS = ["token_acc", "eval_token_acc"],
      PROBE_KEYS = ["identity_hit", "identity_robustness", "leakage", "drift_kl"];
async function refreshCurves() {
  let d;
  try { d = await api("GET", "/api/runs/log?path=" + encodeURIComponent(state.run) + "&since=" + state.next); }
  catch (e) { return say("train_msg", e.message, true); }
  state.next = d.next;
  d.rows.forEach(row => [...LOSS_KEYS, ...ACC_KEYS, ...PROBE_KEYS].forEach(k => {
    if (typeof row[k] === "number") (state.points[k] = state.points[k] || []).push([row.global_step, row[k]]);
  }));
  const pick = keys => Object.fromEntries(keys.filter(k => state.points[k]).map(k => [k, state.points[k]]));
  const n = drawLines($("curve_train"), pick(LOSS_KEYS), "loss (train, eval)");
  drawLines($("curve_acc"), pick(ACC_KEYS), "token accuracy (train, eval)");
  drawLines($("curve_eval"), pick(PROBE_KEYS), "at each eval: identity hit rate, robustness, leakage (0 to 1); drift (KL to base)",
            {range: [0, 1], right: ["drift_kl"]});
  $("curve_run").textContent = state.run; $("points").textContent = `${n} points`;
  $("points").dataset.n = n;
}
// The recipe's settings for this machine (CPU or GPU) as the form's starting values.
api("GET", "/api/config").then(c => {
  const ids = {general: "general", num_train_epochs: "epochs", learning_rate: "lr", lora_rank: "rank",
               max_length: "max_length", eval_steps: "eval_steps"};
  Object.entries(ids).forEach(([k, id]) => { if (c.defaults[k] !== undefined) $(id).value = c.defaults[k]; });
}).catch(() => {});  // a key is needed first: the HTML's values stand
setInterval(refreshRuns, 1500);
refreshRuns();

// --- compare, chat, export: on the checkpoint chosen above
function ckpt() { if (!$("ckpt").value) throw new Error("no checkpoint yet: train a run first"); return $("ckpt").value; }
async function load(base) {
  $("loaded").textContent = "loading…";
  const d = await api("POST", "/api/chat/load", {checkpoint: ckpt(), base});
  $("loaded").textContent = "loaded " + d.loaded.tuned + (d.loaded.base ? " (and its base)" : "");
}
$("load").onclick = () => guarded("compare_msg", () => load(true));

async function stream(prefix, question, out) {
  out.textContent = "";
  const r = await fetch(prefix + "/v1/chat/completions", {method: "POST", headers: headers(),
    body: JSON.stringify({messages: [{role: "user", content: question}], stream: true})});
  if (!r.ok) { const d = await r.json().catch(() => ({})); throw new Error(d.error ? d.error.message : `HTTP ${r.status}`); }
  const reader = r.body.getReader(), dec = new TextDecoder(); let buf = "";
  for (;;) {
    const {value, done} = await reader.read(); if (done) break;
    buf += dec.decode(value, {stream: true});
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const line = buf.slice(0, i).replace(/^data: /, ""); buf = buf.slice(i + 2);
      if (line === "[DONE]") return;
      const ev = JSON.parse(line);
      if (ev.error) throw new Error(ev.error.message);
      const piece = ev.choices && ev.choices[0] && ev.choices[0].delta.content;
      if (piece) out.textContent += piece;
    }
  }
}
$("ask_form").onsubmit = e => { e.preventDefault(); guarded("compare_msg", async () => {
  if (!$("loaded").textContent.includes("base")) await load(true);
  $("base_answer").dataset.done = $("tuned_answer").dataset.done = "";
  await Promise.all([stream("/base", $("question").value, $("base_answer")), stream("", $("question").value, $("tuned_answer"))]);
  $("base_answer").dataset.done = $("tuned_answer").dataset.done = "1";
}); };

async function follow(job, statusEl, onDone) {  // poll a child job until it ends; its log tail shows meanwhile
  for (;;) {
    const j = await api("GET", `/api/jobs/${job.id}`);
    statusEl.textContent = j.status === "running" ? `${j.kind} running…` : `${j.kind} ${j.status}`;
    if (j.status !== "running") {
      if (j.status === "failed") throw new Error(j.error || `${j.kind} failed`);
      return onDone(j);
    }
    await new Promise(r => setTimeout(r, 1500));
  }
}
$("eval").onclick = () => guarded("compare_msg", async () => {
  const job = await api("POST", "/api/eval", {checkpoint: ckpt()});
  await follow(job, $("eval_status"), async () => {
    const rep = await api("GET", "/api/eval/report?checkpoint=" + encodeURIComponent(ckpt()));
    const cols = Object.keys(rep.results), t = $("report_table");
    t.innerHTML = "<tr><th>metric</th>" + cols.map(c => `<th>${c}</th>`).join("") + "</tr>";
    rep.metrics.forEach(m => { const tr = t.insertRow(); tr.insertCell().textContent = m;
      cols.forEach(c => { tr.insertCell().textContent = rep.results[c][m] ?? ""; }); });
    drawBars($("report_chart"), rep.results, rep.metrics);
  });
});

async function feedbackCounts() {
  const d = await api("GET", "/api/feedback?checkpoint=" + encodeURIComponent(ckpt()));
  $("fb_counts").textContent = `👍 ${d.up}  👎 ${d.down} (${d.corrected} with a correction)`;
}
$("fb_refresh").onclick = () => guarded("chat_msg", async () => { await load(false); $("chat_frame").src = "/chat"; await feedbackCounts(); });
$("fb_export").onclick = () => guarded("chat_msg", async () => {
  const job = await api("POST", "/api/feedback/export", {checkpoint: ckpt(), include_good: $("fb_good").checked,
                                                                kind: $("fb_kind").value});
  await follow(job, $("chat_msg"), j => say("chat_msg", `wrote ${job.output}: for the next round`));
});
$("export_btn").onclick = () => guarded("export_msg", async () => {
  const job = await api("POST", "/api/export", {checkpoint: ckpt(), to: $("export_to").value, quant: $("quant").value,
                                               overwrite: $("overwrite").checked});
  const poll = setInterval(async () => { try { $("export_log").textContent = (await api("GET", `/api/jobs/${job.id}`)).log_tail; } catch (e) {} }, 1500);
  try { await follow(job, $("export_msg"), () => {}); }
  finally { clearInterval(poll); $("export_log").textContent = (await api("GET", `/api/jobs/${job.id}`)).log_tail; }
});
