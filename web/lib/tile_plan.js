// Pure tile-planning logic for the VAE Suite tile widget: presets, value correction, tile grid, memory
// estimate. No DOM, no ComfyUI imports: the frontend imports it as an ES module and `node --test` tests it
// (tests/js/). The ComfyUI frontend imports every .js under web/, so this file must stay side-effect free.
//
// Units: everything is in image pixels, like the node's INT inputs. `downscale` is the VAE's spatial factor
// (8 for SD/FLUX KL VAEs, 16 for FLUX.2-size latents of some families, 32 for DC-AE / TAESANA).
//
// The server side (vae_core.tiling, exposed by GET /vae_suite/tile_plan) is the source of truth when it
// answers; this module is the offline fallback and must correct values the same way.

/** Limits of the Python INT inputs (nodes/common.py tile_inputs); the widget reads the live ones from the
 * node definition and falls back to these. */
export const INPUT_LIMITS = Object.freeze({
  tileMin: 64,
  tileMax: 4096,
  overlapMin: 0,
  overlapMax: 1024,
});

export const DEFAULTS = Object.freeze({ tileSize: 512, overlap: 64, downscale: 8 });

/** Presets shown as buttons. "auto" lets the node decide whether to tile (mode auto, default sizes). */
export const PRESETS = Object.freeze([
  Object.freeze({ name: "auto", label: "auto", mode: "auto", tileSize: null, overlap: null }),
  Object.freeze({ name: "512", label: "512", mode: null, tileSize: 512, overlap: 64 }),
  Object.freeze({ name: "768", label: "768", mode: null, tileSize: 768, overlap: 96 }),
  Object.freeze({ name: "1024", label: "1024", mode: null, tileSize: 1024, overlap: 128 }),
]);

function toInt(v, fallback) {
  const n = Math.round(Number(v));
  return Number.isFinite(n) ? n : fallback;
}

/** Largest overlap allowed for a tile: the largest multiple of the downscale factor below half the tile
 * (vae_core.tiling.correct_tiling applies the same rule), so the stride (tile - overlap) is more than half a tile. */
export function maxOverlap(tileSize, downscale = DEFAULTS.downscale) {
  const ds = Math.max(1, toInt(downscale, 1));
  return Math.max(0, Math.floor((Math.ceil(tileSize / 2) - 1) / ds) * ds);
}

/** Smallest usable tile: the input minimum, but never fewer than 8 latent pixels across. */
export function minTile(downscale = DEFAULTS.downscale, limits = INPUT_LIMITS) {
  const ds = Math.max(1, toInt(downscale, 1));
  return Math.max(Math.ceil(limits.tileMin / ds) * ds, 8 * ds);
}

/**
 * Correct tile settings the way the Python side does:
 *  - tile_size is rounded down to a multiple of the downscale factor and kept within
 *    [minTile(ds), tileMax];
 *  - overlap is rounded down to a multiple of the downscale factor and clamped to [0, maxOverlap(tile)]
 *    (overlap * 2 < tile_size).
 * Returns the corrected values plus short notes for the widget, e.g. "overlap 500 → 376 (< tile/2)"
 * (empty when nothing changed).
 */
export function correctTiling({ tileSize, overlap, downscale = DEFAULTS.downscale, limits = INPUT_LIMITS } = {}) {
  const ds = Math.max(1, toInt(downscale, DEFAULTS.downscale));
  const lim = { ...INPUT_LIMITS, ...(limits || {}) };
  const notes = [];
  const t0 = toInt(tileSize, DEFAULTS.tileSize);
  const o0 = toInt(overlap, DEFAULTS.overlap);

  const tMax = Math.floor(lim.tileMax / ds) * ds;
  let t = Math.floor(t0 / ds) * ds;
  t = Math.min(Math.max(t, minTile(ds, lim)), tMax);
  if (t !== t0) {
    notes.push(t0 % ds !== 0 && t0 >= minTile(ds, lim) && t0 <= tMax
      ? `tile ${t0} → ${t} (×${ds})`
      : `tile ${t0} → ${t} (${minTile(ds, lim)}–${tMax})`);
  }

  let o = Math.max(0, Math.floor(Math.max(o0, 0) / ds) * ds);
  const oMax = maxOverlap(t, ds);
  if (o > oMax) o = oMax;
  if (o !== o0) {
    notes.push(o0 > oMax ? `overlap ${o0} → ${o} (< tile/2)`
      : o0 < 0 ? `overlap ${o0} → ${o}`
        : `overlap ${o0} → ${o} (×${ds})`);
  }
  return { tileSize: t, overlap: o, downscale: ds, changed: t !== t0 || o !== o0, notes };
}

/** Python's round(): halves go to the even neighbour (vae_core computes tile cuts with it). */
export function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** Tiles along one axis, as vae_core's engine cuts them (vae_core/stream.py split): [0, length) into
 * ceil(length / tile) nearly equal, non-overlapping spans (no sliver tiles). The engine is exact, so tiles
 * need no overlap: each sweep reads the few pixels of halo its layers need. Returns [{start, size}]. */
export function axisTiles(length, tileSize) {
  const L = Math.max(0, toInt(length, 0));
  if (L === 0) return [];
  const t = Math.max(1, toInt(tileSize, 1));
  const k = Math.max(1, Math.ceil(L / t));
  const cuts = [];
  for (let i = 0; i <= k; i++) cuts.push(roundHalfEven((i * L) / k));
  const out = [];
  for (let i = 0; i < k; i++) out.push({ start: cuts[i], size: cuts[i + 1] - cuts[i] });
  return out;
}

/**
 * The tile grid for an image of width x height pixels (values corrected first).
 * -> { cols, rows, count, tiles: [{x, y, w, h}], tileSize, overlap, downscale, notes }
 */
export function planGrid({ width, height, tileSize, overlap, downscale = DEFAULTS.downscale, limits } = {}) {
  const c = correctTiling({ tileSize, overlap, downscale, limits });
  const W = Math.max(0, toInt(width, 0));
  const H = Math.max(0, toInt(height, 0));
  // the engine works on the image padded to a multiple of the downscale factor, then crops
  const pad = (n) => Math.ceil(n / c.downscale) * c.downscale;
  const clip = (spans, n) => spans.map((t) => ({ start: t.start, size: Math.min(t.start + t.size, n) - t.start }))
    .filter((t) => t.size > 0);
  const xs = clip(axisTiles(pad(W), c.tileSize), W);
  const ys = clip(axisTiles(pad(H), c.tileSize), H);
  const tiles = [];
  for (const y of ys) for (const x of xs) tiles.push({ x: x.start, y: y.start, w: x.size, h: y.size });
  return {
    width: W, height: H, cols: xs.length, rows: ys.length, count: tiles.length, tiles,
    tileSize: c.tileSize, overlap: c.overlap, downscale: c.downscale, notes: c.notes,
  };
}

// Bytes of activation memory per latent pixel at the widest high-resolution stage, per family and
// direction (fp32 elements x 4 bytes are applied separately). KL follows ComfyUI core's planner
// (decode 2178*64 per latent pixel, encode 1767 per image pixel); the small families are scaled down
// by their channel widths. These are estimates, shown with "≈".
const ELEMENTS_PER_LATENT_PX = Object.freeze({
  kl: { decode: 2178 * 64, encode: 1767 * 64 },
  asym: { decode: 2178 * 64 * 1.5, encode: 1767 * 64 },
  dc: { decode: 2178 * 64 * 0.5, encode: 1767 * 64 * 0.5 },
  tiny: { decode: 64 * 64 * 3, encode: 64 * 64 * 3 }, // 64 channels at full resolution, ~3 live buffers
});

export const DTYPE_BYTES = Object.freeze({ fp32: 4, float32: 4, bf16: 2, bfloat16: 2, fp16: 2, float16: 2 });

/** Memory (bytes) to run one region of `w` x `h` image pixels through the network. */
function regionBytes(w, h, { family = "kl", direction = "decode", downscale = 8, dtypeBytes = 4 }) {
  const fam = ELEMENTS_PER_LATENT_PX[family] || ELEMENTS_PER_LATENT_PX.kl;
  const per = fam[direction === "encode" ? "encode" : "decode"];
  const latentPx = Math.ceil(w / downscale) * Math.ceil(h / downscale);
  return per * latentPx * dtypeBytes;
}

/**
 * Estimated peak compute-device memory (bytes): untiled (one region = the whole image) and tiled (one
 * tile's working set; the engine keeps full-size activations in host RAM or on disk between sweeps).
 * -> { untiled, tiled, tiles }
 */
export function estimatePeak({ width, height, tileSize, overlap, downscale = DEFAULTS.downscale,
  family = "kl", direction = "decode", dtypeBytes = 4, limits } = {}) {
  const plan = planGrid({ width, height, tileSize, overlap, downscale, limits });
  const opts = { family, direction, downscale: plan.downscale, dtypeBytes };
  const untiled = regionBytes(plan.width, plan.height, opts);
  const tw = Math.max(0, ...plan.tiles.map((t) => t.w));
  const th = Math.max(0, ...plan.tiles.map((t) => t.h));
  const tiled = plan.count <= 1 ? untiled : regionBytes(tw, th, opts);
  return { untiled, tiled, tiles: plan.count };
}

/** "1.2 GB", "640 MB", "12 KB" (decimal units, as ComfyUI's system stats show). */
export function formatBytes(n) {
  const v = Number(n);
  if (!Number.isFinite(v) || v < 0) return "?";
  if (v >= 1e9) return `${(v / 1e9).toFixed(v >= 1e10 ? 0 : 1)} GB`;
  if (v >= 1e6) return `${Math.round(v / 1e6)} MB`;
  if (v >= 1e3) return `${Math.round(v / 1e3)} KB`;
  return `${Math.round(v)} B`;
}

/** The values a preset sets: {mode?, tileSize, overlap}, corrected for the downscale factor. `defaults`
 * are the node's declared defaults (used by "auto"). Returns null for an unknown preset. */
export function presetValues(name, { downscale = DEFAULTS.downscale, defaults = DEFAULTS, limits } = {}) {
  const p = PRESETS.find((q) => q.name === String(name));
  if (!p) return null;
  const tile = p.tileSize ?? defaults.tileSize ?? DEFAULTS.tileSize;
  const ov = p.overlap ?? defaults.overlap ?? DEFAULTS.overlap;
  const c = correctTiling({ tileSize: tile, overlap: ov, downscale, limits });
  return { mode: p.mode, tileSize: c.tileSize, overlap: c.overlap };
}

/** Which preset the current values correspond to (null when none: custom values). */
export function matchPreset({ mode, tileSize, overlap, downscale = DEFAULTS.downscale, defaults = DEFAULTS, limits } = {}) {
  for (const p of PRESETS) {
    const v = presetValues(p.name, { downscale, defaults, limits });
    if (v.tileSize !== toInt(tileSize, NaN) || v.overlap !== toInt(overlap, NaN)) continue;
    if (p.mode && mode != null && mode !== p.mode) continue;
    return p.name; // "auto" comes first, so auto mode with the default sizes reads as "auto"
  }
  return null;
}

/** Short text lines for the widget: size, grid, memory. `size` may be null (unknown). */
export function summarize({ width, height, tileSize, overlap, mode = "auto", downscale = DEFAULTS.downscale,
  family = "kl", direction = "decode", dtypeBytes = 4, limits, server = null } = {}) {
  const c = correctTiling({ tileSize, overlap, downscale, limits });
  if (!(width > 0 && height > 0)) {
    return { known: false, grid: null, tiles: null, peakBytes: null, corrected: c };
  }
  let plan = planGrid({ width, height, tileSize: c.tileSize, overlap: c.overlap, downscale, limits });
  if (server && Array.isArray(server.tiles) && server.tiles.length) {
    // the server's own plan (vae_core): [[x0, y0, x1, y1], ...] image-pixel rectangles, end-exclusive
    const tiles = server.tiles.map(([x0, y0, x1, y1]) => ({ x: x0, y: y0, w: x1 - x0, h: y1 - y0 }));
    plan = { ...plan, tiles, count: tiles.length, cols: server.cols ?? plan.cols, rows: server.rows ?? plan.rows };
  }
  const est = estimatePeak({ width, height, tileSize: c.tileSize, overlap: c.overlap, downscale, family,
    direction, dtypeBytes, limits });
  const tiled = mode === "never" ? false : mode === "always" ? plan.count > 1 : null; // null: auto decides
  let peak = tiled === false ? est.untiled : est.tiled;
  if (server && Number.isFinite(server.peakBytes)) peak = server.peakBytes;
  return { known: true, grid: plan, tiles: tiled === false ? 1 : plan.count, peakBytes: peak,
    untiledBytes: est.untiled, tiled, corrected: c };
}

/** Guess the VAE family and downscale factor from what a loader node shows (file name, family override).
 * -> {family, downscale, known} ; known=false means "assumed" (a plain KL VAE, 8x). */
export function guessVae(text = "", familyOverride = "auto") {
  const t = String(text || "").toLowerCase();
  const fam = String(familyOverride || "auto").toLowerCase();
  if (/taesana/.test(t)) return { family: "tiny", downscale: 32, known: true };
  if (fam === "dc") return { family: "dc", downscale: 32, known: true };
  if (["kl", "asym", "tiny"].includes(fam)) return { family: fam, downscale: 8, known: true };
  if (/(^|[^a-z])(dc[-_]?ae|dcae)|sana/.test(t)) return { family: "dc", downscale: 32, known: true };
  if (/tae(sd|sdxl|sd3|f1|f2)|taesd/.test(t)) return { family: "tiny", downscale: 8, known: true };
  if (/asym/.test(t)) return { family: "asym", downscale: 8, known: true };
  return { family: "kl", downscale: 8, known: t.length > 0 };
}

/** Input steps of the Python INT inputs (nodes/common.py tile_inputs); the live ones come from the node
 * definition. */
export const INPUT_STEPS = Object.freeze({ tileSize: 32, overlap: 16 });

function snapDown(v, step, min) {
  const s = Math.max(1, toInt(step, 1));
  return min + Math.floor((v - min) / s) * s;
}

/**
 * Values to write back when the current ones do not fit: corrected as the Python side corrects them AND on
 * the inputs' step, so the frontend's INT inputs keep them as they are and the Python side uses them as
 * they are (no second warning). -> { tileSize, overlap }
 */
export function acceptedTiling({ tileSize, overlap, downscale = DEFAULTS.downscale, limits = INPUT_LIMITS,
  steps = INPUT_STEPS } = {}) {
  const lim = { ...INPUT_LIMITS, ...(limits || {}) };
  const st = { ...INPUT_STEPS, ...(steps || {}) };
  let c = correctTiling({ tileSize, overlap, downscale, limits: lim });
  for (let i = 0; i < 16; i++) {
    const t = snapDown(c.tileSize, st.tileSize, lim.tileMin);
    const o = Math.max(lim.overlapMin, snapDown(c.overlap, st.overlap, lim.overlapMin));
    const next = correctTiling({ tileSize: t, overlap: o, downscale, limits: lim });
    if (next.tileSize === t && next.overlap === o) return { tileSize: t, overlap: o };
    c = next;
  }
  return { tileSize: c.tileSize, overlap: c.overlap };
}
