// VAE Suite tile-settings widget (ComfyUI frontend extension, stable v1 API only).
//
// On the pack's tiled nodes it adds one compact canvas widget under the tile inputs: preset buttons
// (auto / 512 / 768 / 1024) that write the real INT inputs `tile_size` and `overlap` (and `tiling`), a
// drawing of the tile grid over the image size when it is known (from the linked latent/image, or from
// the last run), the number of tiles and an estimate of peak memory. Values that do not fit the VAE are
// shown in orange with the values the Python side will use; a click on that line writes them back.
//
// The INT inputs stay declared in Python: this widget is not serialized (neither in the workflow nor in
// the prompt), so workflows load and run the same without this file.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import {
  DEFAULTS, PRESETS, correctTiling, formatBytes, guessVae, matchPreset, presetValues, summarize,
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

const CHIP_H = 20;
const BODY_H = 66;
const PAD = 4;
const MARGIN = 15; // litegraph's widget side margin

const LG = () => globalThis.LiteGraph ?? {};

// --------------------------------------------------------------------------------------------- graph reads
function widgetOf(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function originOf(node, inputName) {
  const slot = node.inputs?.findIndex((i) => i.name === inputName) ?? -1;
  if (slot < 0 || node.inputs[slot].link == null) return null;
  const n = node.getInputNode?.(slot);
  return n ?? null;
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
  for (const inp of node.inputs ?? []) {
    if (inp.link == null || !["LATENT", "IMAGE"].includes(String(inp.type))) continue;
    const s = upstreamSize(node.getInputNode?.(node.inputs.indexOf(inp)), depth + 1, seen);
    if (s) {
      if (Number.isFinite(scale) && scale > 0) {
        return { width: Math.round(s.width * scale), height: Math.round(s.height * scale), from: s.from };
      }
      return s;
    }
  }
  return null;
}

/** The image size the node will tile: linked input first, then the last run. */
function imageSize(node, direction) {
  const inputName = direction === "encode" ? "pixels" : "samples";
  const linked = upstreamSize(originOf(node, inputName));
  if (linked) return linked;
  const last = node.__vaeSuiteLastRun;
  if (last?.width > 0 && last?.height > 0) return { width: last.width, height: last.height, from: "last run" };
  return null;
}

/** VAE family / downscale / dtype from the linked loader (or the last run). */
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

function inputDefaults(node) {
  const req = node.constructor?.nodeData?.input?.required ?? {};
  const d = (name, fb) => {
    const spec = req[name]?.[1];
    return Number.isFinite(spec?.default) ? spec.default : fb;
  };
  const lim = (name, key, fb) => {
    const spec = req[name]?.[1];
    return Number.isFinite(spec?.[key]) ? spec[key] : fb;
  };
  return {
    defaults: { tileSize: d("tile_size", DEFAULTS.tileSize), overlap: d("overlap", DEFAULTS.overlap) },
    limits: {
      tileMin: lim("tile_size", "min", 64), tileMax: lim("tile_size", "max", 4096),
      overlapMin: lim("overlap", "min", 0), overlapMax: lim("overlap", "max", 1024),
    },
  };
}

// --------------------------------------------------------------------------------------------- server plan
const routeCache = new Map(); // query -> plan | "pending" | "failed"
let routeDownUntil = 0;

function serverPlan(node, q) {
  const key = new URLSearchParams(q).toString();
  const hit = routeCache.get(key);
  if (hit && hit !== "pending") return hit === "failed" ? null : hit;
  if (hit === "pending" || Date.now() < routeDownUntil) return null;
  if (routeCache.size > 256) routeCache.clear();
  routeCache.set(key, "pending");
  api.fetchApi(`${ROUTE}?${key}`).then(async (r) => {
    routeCache.set(key, r.ok ? await r.json() : "failed");
  }).catch(() => {
    routeCache.delete(key);
    routeDownUntil = Date.now() + 30000; // offline: use the JS logic for a while
  }).finally(() => node.setDirtyCanvas?.(true, false));
  return null;
}

// --------------------------------------------------------------------------------------------- state
function computeState(node, direction) {
  const tiling = widgetOf(node, "tiling")?.value ?? "auto";
  const tileSize = Number(widgetOf(node, "tile_size")?.value);
  const overlap = Number(widgetOf(node, "overlap")?.value);
  const { defaults, limits } = inputDefaults(node);
  const vae = vaeInfo(node);
  const size = imageSize(node, direction);
  const corrected = correctTiling({ tileSize, overlap, downscale: vae.downscale, limits });
  let server = null;
  if (size) {
    const plan = serverPlan(node, {
      width: size.width, height: size.height, tile_size: corrected.tileSize, overlap: corrected.overlap,
      family: vae.family, downscale: vae.downscale, mode: direction, tiling: tiling === "never" ? "never" : "always",
    });
    const mem = plan?.memory;
    if (plan && Number.isFinite(plan.count)) {
      const peak = tiling === "never" || !plan.tiled ? mem?.untiled_bytes : mem?.per_tile_bytes;
      server = { count: plan.count, peakBytes: Number.isFinite(peak) ? peak : null,
        untiledBytes: mem?.untiled_bytes, source: plan.source, exact: plan.exact === true,
        tiles: Array.isArray(plan.tiles) ? plan.tiles : null, cols: plan.cols, rows: plan.rows };
    }
  }
  const s = summarize({ width: size?.width, height: size?.height, tileSize: corrected.tileSize,
    overlap: corrected.overlap, mode: tiling, downscale: vae.downscale, family: vae.family, direction,
    dtypeBytes: vae.dtypeBytes, limits, server });
  const preset = matchPreset({ mode: tiling, tileSize, overlap, downscale: vae.downscale, defaults, limits });
  return { tiling, tileSize, overlap, defaults, limits, vae, size, corrected, summary: s, server, preset };
}

// --------------------------------------------------------------------------------------------- writes
function setWidget(node, name, value) {
  const w = widgetOf(node, name);
  if (!w || w.value === value) return false;
  const old = w.value;
  w.value = value;
  w.callback?.(value, app.canvas, node, app.canvas?.graph_mouse);
  // ComfyUI's INT callback rounds to the widget's step; keep the exact value the Python side would use
  if (w.value !== value) w.value = value;
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
  // a tile size only matters when the node may tile: switch "never" to "always"
  const mode = v.mode ?? (st.tiling === "never" ? "always" : null);
  return applyValues(node, { mode, tileSize: v.tileSize, overlap: v.overlap });
}

function applyCorrection(node, direction) {
  const st = computeState(node, direction);
  return applyValues(node, { tileSize: st.corrected.tileSize, overlap: st.corrected.overlap });
}

// --------------------------------------------------------------------------------------------- drawing
function fitText(ctx, text, maxW) {
  if (ctx.measureText(text).width <= maxW) return text;
  let t = text;
  while (t.length > 1 && ctx.measureText(`${t}…`).width > maxW) t = t.slice(0, -1);
  return `${t}…`;
}

function chipRects(width) {
  const x0 = MARGIN;
  const w = width - 2 * MARGIN;
  const gap = 4;
  const cw = (w - gap * (PRESETS.length - 1)) / PRESETS.length;
  return PRESETS.map((p, i) => ({ name: p.name, label: p.label, x: x0 + i * (cw + gap), w: cw }));
}

function drawWidget(ctx, node, width, y, direction, widget) {
  const lg = LG();
  const st = computeState(node, direction);
  widget.state = st;
  const text = lg.WIDGET_TEXT_COLOR ?? "#ddd";
  const text2 = lg.WIDGET_SECONDARY_TEXT_COLOR ?? "#999";
  const bg = lg.WIDGET_BGCOLOR ?? "#222";
  const outline = lg.WIDGET_OUTLINE_COLOR ?? "#666";
  const accent = "#3d7ec9";
  const warn = "#e8a33d";
  ctx.save();
  ctx.font = "11px Arial, sans-serif";
  ctx.textBaseline = "middle";

  // preset chips
  const cy = y + PAD;
  widget.chips = chipRects(width);
  for (const c of widget.chips) {
    const active = st.preset === c.name;
    ctx.beginPath();
    ctx.roundRect(c.x, cy, c.w, CHIP_H, CHIP_H / 2);
    ctx.fillStyle = active ? accent : bg;
    ctx.fill();
    ctx.strokeStyle = active ? accent : outline;
    ctx.stroke();
    ctx.fillStyle = active ? "#fff" : text;
    ctx.textAlign = "center";
    ctx.fillText(c.label, c.x + c.w / 2, cy + CHIP_H / 2 + 0.5);
  }

  // grid thumbnail
  const by = cy + CHIP_H + PAD + 2;
  const boxH = BODY_H - 6;
  const boxW = Math.min(92, Math.max(48, (width - 2 * MARGIN) * 0.3));
  const bx = MARGIN;
  ctx.fillStyle = "#151515";
  ctx.fillRect(bx, by, boxW, boxH);
  const s = st.summary;
  if (s.known) {
    const g = s.grid;
    const k = Math.min((boxW - 4) / g.width, (boxH - 4) / g.height);
    const iw = g.width * k;
    const ih = g.height * k;
    const ix = bx + (boxW - iw) / 2;
    const iy = by + (boxH - ih) / 2;
    ctx.fillStyle = "#2a2f36";
    ctx.fillRect(ix, iy, iw, ih);
    const showTiles = st.tiling !== "never" && g.count > 1;
    if (showTiles) {
      ctx.fillStyle = "rgba(90,160,255,0.16)"; // overlaps add up to a darker band
      ctx.strokeStyle = "rgba(140,190,255,0.85)";
      ctx.lineWidth = 1;
      for (const t of g.tiles) {
        ctx.fillRect(ix + t.x * k, iy + t.y * k, t.w * k, t.h * k);
        ctx.strokeRect(ix + t.x * k + 0.5, iy + t.y * k + 0.5, Math.max(1, t.w * k - 1), Math.max(1, t.h * k - 1));
      }
    }
    ctx.strokeStyle = outline;
    ctx.strokeRect(ix, iy, iw, ih);
  } else {
    ctx.setLineDash([3, 3]);
    ctx.strokeStyle = outline;
    ctx.strokeRect(bx + 0.5, by + 0.5, boxW - 1, boxH - 1);
    ctx.setLineDash([]);
    ctx.fillStyle = text2;
    ctx.textAlign = "center";
    ctx.fillText("?", bx + boxW / 2, by + boxH / 2);
  }

  // text lines
  const tx = bx + boxW + 8;
  const tw = width - MARGIN - tx;
  const lines = [];
  const fam = `${st.vae.family} f${st.vae.downscale}${st.vae.known ? "" : "?"}`;
  if (s.known) {
    const g = s.grid;
    lines.push([`${g.width}×${g.height} px · ${fam}`, text]);
    const tiles = g.count;
    if (st.tiling === "never") lines.push(["one pass (tiling: never)", text]);
    else if (tiles <= 1) lines.push(["fits in one tile", text]);
    else lines.push([`${g.cols}×${g.rows} = ${tiles} tiles${st.tiling === "auto" ? " if needed" : ""}`, text]);
    const peak = s.peakBytes;
    const untiled = st.server?.untiledBytes ?? s.untiledBytes;
    const memTxt = st.tiling === "never" || tiles <= 1 ? `peak ≈ ${formatBytes(peak)}`
      : `peak ≈ ${formatBytes(peak)} (untiled ${formatBytes(untiled)})`;
    lines.push([memTxt, text2]);
  } else {
    lines.push([`size unknown · ${fam}`, text]);
    lines.push(["link a latent or run once", text2]);
    lines.push([`tile ${st.corrected.tileSize} · overlap ${st.corrected.overlap}`, text2]);
  }
  widget.warnLine = null;
  if (st.corrected.changed) {
    // what the Python side will use instead; a click writes it into the inputs
    lines.length = Math.min(lines.length, 3);
    lines.push([`⚠ ${st.corrected.notes.join(", ")}`, warn]);
    widget.warnLine = { y: by + (lines.length - 1) * 15, h: 15, x: tx, w: tw };
  }
  ctx.textAlign = "left";
  lines.forEach(([t, color], i) => {
    ctx.fillStyle = color;
    const shown = fitText(ctx, t, tw);
    ctx.fillText(shown, tx, by + 7 + i * 15);
    if (color === warn) { // underlined: clickable
      ctx.fillRect(tx, by + 13 + i * 15, ctx.measureText(shown).width, 1);
    }
  });
  ctx.restore();
}

// --------------------------------------------------------------------------------------------- widget
function makeWidget(node, direction) {
  const widget = {
    name: WIDGET_NAME,
    type: WIDGET_NAME,
    value: null,
    serialize: false, // not in the workflow's widgets_values
    options: { serialize: false }, // not in the API prompt
    chips: [],
    warnLine: null,
    state: null,
    computeSize(width) {
      return [width ?? 0, PAD + CHIP_H + PAD + 2 + BODY_H];
    },
    draw(ctx, n, width, y) {
      drawWidget(ctx, n, width, y, direction, widget);
    },
    mouse(event, pos, n) {
      if (event.type !== "pointerdown" && event.type !== "mousedown") return false;
      const [x, yy] = pos;
      const top = (widget.last_y ?? widget.y ?? 0) + PAD;
      if (yy >= top && yy <= top + CHIP_H) {
        const chip = widget.chips.find((c) => x >= c.x && x <= c.x + c.w);
        if (chip) {
          applyPreset(n, direction, chip.name);
          return true;
        }
      }
      const wl = widget.warnLine;
      if (wl && yy >= wl.y && yy <= wl.y + wl.h && x >= wl.x) {
        applyCorrection(n, direction);
        return true;
      }
      return false;
    },
    // for scripts and tests: the same actions as the buttons
    applyPreset: (name) => applyPreset(node, direction, name),
    applyCorrection: () => applyCorrection(node, direction),
    getState: () => computeState(node, direction),
  };
  return widget;
}

app.registerExtension({
  name: EXT_NAME,
  nodeCreated(node) {
    const direction = TARGETS[node.comfyClass ?? node.constructor?.comfyClass];
    if (!direction || widgetOf(node, WIDGET_NAME)) return;
    node.addCustomWidget(makeWidget(node, direction));
    const size = node.computeSize?.();
    if (size && node.size) node.setSize?.([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
  },
  setup() {
    // "Last run" size: the nodes may send {vae_suite_tiles: [{width, height, downscale, family, ...}]} as UI.
    api.addEventListener("executed", ({ detail }) => {
      const info = detail?.output?.vae_suite_tiles?.[0];
      if (!info) return;
      const node = app.graph?.getNodeById?.(Number(detail.display_node ?? detail.node))
        ?? app.graph?.getNodeById?.(detail.display_node ?? detail.node);
      if (!node || !TARGETS[node.comfyClass]) return;
      node.__vaeSuiteLastRun = info;
      node.setDirtyCanvas?.(true, false);
    });
  },
});
