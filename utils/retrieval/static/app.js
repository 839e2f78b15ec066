// The page of `retrieve serve`: plain JavaScript over the JSON endpoints of utils/retrieval/serve.py.
// Every text from the server goes into the page through textContent, never as HTML (paths may hold
// any character).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, listing: null, offset: 0, busy: 0 };

function element(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined && text !== null) el.textContent = text;
  return el;
}

function showMessage(text) {
  $("message").textContent = text || "";
  $("message").hidden = !text;
}

async function api(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try {
    body = await response.json();
  } catch (e) {
    throw new Error(`${response.status} ${response.statusText}`);
  }
  if (!response.ok) throw new Error(body && body.error ? body.error : `${response.status}`);
  return body;
}

function kValue() {
  const k = parseInt($("k").value, 10);
  return Number.isFinite(k) && k > 0 ? k : state.info.default_k;
}

function shortPath(path) {
  const root = state.info.root;
  if (path && root && path.startsWith(root + "/")) return path.slice(root.length + 1);
  return path || "";
}

function image(id, alt) {
  const img = element("img");
  img.alt = alt || "";
  img.loading = "lazy";
  img.src = `/api/image/${id}`;
  // A tiny image (the digits demo: 16 px) enlarged keeps sharp pixels; a larger one is smoothed.
  img.addEventListener("load", () => {
    if (img.naturalWidth && img.naturalWidth < img.clientWidth) img.classList.add("small");
  });
  return img;
}

function fmt(x) {
  return x === null || x === undefined ? "-" : x.toFixed(4);
}

// ------------------------------------------------------------------ the index and the controls

async function start() {
  try {
    state.info = await api("/api/info");
  } catch (e) {
    showMessage(`cannot read /api/info: ${e.message}`);
    return;
  }
  const info = state.info;
  const main = info.index;
  let text = `${main.path}: ${main.count} images, ${main.bits} bits, ${main.engine} search`;
  if (info.compare) text += `; compared with ${info.compare.path} (${info.compare.bits} bits, ${info.compare.engine})`;
  $("index-info").textContent = text;
  $("k").value = info.default_k;
  $("k").max = info.max_k;
  for (const select of [$("class-filter"), $("upload-label")]) {
    for (const c of main.classes) {
      const option = element("option", null, select.id === "class-filter" ? `${c.name} (${c.count})` : c.name);
      option.value = c.name;
      select.appendChild(option);
    }
  }
  if (!main.classes.length) {
    $("class-filter").disabled = true;
    $("upload-label").disabled = true;
    $("worst-button").disabled = true;
  }
  if (!main.upload) {
    for (const id of ["upload-file", "upload-label", "upload-button"]) $(id).disabled = true;
    $("upload").title = main.upload_note || "uploads are off";
  }
  $("browse").addEventListener("click", () => browse(0));
  $("path-filter").addEventListener("keydown", (e) => { if (e.key === "Enter") browse(0); });
  $("more").addEventListener("click", () => browse(state.offset));
  $("random").addEventListener("click", pickRandom);
  $("worst-button").addEventListener("click", () => showWorst($("class-filter").value));
  $("upload-button").addEventListener("click", searchUpload);
  window.addEventListener("hashchange", fromHash);
  fromHash();  // a shared link (#id=I&k=K) shows its query at once
  browse(0);
}

function filters() {
  const params = new URLSearchParams();
  if ($("class-filter").value) params.set("label", $("class-filter").value);
  if ($("path-filter").value) params.set("q", $("path-filter").value);
  return params;
}

async function browse(offset) {
  const params = filters();
  params.set("offset", offset);
  params.set("limit", 60);
  try {
    const listing = await api(`/api/items?${params}`);
    showMessage("");
    const items = $("items");
    if (offset === 0) items.replaceChildren();
    for (const item of listing.items) items.appendChild(itemTile(item, item.label || ""));
    state.offset = offset + listing.items.length;
    const total = listing.total === null ? "many" : listing.total;
    $("browser-title").textContent = `Pick a query (${total} match${total === 1 ? "" : "es"}; showing ${state.offset})`;
    $("more").hidden = !listing.more;
    $("browser").hidden = false;
  } catch (e) {
    showMessage(e.message);
  }
}

function itemTile(item, caption) {
  const tile = element("div", "item");
  tile.dataset.id = item.id;
  tile.title = item.path;
  tile.appendChild(image(item.id, item.path));
  tile.appendChild(element("span", null, caption));
  tile.addEventListener("click", () => searchItem(item.id));
  return tile;
}

async function pickRandom() {
  try {
    const item = await api(`/api/random?${filters()}`);
    searchItem(item.id);
  } catch (e) {
    showMessage(e.message);
  }
}

function fromHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  if (!params.has("id")) return false;
  if (params.has("k")) $("k").value = params.get("k");
  runSearch(parseInt(params.get("id"), 10));
  return true;
}

// ------------------------------------------------------------------ searching

function searchItem(id) {
  const wanted = `#id=${id}&k=${kValue()}`;
  if (location.hash === wanted) runSearch(id);
  else location.hash = wanted;  // the hashchange runs the search (and the link can be shared)
}

async function runSearch(id) {
  const k = kValue();
  const sides = state.info.compare ? ["main", "compare"] : ["main"];
  setBusy(true);
  try {
    const answers = await Promise.all(sides.map((side) => api(`/api/search?id=${id}&k=${k}&index=${side}`)));
    showMessage("");
    showQuery(answers[0].query, `/api/image/${id}`);
    sides.forEach((side, i) => showRanking(side, answers[i]));
    if (!state.info.compare) $("ranking-compare").hidden = true;
  } catch (e) {
    showMessage(e.message);
  } finally {
    setBusy(false);
  }
}

async function searchUpload() {
  const file = $("upload-file").files[0];
  if (!file) {
    showMessage("choose an image file first");
    return;
  }
  const sides = state.info.compare && state.info.compare.upload ? ["main", "compare"] : ["main"];
  setBusy(true);
  try {
    const answers = await Promise.all(sides.map((side) => {
      const form = new FormData();
      form.append("file", file);
      form.append("k", kValue());
      if ($("upload-label").value) form.append("label", $("upload-label").value);
      return api(`/api/search?index=${side}`, { method: "POST", body: form });
    }));
    showMessage("");
    showQuery(answers[0].query, URL.createObjectURL(file), file.name);
    showRanking("main", answers[0]);
    if (answers[1]) showRanking("compare", answers[1]);
    else if (state.info.compare) noteRanking("compare", state.info.compare.upload_note);
  } catch (e) {
    showMessage(e.message);
  } finally {
    setBusy(false);
  }
}

function setBusy(on) {
  state.busy += on ? 1 : -1;
  document.body.classList.toggle("busy", state.busy > 0);
  document.body.dataset.busy = state.busy > 0 ? "1" : "0";
}

function showQuery(query, src, filename) {
  const img = $("query-image");
  img.classList.remove("small");
  img.onload = () => { if (img.naturalWidth < img.clientWidth) img.classList.add("small"); };
  img.src = src;
  $("query-path").textContent = query.path ? shortPath(query.path) : `${filename} (uploaded)`;
  $("query-label").textContent = query.label === null ? "unknown" : query.label;
  $("query-panel").dataset.id = query.id === null ? "" : query.id;
  const worst = $("query-worst");
  worst.hidden = query.label === null;
  if (query.label !== null) {
    worst.textContent = `Worst queries of class ${query.label}`;
    worst.onclick = () => showWorst(query.label);
  }
  $("query-panel").hidden = false;
}

function noteRanking(side, note) {
  const box = $(`ranking-${side}`);
  box.replaceChildren(element("p", "note", note));
  box.hidden = false;
}

function showRanking(side, answer) {
  const box = $(`ranking-${side}`);
  const info = side === "main" ? state.info.index : state.info.compare;
  const params = Object.entries(answer.engine_params).map(([key, value]) => `${key} ${value}`).join(", ");
  const parts = [element("h3", null, `${side === "main" ? "" : "compared: "}${info.path}`)];
  parts.push(element("p", "facts",
    `${answer.engine} search${params ? ` (${params})` : ""} in ${answer.search_ms.toFixed(2)} ms; ` +
    `${answer.results.length} results`));
  const code = element("p", "facts");
  code.append(`code (${answer.bits} bits): `);
  code.appendChild(element("span", "code", answer.code.replace(/(.{8})(?=.)/g, "$1 ")));
  parts.push(code);
  const m = answer.metrics;
  const metrics = element("p", "facts metrics");
  if (m) {
    metrics.dataset.ap = m.AP;
    metrics.dataset.p = m.P;
    metrics.append(`AP@${m.K} `);
    metrics.appendChild(element("b", "ap", fmt(m.AP)));
    metrics.append(`  P@${m.K} `);
    metrics.appendChild(element("b", "p", fmt(m.P)));
    if (m.AP_tie_aware !== null) {
      metrics.append("  (tie-aware: AP ");
      metrics.appendChild(element("b", null, fmt(m.AP_tie_aware)));
      metrics.append(", P ");
      metrics.appendChild(element("b", null, fmt(m.P_tie_aware)));
      metrics.append(")");
    }
  } else {
    metrics.textContent = "AP@K and P@K need the query's class (give an upload its class)";
  }
  parts.push(metrics);
  const grid = element("div", "results");
  for (const r of answer.results) grid.appendChild(resultCard(r));
  parts.push(grid);
  box.replaceChildren(...parts);
  box.dataset.count = answer.results.length;
  box.hidden = false;
}

function resultCard(r) {
  const mark = r.relevant === true ? "relevant" : r.relevant === false ? "irrelevant" : "unknown";
  const card = element("div", `result ${mark}`);
  card.dataset.id = r.id;
  card.dataset.rank = r.rank;
  card.dataset.distance = r.distance;
  card.dataset.relevant = r.relevant === null ? "" : String(r.relevant);
  card.dataset.label = r.label === null ? "" : r.label;
  card.title = `${r.path}\nclick: search with it`;
  card.appendChild(image(r.id, r.path));
  const caption = element("div", "caption");
  caption.appendChild(element("span", "rank", `#${r.rank}`));
  caption.appendChild(element("span", "distance", `d=${r.distance}`));
  caption.appendChild(element("span", "label", r.label === null ? "?" : r.label));
  card.appendChild(caption);
  card.addEventListener("click", () => searchItem(r.id));
  return card;
}

// ------------------------------------------------------------------ the worst queries of a class

async function showWorst(label) {
  if (!label) {
    showMessage("choose a class first (the class menu)");
    return;
  }
  const k = kValue();
  setBusy(true);
  try {
    const worst = await api(`/api/worst?label=${encodeURIComponent(label)}&k=${k}&n=12`);
    showMessage("");
    $("worst-title").textContent = `Worst queries of class ${label} (lowest AP@${k})`;
    const scored = worst.sampled ? `${worst.scored} of its ${worst.queries} queries (a fixed sample)` :
      `its ${worst.queries} queries`;
    $("worst-summary").textContent = `mean AP@${k} over ${scored}: ${fmt(worst.mean_AP)}; ` +
      `mean P@${k}: ${fmt(worst.mean_P)}. Click one to see its ranking.`;
    const strip = $("worst-items");
    strip.replaceChildren();
    for (const q of worst.worst) strip.appendChild(itemTile(q, `AP ${q.AP.toFixed(2)}`));
    $("worst").hidden = false;
  } catch (e) {
    showMessage(e.message);
  } finally {
    setBusy(false);
  }
}

document.addEventListener("DOMContentLoaded", start);
