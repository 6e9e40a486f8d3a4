// cirlab web page: pick or upload a reference, describe a change, search, refine by clicking a hit.
"use strict";

const PAGE = 24;        // gallery thumbnails per page
const RERANK_TOP = 50;  // with re-ranking on, the index's top max(k, RERANK_TOP) are re-ranked

const $ = (id) => document.getElementById(id);
const state = { ref: null, offset: 0, total: 0, files: new Map() };  // ref: {id} or {file}; files: id -> file name

// "/images/<id>", each path segment escaped (ids may hold slashes)
const imageUrl = (id) => "/images/" + id.split("/").map(encodeURIComponent).join("/");

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

// JSON from the API, or an Error carrying its "detail" (a string, or FastAPI's list of problems)
async function api(url, options) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (e) {
    throw new Error(`the server could not be reached (${e.message})`);
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    let detail = body && body.detail;
    if (Array.isArray(detail)) detail = detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
    throw new Error(`${response.status}: ${detail || response.statusText}`);
  }
  return body;
}

// A gallery image's file as the server names it (relative to the gallery root), or its id.
const fileOf = (id) => state.files.get(id) || id;

// Whether a file name says more than its id (a catalogue's "shoes/red-1.jpg" for id "shoes/red-1" does not).
const sameAsId = (file, id) => file === id || file.replace(/\.[^./]+$/, "") === id;

// A clickable thumbnail: <button class="cls" data-id> with the image and caption lines [class, text].
function tile(cls, id, src, lines, onClick) {
  const el = document.createElement("button");
  el.type = "button";
  el.className = cls;
  el.dataset.id = id;
  el.title = sameAsId(fileOf(id), id) ? fileOf(id) : `${fileOf(id)} (id ${id})`;
  const img = document.createElement("img");
  img.src = src;
  img.alt = fileOf(id);
  img.loading = "lazy";
  el.append(img);
  for (const [lineClass, text] of lines) {
    const span = document.createElement("span");
    span.className = lineClass;
    span.textContent = text;
    el.append(span);
  }
  el.addEventListener("click", onClick);
  return el;
}

// The reference: a gallery id (shown from /images) or an uploaded file (shown from memory).
function setReference(ref) {
  const img = $("reference");
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  state.ref = ref;
  img.src = ref.id !== undefined ? imageUrl(ref.id) : URL.createObjectURL(ref.file);
  img.hidden = false;
  $("reference-label").textContent = ref.id !== undefined ? fileOf(ref.id) : `upload: ${ref.file.name}`;
  for (const pick of document.querySelectorAll(".pick")) {
    pick.classList.toggle("selected", pick.dataset.id === ref.id);
  }
}

async function loadGallery(offset) {
  try {
    const page = await api(`/gallery?offset=${offset}&limit=${PAGE}`);
    state.offset = page.offset;
    state.total = page.total;
    page.ids.forEach((id, n) => state.files.set(id, page.files[n]));
    $("gallery").replaceChildren(...page.ids.map((id) =>
      tile("pick", id, imageUrl(id), [], () => { setReference({ id }); $("text").focus(); })));
    if (state.ref && state.ref.id !== undefined) setReference(state.ref);  // re-mark the selection
    const last = Math.min(page.offset + page.ids.length, page.total);
    $("gallery-page").textContent = page.total ? `${page.offset + 1}–${last} of ${page.total}` : "empty gallery";
    $("gallery-prev").disabled = page.offset === 0;
    $("gallery-next").disabled = last >= page.total;
  } catch (e) {
    showError(`gallery: ${e.message}`);
  }
}

// A result card: its rank and file name, its id where the file name does not say it, its score.
function showResults(answer) {
  for (const hit of answer.results) state.files.set(hit.id, hit.file);
  $("results").replaceChildren(...answer.results.map((hit, n) =>
    tile("result", hit.id, hit.url, [
      ["file", `#${n + 1} ${hit.file}`],
      ...(sameAsId(hit.file, hit.id) ? [] : [["id", `id ${hit.id}`]]),
      ["score", `score ${hit.score.toFixed(3)}`],
    ], () => {
      // refine: the hit becomes the reference, the next text describes a further change
      setReference({ id: hit.id });
      $("text").select();
      window.scrollTo({ top: 0, behavior: "smooth" });
    })));
  const rerank = answer.rerank ? `, top ${answer.rerank} re-ranked` : "";
  $("summary").textContent = `${answer.results.length} results for “${answer.text}” in ${answer.ms} ms${rerank}`;
}

async function search(event) {
  event.preventDefault();
  showError("");
  if (!state.ref) return showError("pick a reference image from the gallery or upload one first");
  const k = Number($("k").value);
  const form = new FormData();
  form.append("text", $("text").value);
  form.append("k", String(k));
  if (state.ref.id !== undefined) form.append("id", state.ref.id);
  else form.append("image", state.ref.file, state.ref.file.name);
  if (!$("rerank-box").hidden && $("rerank").checked) form.append("rerank", String(Math.max(k, RERANK_TOP)));

  $("search").disabled = true;
  $("summary").textContent = "searching…";
  try {
    showResults(await api("/search", { method: "POST", body: form }));
  } catch (e) {
    $("summary").textContent = "";
    showError(e.message);
  } finally {
    $("search").disabled = false;
  }
}

// The header: the model's name, then its kind and backbone; the re-rank box if it has a second stage.
function showModel(model) {
  const name = document.createElement("strong");
  name.id = "model-name";
  name.textContent = model.name;
  const kind = document.createElement("span");
  kind.id = "model-kind";
  kind.className = "muted";
  kind.textContent = [model.kind, model.backbone].filter(Boolean).join(" · ");
  $("model").replaceChildren(name, " ", kind);
  $("model").title = `model ${model.name}: ${model.kind} composer (row "${model.row}" in result tables)` +
    (model.backbone ? ` over a ${model.backbone} backbone` : "") + (model.rerank ? ", with a re-ranking stage" : "");
  $("rerank-box").hidden = !model.rerank;
}

async function init() {
  $("query").addEventListener("submit", search);  // the button and Enter in the text field
  $("upload").addEventListener("change", () => {
    const file = $("upload").files[0];
    if (file) setReference({ file });
    $("upload").value = "";  // choosing the same file again still fires "change"
  });
  $("gallery-prev").addEventListener("click", () => loadGallery(Math.max(0, state.offset - PAGE)));
  $("gallery-next").addEventListener("click", () => loadGallery(state.offset + PAGE));
  try {
    showModel(await api("/model"));
  } catch (e) {
    $("model").textContent = "model unknown";
    showError(`model: ${e.message}`);
  }
  try {
    const health = await api("/healthz");
    $("status").textContent = `${health.images} images · ${health.backend}`;
  } catch (e) {
    $("status").textContent = "server unavailable";
    showError(`healthz: ${e.message}`);
  }
  await loadGallery(0);
}

init();
