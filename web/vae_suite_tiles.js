// VAE Suite tile-settings widget (ComfyUI frontend extension).
//
// On the pack's tiled nodes it adds one DOM widget under the tile inputs: preset buttons (auto / 512 / 768 /
// 1024) that write the real INT inputs `tile_size` and `overlap` (and `tiling`), a drawing of the tile grid
// over the image size when it is known (from the linked latent/image, or from the last run), the number of
// tiles and an estimate of peak memory, both as GET /vae_suite/tile_plan answers them. Values that do not fit
// the VAE are shown in orange; a click on that line writes values that fit and that the inputs accept.
//
// It is a DOM widget (node.addDOMWidget) because both renderers show those the same way: the classic canvas
// lays the element over the node, the Vue node renderer ("Nodes 2.0") puts it inside the node. Its buttons
// are plain <button>s, so a click is a click under either renderer. The widget reads the graph again every
// few hundred milliseconds and redraws when anything it shows changed (a link, an upstream size, a value, a
// finished run, a loaded workflow), so it needs no renderer-specific redraw hook.
//
// The INT inputs stay declared in Python: this widget is not serialized (neither in the workflow nor in
// the prompt), so workflows load and run the same without this file.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import {
  DEFAULTS, INPUT_STEPS, PRESETS, acceptedTiling, correctTiling, formatBytes, guessVae, matchPreset,
  presetValues, summarize,
} from "./lib/tile_plan.js";

const EXT_NAME = "vae_suite.tile_settings";
const WIDGET_NAME = "vae_suite_tiles";
/** comfyClass -> direction of the VAE pass it runs. */
const TARGETS = Object.freeze({
  VAESuiteDecodeTiled: "decode",
  VAESuiteEncode: "encode",
  VAESuiteAsymInpaintDecode: "decode",
});
const ROUTE = "/vae_suite/tile_plan";
const HEIGHT = 112; // px of the widget in the classic canvas
const POLL_MS = 250;
const SVG_NS = "http://www.w3.org/2000/svg";
const BOX_W = 96;
const BOX_H = 60;

// --------------------------------------------------------------------------------------------- graph reads
function widgetOf(node, name) {
  return node?.widgets?.find((w) => w.name === name);
}

/** Is input `slot` linked? (newer frontends ask for isInputConnected instead of reading `link`) */
function linked(node, slot) {
  return node.isInputConnected ? node.isInputConnected(slot) : node.inputs?.[slot]?.link != null;
}

function originOf(node, inputName) {
  const slot = node.inputs?.findIndex((i) => i.name === inputName) ?? -1;
  if (slot < 0 || !linked(node, slot)) return null;
  return node.getInputNode?.(slot) ?? null;
}

function numberWidget(n, name) {
  const v = Number(widgetOf(n, name)?.value);
  return Number.isFinite(v) && v > 0 ? v : null;
}

/** Pixel size of the LATENT / IMAGE that flows into `node` (depth-limited walk upstream), or null. */
function upstreamSize(node, depth = 0, seen = new Set()) {
  if (!node || depth > 12 || seen.has(node.id)) return null;
  seen.add(node.id);
  const w = numberWidget(node, "width");
  const h = numberWidget(node, "height");
  if (w && h) return { width: w, height: h, from: node.title || node.type };
  const img = node.imgs?.[0];
  if (img?.naturalWidth > 0 && img?.naturalHeight > 0) {
    return { width: img.naturalWidth, height: img.naturalHeight, from: node.title || node.type };
  }
  const scale = Number(widgetOf(node, "scale_by")?.value);
  for (const [i, inp] of (node.inputs ?? []).entries()) {
    if (!linked(node, i) || !["LATENT", "IMAGE"].includes(String(inp.type))) continue;
    const s = upstreamSize(node.getInputNode?.(i), depth + 1, seen);
    if (!s) continue;
    if (Number.isFinite(scale) && scale > 0) {
      return { width: Math.round(s.width * scale), height: Math.round(s.height * scale), from: s.from };
    }
    return s;
  }
  return null;
}

/** The image size the node will tile: linked input first, then the last run. */
function imageSize(node, direction) {
  const linked = upstreamSize(originOf(node, direction === "encode" ? "pixels" : "samples"));
  if (linked) return linked;
  const last = node.__vaeSuiteLastRun;
  if (last?.width > 0 && last?.height > 0) return { width: last.width, height: last.height, from: "last run" };
  return null;
}

/** VAE family / downscale / dtype from the last run, else guessed from the linked loader. */
function vaeInfo(node) {
  const last = node.__vaeSuiteLastRun;
  if (last?.downscale > 0) {
    return { family: last.family || "kl", downscale: last.downscale, known: true, dtypeBytes: last.dtype_bytes || 4 };
  }
  const loader = originOf(node, "vae");
  if (!loader) return { ...guessVae(""), dtypeBytes: 4 };
  const name = [widgetOf(loader, "vae_name")?.value, widgetOf(loader, "hf_source")?.value,
    widgetOf(loader, "ckpt_name")?.value].filter(Boolean).join(" ");
  const g = guessVae(name, widgetOf(loader, "family")?.value);
  const dt = String(widgetOf(loader, "dtype")?.value ?? "");
  return { ...g, dtypeBytes: dt === "fp16" || dt === "bf16" ? 2 : 4 };
}

/** Defaults, limits and steps of the tile inputs, as the node definition declares them. */
function inputSpec(node) {
  const req = node.constructor?.nodeData?.input?.required ?? {};
  const opt = (name, key, fb) => {
    const v = req[name]?.[1]?.[key];
    return Number.isFinite(v) ? v : fb;
  };
  return {
    defaults: { tileSize: opt("tile_size", "default", DEFAULTS.tileSize), overlap: opt("overlap", "default", DEFAULTS.overlap) },
    limits: {
      tileMin: opt("tile_size", "min", 64), tileMax: opt("tile_size", "max", 4096),
      overlapMin: opt("overlap", "min", 0), overlapMax: opt("overlap", "max", 1024),
    },
    steps: { tileSize: opt("tile_size", "step", INPUT_STEPS.tileSize), overlap: opt("overlap", "step", INPUT_STEPS.overlap) },
  };
}

// --------------------------------------------------------------------------------------------- server plan
const routeCache = new Map(); // query -> plan | "pending" | {error}
let routeDownUntil = 0;

/** The route's plan for this query: {plan}, {pending}, or {error: text} when the route cannot be reached. */
function serverPlan(q) {
  const key = new URLSearchParams(q).toString();
  const hit = routeCache.get(key);
  if (hit === "pending") return { pending: true };
  if (hit) return hit;
  if (Date.now() < routeDownUntil) return { error: "the server's tile planner did not answer" };
  if (routeCache.size > 256) routeCache.clear();
  routeCache.set(key, "pending");
  api.fetchApi(`${ROUTE}?${key}`).then(async (r) => {
    const body = await r.json().catch(() => ({}));
    routeCache.set(key, r.ok ? { plan: body } : { error: body.error || `tile planner answered ${r.status}` });
  }).catch(() => {
    routeCache.delete(key);
    routeDownUntil = Date.now() + 10000; // ask again in a while
  }).finally(refreshAll);
  return { pending: true };
}

// --------------------------------------------------------------------------------------------- state
function computeState(node, direction) {
  const tiling = widgetOf(node, "tiling")?.value ?? "auto";
  const tileSize = Number(widgetOf(node, "tile_size")?.value);
  const overlap = Number(widgetOf(node, "overlap")?.value);
  const { defaults, limits, steps } = inputSpec(node);
  const vae = vaeInfo(node);
  const size = imageSize(node, direction);
  const corrected = correctTiling({ tileSize, overlap, downscale: vae.downscale, limits });
  const accepted = acceptedTiling({ tileSize, overlap, downscale: vae.downscale, limits, steps });
  let server = null;
  let route = null;
  if (size) {
    route = serverPlan({
      width: size.width, height: size.height, tile_size: corrected.tileSize, overlap: corrected.overlap,
      family: vae.family, downscale: vae.downscale, mode: direction, tiling: tiling === "never" ? "never" : "always",
    });
    const plan = route.plan;
    if (plan && Number.isFinite(plan.count)) {
      const mem = plan.memory;
      const peak = tiling === "never" || !plan.tiled ? mem?.untiled_bytes : mem?.per_tile_bytes;
      server = { count: plan.count, peakBytes: Number.isFinite(peak) ? peak : null,
        untiledBytes: mem?.untiled_bytes, source: plan.source, exact: plan.exact === true,
        tiles: Array.isArray(plan.tiles) ? plan.tiles : null, cols: plan.cols, rows: plan.rows };
    }
  }
  const summary = summarize({ width: size?.width, height: size?.height, tileSize: corrected.tileSize,
    overlap: corrected.overlap, mode: tiling, downscale: vae.downscale, family: vae.family, direction,
    dtypeBytes: vae.dtypeBytes, limits, server });
  const preset = matchPreset({ mode: tiling, tileSize, overlap, downscale: vae.downscale, defaults, limits });
  return { tiling, tileSize, overlap, defaults, limits, steps, vae, size, corrected, accepted, summary, server,
    routeError: route?.error ?? null, routePending: !!route?.pending, preset };
}

// --------------------------------------------------------------------------------------------- writes
function setWidget(node, name, value) {
  const w = widgetOf(node, name);
  if (!w || w.value === value) return false;
  const old = w.value;
  w.value = value;
  // the renderer's own callback keeps its view of the value in step (the Vue renderer wraps it)
  w.callback?.(value, app.canvas, node, app.canvas?.graph_mouse);
  node.onWidgetChanged?.(name, value, old, w);
  return true;
}

function applyValues(node, { mode, tileSize, overlap }) {
  let changed = false;
  if (mode) changed = setWidget(node, "tiling", mode) || changed;
  if (Number.isFinite(tileSize)) changed = setWidget(node, "tile_size", tileSize) || changed;
  if (Number.isFinite(overlap)) changed = setWidget(node, "overlap", overlap) || changed;
  if (changed && node.graph) node.graph._version = (node.graph._version ?? 0) + 1;
  node.setDirtyCanvas?.(true, true);
  return changed;
}

function applyPreset(node, direction, name) {
  const st = computeState(node, direction);
  const v = presetValues(name, { downscale: st.vae.downscale, defaults: st.defaults, limits: st.limits });
  if (!v) return false;
  const fit = acceptedTiling({ tileSize: v.tileSize, overlap: v.overlap, downscale: st.vae.downscale,
    limits: st.limits, steps: st.steps });
  // a tile size only matters when the node may tile: switch "never" to "always"
  const mode = v.mode ?? (st.tiling === "never" ? "always" : null);
  return applyValues(node, { mode, ...fit });
}

function applyCorrection(node, direction) {
  const st = computeState(node, direction);
  return applyValues(node, st.accepted);
}

// --------------------------------------------------------------------------------------------- view
const STYLE = `
.vae-suite-tiles { box-sizing: border-box; display: flex; flex-direction: column; gap: 4px; padding: 2px 0;
  font: 11px/1.3 Arial, sans-serif; color: var(--input-text, #ddd); min-width: 0; overflow: hidden; }
.vae-suite-tiles .vst-chips { display: flex; gap: 4px; }
.vae-suite-tiles button { font: inherit; cursor: pointer; border-radius: 10px; min-width: 0; }
.vae-suite-tiles .vst-chip { flex: 1 1 0; height: 20px; padding: 0 4px; color: inherit;
  background: var(--comfy-input-bg, #222); border: 1px solid var(--border-color, #555); }
.vae-suite-tiles .vst-chip:hover { border-color: #3d7ec9; }
.vae-suite-tiles .vst-chip[aria-pressed="true"] { background: #3d7ec9; border-color: #3d7ec9; color: #fff; }
.vae-suite-tiles .vst-body { display: flex; gap: 8px; align-items: flex-start; min-width: 0; }
.vae-suite-tiles svg { flex: 0 0 auto; background: #151515; border-radius: 2px; }
.vae-suite-tiles .vst-lines { display: flex; flex-direction: column; min-width: 0; flex: 1 1 auto; }
.vae-suite-tiles .vst-lines div { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.vae-suite-tiles .vst-dim { color: var(--descrip-text, #999); }
.vae-suite-tiles .vst-fix { align-self: stretch; text-align: left; height: 20px; padding: 0 6px; color: #e8a33d;
  background: transparent; border: 1px solid #e8a33d; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.vae-suite-tiles .vst-fix[hidden] { display: none; }
.vae-suite-tiles .vst-route { color: #e8a33d; }
`;

function ensureStyle() {
  if (document.getElementById("vae-suite-tiles-style")) return;
  const s = document.createElement("style");
  s.id = "vae-suite-tiles-style";
  s.textContent = STYLE;
  document.head.append(s);
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text != null) e.textContent = text;
  return e;
}

function svgEl(tag, attrs) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  return e;
}

/** "overlap 500 → 240 (< tile/2)": what the fix line will write, with the reason vae_core gives. */
function fixText(st) {
  const reason = (prefix) => {
    const note = st.corrected.notes.find((n) => n.startsWith(prefix));
    const m = note && /\(([^)]*)\)$/.exec(note);
    return m ? ` (${m[1]})` : "";
  };
  const parts = [];
  if (st.accepted.tileSize !== st.tileSize) parts.push(`tile ${st.tileSize} → ${st.accepted.tileSize}${reason("tile")}`);
  if (st.accepted.overlap !== st.overlap) parts.push(`overlap ${st.overlap} → ${st.accepted.overlap}${reason("overlap")}`);
  return `⚠ ${parts.join(", ")} · click to fix`;
}

function drawGrid(svg, st) {
  svg.replaceChildren();
  const s = st.summary;
  if (!s.known) {
    svg.append(svgEl("rect", { x: 0.5, y: 0.5, width: BOX_W - 1, height: BOX_H - 1, fill: "none",
      stroke: "#666", "stroke-dasharray": "3 3" }));
    const t = svgEl("text", { x: BOX_W / 2, y: BOX_H / 2 + 4, fill: "#999", "text-anchor": "middle",
      "font-size": 12 });
    t.textContent = "?";
    svg.append(t);
    return;
  }
  const g = s.grid;
  const k = Math.min((BOX_W - 4) / g.width, (BOX_H - 4) / g.height);
  const iw = g.width * k;
  const ih = g.height * k;
  const ix = (BOX_W - iw) / 2;
  const iy = (BOX_H - ih) / 2;
  svg.append(svgEl("rect", { x: ix, y: iy, width: iw, height: ih, fill: "#2a2f36", stroke: "#666",
    class: "vst-image" }));
  if (st.tiling !== "never" && g.count > 1) {
    for (const t of g.tiles) {
      svg.append(svgEl("rect", { x: ix + t.x * k + 0.5, y: iy + t.y * k + 0.5, width: Math.max(1, t.w * k - 1),
        height: Math.max(1, t.h * k - 1), fill: "rgba(90,160,255,0.16)", stroke: "rgba(140,190,255,0.85)",
        class: "vst-tile" }));
    }
  }
}

function renderLines(box, st) {
  const s = st.summary;
  const fam = `${st.vae.family} f${st.vae.downscale}${st.vae.known ? "" : "?"}`;
  const lines = [];
  if (s.known) {
    const g = s.grid;
    lines.push([`${g.width}×${g.height} px · ${fam}`, "vst-size"]);
    if (st.tiling === "never") lines.push(["one pass (tiling: never)", "vst-tiles"]);
    else if (g.count <= 1) lines.push(["fits in one tile", "vst-tiles"]);
    else lines.push([`${g.cols}×${g.rows} = ${g.count} tiles${st.tiling === "auto" ? " if needed" : ""}`, "vst-tiles"]);
    const untiled = st.server?.untiledBytes ?? s.untiledBytes;
    lines.push([`peak ≈ ${formatBytes(s.peakBytes)}`, "vst-mem vst-dim"]);
    if (st.tiling !== "never" && g.count > 1) lines.push([`untiled ≈ ${formatBytes(untiled)}`, "vst-dim"]);
    if (st.routeError) lines.push([`⚠ ${st.routeError}: the browser's own estimate`, "vst-route"]);
  } else {
    lines.push([`size unknown · ${fam}`, "vst-size"]);
    lines.push(["link a latent or run once", "vst-dim"]);
    lines.push([`tile ${st.corrected.tileSize} · overlap ${st.corrected.overlap}`, "vst-dim"]);
  }
  box.replaceChildren(...lines.map(([t, cls]) => {
    const d = el("div", cls, t);
    d.title = t;
    return d;
  }));
}

/** Everything the view shows, as one string: the view redraws only when it changes. */
function signature(st) {
  const s = st.summary;
  return JSON.stringify([st.tiling, st.tileSize, st.overlap, st.preset, st.vae, st.size?.width, st.size?.height,
    s.known && s.grid.tiles, s.peakBytes, st.server?.untiledBytes, st.routeError, st.accepted,
    st.corrected.changed]);
}

const views = new Set();
let pollTimer = null;

function refreshAll() {
  for (const v of views) v.refresh();
}

function startPolling() {
  if (pollTimer == null) pollTimer = setInterval(refreshAll, POLL_MS);
}

function makeView(node, direction) {
  ensureStyle();
  const root = el("div", "vae-suite-tiles");
  const chips = el("div", "vst-chips");
  const buttons = PRESETS.map((p) => {
    const b = el("button", "vst-chip", p.label);
    b.type = "button";
    b.dataset.preset = p.name;
    b.title = p.name === "auto" ? "tile only when the image would not fit in memory (default sizes)"
      : `tile ${p.tileSize} px, overlap ${p.overlap} px`;
    b.addEventListener("click", (e) => {
      e.stopPropagation();
      applyPreset(node, direction, p.name);
      view.refresh(true);
    });
    chips.append(b);
    return b;
  });
  const body = el("div", "vst-body");
  const svg = svgEl("svg", { width: BOX_W, height: BOX_H, viewBox: `0 0 ${BOX_W} ${BOX_H}`, class: "vst-grid" });
  const lines = el("div", "vst-lines");
  body.append(svg, lines);
  const fix = el("button", "vst-fix");
  fix.type = "button";
  fix.hidden = true;
  fix.addEventListener("click", (e) => {
    e.stopPropagation();
    applyCorrection(node, direction);
    view.refresh(true);
  });
  // a press on a button is not the start of a node drag
  for (const b of [...buttons, fix]) b.addEventListener("pointerdown", (e) => e.stopPropagation());
  root.append(chips, body, fix);

  const view = {
    root,
    sig: null,
    state: null,
    refresh(force = false) {
      if (!node.graph) return;
      if (root.dataset.vaeSuiteNode !== String(node.id)) force = true;
      const st = computeState(node, direction);
      view.state = st;
      const sig = signature(st);
      if (!force && sig === view.sig) return;
      view.sig = sig;
      for (const b of buttons) b.setAttribute("aria-pressed", String(st.preset === b.dataset.preset));
      drawGrid(svg, st);
      renderLines(lines, st);
      fix.hidden = !st.corrected.changed;
      fix.textContent = st.corrected.changed ? fixText(st) : "";
      fix.title = fix.textContent;
      root.dataset.vaeSuiteNode = String(node.id);
      root.dataset.count = st.summary.known ? String(st.summary.grid.count) : "";
      root.dataset.preset = st.preset ?? "";
    },
  };
  return view;
}

function addTileWidget(node, direction) {
  const view = makeView(node, direction);
  const widget = node.addDOMWidget(WIDGET_NAME, WIDGET_NAME, view.root, {
    serialize: false, // not in the API prompt
    hideOnZoom: false,
    getValue: () => "",
    setValue: () => {},
    getMinHeight: () => HEIGHT,
    getMaxHeight: () => HEIGHT,
    getHeight: () => HEIGHT,
  });
  widget.serialize = false; // not in the workflow's widgets_values
  // for scripts and tests: the same actions as the buttons, and what the view shows
  widget.applyPreset = (name) => applyPreset(node, direction, name);
  widget.applyCorrection = () => applyCorrection(node, direction);
  widget.getState = () => computeState(node, direction);
  widget.view = view;
  views.add(view);
  startPolling();
  const onRemoved = node.onRemoved;
  node.onRemoved = function (...args) {
    views.delete(view);
    return onRemoved?.apply(this, args);
  };
  const onConnectionsChange = node.onConnectionsChange;
  node.onConnectionsChange = function (...args) {
    const r = onConnectionsChange?.apply(this, args);
    queueMicrotask(() => view.refresh());
    return r;
  };
  view.refresh(true);
  return widget;
}

app.registerExtension({
  name: EXT_NAME,
  async addCustomNodeDefs(defs) {
    // search aliases ("tiled vae", "taesd", "inpaint vae", ...) declared on the Python classes; frontends that
    // search them read `search_aliases` of the node definition, which this server does not send itself
    try {
      const r = await api.fetchApi("/vae_suite/search_aliases");
      if (!r.ok) return;
      for (const [id, aliases] of Object.entries(await r.json())) {
        if (defs[id] && aliases.length) defs[id].search_aliases ??= aliases;
      }
    } catch {
      // no aliases: the nodes are still found by name
    }
  },
  nodeCreated(node) {
    const direction = TARGETS[node.comfyClass ?? node.constructor?.comfyClass];
    if (!direction || widgetOf(node, WIDGET_NAME)) return;
    addTileWidget(node, direction);
    const size = node.computeSize?.();
    if (size && node.size) node.setSize?.([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
  },
  loadedGraphNode(node) {
    widgetOf(node, WIDGET_NAME)?.view?.refresh(true);
  },
  setup() {
    // "Last run" size: the nodes send {vae_suite_tiles: [{width, height, downscale, family, ...}]} as UI output.
    api.addEventListener("executed", ({ detail }) => {
      const info = detail?.output?.vae_suite_tiles?.[0];
      if (!info) return;
      const id = detail.display_node ?? detail.node;
      const node = app.graph?.getNodeById?.(Number(id)) ?? app.graph?.getNodeById?.(id);
      if (!node || !TARGETS[node.comfyClass]) return;
      node.__vaeSuiteLastRun = info;
      widgetOf(node, WIDGET_NAME)?.view?.refresh(true);
    });
  },
});
