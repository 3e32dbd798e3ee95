// The Eval view: the reports under the output folders (GET /api/evals), and the one chosen drawn from its
// eval_report.json: the robustness matrix as a heatmap (base beside tuned), leakage as bars with counts, the
// headline figures. Uses $, api and guarded from app.js.
const LANGS = ["en", "zh"];
const LEAK_SETS = [["ordinary/en", "ordinary, en"], ["ordinary/zh", "ordinary, zh"],
                   ["contrast/en", "other AIs, en"], ["contrast/zh", "other AIs, zh"]];
const HEADLINE = [["identity_robustness", "identity robustness (lowest cell)", "higher"],
                  ["identity_mean", "identity, mean of cells", "higher"], ["identity_en", "identity, English", "higher"],
                  ["identity_zh", "identity, Chinese", "higher"], ["leakage", "leakage, ordinary prompts", "lower"],
                  ["leakage_contrast", "leakage, other AIs", "lower"], ["drift_kl", "drift: KL to the base", "lower"],
                  ["drift_nll", "drift: NLL of base answers", "near base"]];

function cellColor(rate) {  // red (0) through yellow (0.5) to green (1), as in eval_report.png
  const stops = [[165, 0, 38], [254, 224, 139], [0, 104, 55]];
  const t = Math.max(0, Math.min(1, rate)) * 2, i = Math.min(1, Math.floor(t)), f = t - i;
  const c = stops[i].map((v, k) => Math.round(v + (stops[i + 1][k] - v) * f));
  return `rgb(${c.join(",")})`;
}
function el(tag, text, cls) { const e = document.createElement(tag); if (text !== undefined) e.textContent = text; if (cls) e.className = cls; return e; }
function fmt(v) { return typeof v === "number" ? String(Math.round(v * 1000) / 1000) : (v ?? "-"); }

async function listReports() {
  const d = await api("GET", "/api/evals"), body = $("evals_list").tBodies[0];
  body.innerHTML = "";
  if (!d.reports.length) say("evals_msg", "no evaluation yet: press Evaluate on the Compare tab, or run keel eval");
  d.reports.forEach(r => {
    const row = r.headline.tuned || r.headline.model || {}, tr = body.insertRow();
    tr.className = "report"; tr.dataset.path = r.path;
    tr.insertCell().textContent = r.name;
    tr.insertCell().textContent = (r.date || "").replace("T", " ");
    ["identity_robustness", "identity_mean", "leakage"].forEach(k => { tr.insertCell().textContent = fmt(row[k]); });
    tr.onclick = () => guarded("evals_msg", () => showReport(r.path));
  });
  if (d.reports.length && !$("eval_matrix").dataset.path) await showReport(d.reports[0].path);
}

async function showReport(path) {
  const rep = await api("GET", "/api/evals/report?path=" + encodeURIComponent(path));
  document.querySelectorAll("#evals_list tr.report").forEach(tr => tr.classList.toggle("chosen", tr.dataset.path === path));
  const m = rep.meta, who = [...(m.model_name || []), ...(m.model_author || [])].join(" / ");
  $("eval_title").textContent = `${path} · ${who} · ${(m.date || "").replace("T", " ")} · ${m.machine || ""}`;
  drawMatrix(rep);
  drawLeakage(rep);
  drawHeadline(rep);
  $("eval_matrix").dataset.path = path;
}

// One row per cell, one column per model and language; each square carries its rate and hits/asked.
function drawMatrix(rep) {
  const t = $("eval_matrix"), rows = Object.keys(rep.details).filter(r => rep.details[r].cells);
  t.innerHTML = "";
  if (!rows.length) { t.insertRow().insertCell().textContent = "no identity matrix in this report"; return; }
  const cells = [...new Set(rows.flatMap(r => Object.keys(rep.details[r].cells)))];
  const head = t.createTHead(), top = head.insertRow(), sub = head.insertRow();
  top.appendChild(el("th")); sub.appendChild(el("th", "cell"));
  rows.forEach(r => {
    const th = el("th", `${r}: robustness ${fmt(rep.results[r].identity_robustness)}`); th.colSpan = LANGS.length; top.appendChild(th);
    LANGS.forEach(l => sub.appendChild(el("th", l)));
  });
  const body = t.createTBody();
  cells.forEach(name => {
    const tr = body.insertRow(); tr.appendChild(el("th", name));
    rows.forEach(r => LANGS.forEach(lang => {
      const c = (rep.details[r].cells[name] || {})[lang], td = tr.insertCell();
      td.dataset.row = r; td.dataset.cell = name; td.dataset.lang = lang;
      if (!c) { td.textContent = "–"; td.className = "missing"; return; }
      td.dataset.rate = c.rate;
      td.textContent = `${fmt(c.rate)} (${c.hits}/${c.asked})`;
      td.style.background = cellColor(c.rate);
      td.style.color = c.rate < 0.2 || c.rate > 0.85 ? "#fff" : "#000";
      if (rep.details[r].worst_cell === `${name} / ${lang}`) td.classList.add("worst");
    }));
  });
}

// Share of answers naming the new identity, per set and language: one bar per model, its count beside it.
function drawLeakage(rep) {
  const box = $("eval_leakage"), rows = Object.keys(rep.details).filter(r => rep.details[r].counts);
  box.innerHTML = "";
  if (!rows.length) { box.textContent = "leakage was not run"; return; }
  LEAK_SETS.forEach(([key, label]) => {
    const group = el("div", undefined, "leak"); group.appendChild(el("span", label, "leak-label"));
    rows.forEach(r => {
      const [leaks, asked] = rep.details[r].counts[key] || [0, 0], share = asked ? leaks / asked : 0;
      const line = el("div", undefined, "leak-row"), bar = el("span", undefined, "leak-bar " + r);
      bar.style.width = `${Math.max(0.5, share * 100) * 0.7}%`;
      line.dataset.row = r; line.dataset.set = key; line.dataset.leaks = leaks; line.dataset.asked = asked;
      line.append(el("span", r, "leak-model"), bar, el("span", asked ? `${leaks}/${asked} (${fmt(share)})` : "-"));
      group.appendChild(line);
    });
    box.appendChild(group);
  });
}

function drawHeadline(rep) {
  const t = $("eval_headline"), cols = Object.keys(rep.results);
  const mc = [...new Set(cols.flatMap(c => Object.keys(rep.results[c]).filter(k => /_acc(_norm)?$/.test(k))))];
  const keys = [...HEADLINE, ...mc.map(k => [k, "multiple choice: " + k, "higher"])]
    .filter(([k]) => cols.some(c => k in rep.results[c]));
  t.innerHTML = "<tr><th>metric</th>" + cols.map(c => `<th>${c}</th>`).join("") + "<th>better</th></tr>";
  keys.forEach(([k, label, better]) => {
    const tr = t.insertRow(); tr.dataset.metric = k; tr.insertCell().textContent = label;
    cols.forEach(c => { tr.insertCell().textContent = fmt(rep.results[c][k]); });
    tr.insertCell().textContent = better;
  });
}

$("evals_refresh").onclick = () => guarded("evals_msg", listReports);
document.querySelector("nav button[data-tab=evals]").addEventListener("click", () => guarded("evals_msg", listReports));
