// pdserve's live dashboard: polls /dashboard.json and fills the page. No framework, no external assets.
// With a bearer token on the server, open /#token=<token>: it is sent as an Authorization header.
"use strict";
const REFRESH_MS = 1000;
const token = new URLSearchParams(location.hash.slice(1)).get("token");

function $(id) { return document.getElementById(id); }
function set(id, v) { $(id).textContent = v; }
function ms(s) { return (s * 1000).toFixed(1); }
function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}
function bar(row, used, cap) {
  const td = row.insertCell();
  const frac = cap > 0 ? Math.min(1, used / cap) : 0;
  const b = document.createElement("span");
  b.className = "bar";
  const fill = document.createElement("span");
  fill.style.width = (100 * frac).toFixed(1) + "%";
  b.appendChild(fill);
  td.appendChild(b);
  td.appendChild(document.createTextNode(cap > 0 ? " " + (100 * frac).toFixed(0) + "%" : " -"));
}

function render(d) {
  set("model", d.model + " (" + d.policy + ")");
  const pill = $("serving");
  pill.textContent = d.serving ? "serving" : "NOT SERVING";
  pill.className = "pill " + (d.serving ? "ok" : "bad");
  set("updated", "updated " + new Date().toLocaleTimeString());
  set("req-total", d.requests.total);
  set("req-running", d.requests.running);
  set("req-waiting", d.requests.waiting);
  set("req-rejected", d.requests.rejected);
  set("req-open", d.requests.open_streams);
  const wb = $("workers").tBodies[0];
  wb.replaceChildren();
  for (const w of d.workers) {
    const r = wb.insertRow();
    r.className = "worker";
    cell(r, w.name);
    cell(r, w.role);
    cell(r, w.step_s >= 1 ? w.state + " (step " + w.step_s.toFixed(1) + " s)" : w.state, "state-" + w.state);
    cell(r, w.device || "-");
    cell(r, w.role === "decode" ? w.running : "-");
    cell(r, w.role === "decode" ? w.waiting : w.queued_tokens + " tokens queued");
    bar(r, w.capacity_blocks - w.free_blocks, w.capacity_blocks);
    cell(r, w.restarts);
    const fetch = w.transfer_slowdown && w.transfer_slowdown !== 1 ? ", fetches x" + w.transfer_slowdown.toFixed(2) : "";
    cell(r, "x" + w.slowdown.toFixed(2) + fetch);
  }
  const tb = $("tiers").tBodies[0];
  tb.replaceChildren();
  for (const t of d.store.tiers) {
    const r = tb.insertRow();
    cell(r, t.tier);
    cell(r, t.blocks + (t.capacity_blocks ? " / " + t.capacity_blocks : ""));
    bar(r, t.blocks, t.capacity_blocks);
    cell(r, (t.bytes / 1048576).toFixed(1));
    cell(r, t.hit_tokens);
  }
  set("store-state", d.store.state + (d.store.restarts ? ", " + d.store.restarts + " restarts" : ""));
  set("leases", d.store.live_leases);
  set("hits-predicted", d.hits.predicted_tokens);
  set("hits-delivered", d.hits.delivered_tokens);
  set("hits-partial", d.hits.partial_tokens);
  set("hits-ratio", d.hits.predicted_tokens ? (d.hits.delivered_tokens / d.hits.predicted_tokens).toFixed(2) : "-");
  for (const k of ["p50", "p90", "p99"]) {
    set("ttft-" + k, ms(d.latency.ttft_s[k]));
    set("tbt-" + k, ms(d.latency.tbt_s[k]));
  }
  set("samples", "(" + d.latency.samples.requests + " requests, " + d.latency.samples.gaps + " token gaps)");
  const f = d.failures;
  set("failures", "migrations " + (f.migrations || 0) + ", recomputed tokens " + (f.recomputed_tokens || 0) +
      ", KV load failures " + (f.kv_load_failures || 0) + ", worker restarts " + (f.restarts || 0));
}

async function refresh() {
  try {
    const r = await fetch("/dashboard.json", {cache: "no-store",
                                              headers: token ? {"Authorization": "Bearer " + token} : {}});
    if (r.ok) {
      render(await r.json());
    } else {
      $("serving").textContent = "status " + r.status;
      $("serving").className = "pill bad";
    }
  } catch (e) {
    $("serving").textContent = "unreachable";
    $("serving").className = "pill bad";
  }
  setTimeout(refresh, REFRESH_MS);
}
refresh();
