// node --test tests/js/  — the pure logic behind the tile widget (web/lib/tile_plan.js).
import test from "node:test";
import assert from "node:assert/strict";

import {
  PRESETS, axisTiles, correctTiling, estimatePeak, formatBytes, matchPreset, maxOverlap, minTile, planGrid,
  presetValues, summarize,
} from "../../web/lib/tile_plan.js";

test("valid values pass unchanged", () => {
  const c = correctTiling({ tileSize: 512, overlap: 64, downscale: 8 });
  assert.deepEqual([c.tileSize, c.overlap, c.changed, c.notes], [512, 64, false, []]);
});

test("tile not a multiple of the downscale factor is rounded down, with a note", () => {
  const c = correctTiling({ tileSize: 520, overlap: 64, downscale: 16 });
  assert.equal(c.tileSize, 512);
  assert.equal(c.changed, true);
  assert.deepEqual(c.notes, ["tile 520 → 512 (×16)"]);
  assert.equal(correctTiling({ tileSize: 1000, overlap: 0, downscale: 32 }).tileSize, 992);
});

test("overlap too large for the tile is clamped below half the tile", () => {
  const c = correctTiling({ tileSize: 512, overlap: 300, downscale: 8 });
  assert.equal(c.overlap, 248);
  assert.equal(maxOverlap(512, 8), 248);
  assert.equal(correctTiling({ tileSize: 512, overlap: 256, downscale: 8 }).overlap, 248);
  assert.deepEqual(c.notes, ["overlap 300 → 248 (< tile/2)"]);
  // the limit is itself a multiple of the downscale factor, strictly below tile/2
  assert.equal(maxOverlap(544, 32), 256);
  assert.equal(maxOverlap(512, 32), 224);
  assert.equal(maxOverlap(64, 8), 24);
  assert.equal(correctTiling({ tileSize: 544, overlap: 1024, downscale: 32 }).overlap, 256);
  for (const [t, ds] of [[64, 8], [512, 8], [520, 8], [1024, 16], [256, 32], [4096, 32]]) {
    const o = maxOverlap(t, ds);
    assert.ok(2 * o < t && o % ds === 0 && 2 * (o + ds) >= t, `${t},${ds}`);
  }
});

test("overlap is a non-negative multiple of the downscale factor", () => {
  assert.equal(correctTiling({ tileSize: 512, overlap: 60, downscale: 8 }).overlap, 56);
  assert.equal(correctTiling({ tileSize: 512, overlap: -5, downscale: 8 }).overlap, 0);
});

test("tile is kept within the input range and at least 8 latent pixels", () => {
  assert.equal(correctTiling({ tileSize: 10, overlap: 0, downscale: 8 }).tileSize, 64);
  assert.equal(minTile(32), 256);
  assert.equal(correctTiling({ tileSize: 64, overlap: 0, downscale: 32 }).tileSize, 256);
  assert.equal(correctTiling({ tileSize: 99999, overlap: 0, downscale: 8 }).tileSize, 4096);
  assert.deepEqual(correctTiling({ tileSize: 10, overlap: 0 }).notes, ["tile 10 → 64 (64–4096)"]);
});

test("axis tiles: ceil(n/t) nearly equal spans without overlap, as vae_core's stream.split", () => {
  assert.deepEqual(axisTiles(512, 512), [{ start: 0, size: 512 }]);
  assert.deepEqual(axisTiles(300, 512), [{ start: 0, size: 300 }]);
  assert.deepEqual(axisTiles(1024, 512).map((t) => t.start), [0, 512]);
  assert.deepEqual(axisTiles(1100, 512).map((t) => [t.start, t.size]), [[0, 367], [367, 366], [733, 367]]);
  assert.deepEqual(axisTiles(0, 512), []);
  for (const [L, t] of [[1000, 256], [2049, 512], [777, 64], [5, 2], [4096, 4096]]) {
    const tiles = axisTiles(L, t);
    assert.equal(tiles.length, Math.ceil(L / t));
    assert.equal(tiles[0].start, 0);
    assert.equal(tiles.at(-1).start + tiles.at(-1).size, L);
    for (let i = 1; i < tiles.length; i++) assert.equal(tiles[i].start, tiles[i - 1].start + tiles[i - 1].size);
    const sizes = tiles.map((x) => x.size);
    assert.ok(Math.max(...sizes) - Math.min(...sizes) <= 1 && Math.max(...sizes) <= t, `${L},${t}`);
  }
});

test("python rounding: halves go to even", async () => {
  const { roundHalfEven } = await import("../../web/lib/tile_plan.js");
  assert.deepEqual([0.5, 1.5, 2.5, 3.5, -0.5, 2.4, 2.6].map(roundHalfEven), [0, 2, 2, 4, -0, 2, 3]);
});

test("grid of a 1536x1024 image at 512 is 3x2; the image is padded to the downscale factor", () => {
  const g = planGrid({ width: 1536, height: 1024, tileSize: 512, overlap: 64, downscale: 8 });
  assert.deepEqual([g.cols, g.rows, g.count, g.tiles.length], [3, 2, 6, 6]);
  assert.deepEqual(g.tiles.at(-1), { x: 1024, y: 512, w: 512, h: 512 });
  // 1000 px wide at f32 is worked on as 1024: two 512 spans, the last one cropped to the image
  const p = planGrid({ width: 1000, height: 256, tileSize: 512, overlap: 0, downscale: 32 });
  assert.deepEqual(p.tiles.map((t) => [t.x, t.w]), [[0, 512], [512, 488]]);
});

test("grid corrects its inputs first", () => {
  const g = planGrid({ width: 2048, height: 2048, tileSize: 1000, overlap: 900, downscale: 8 });
  assert.equal(g.tileSize, 1000);
  assert.equal(g.overlap, 496);
  assert.equal(g.notes.length, 1);
  assert.equal(g.count, 9);
});

test("memory estimate: tiled peak depends on the tile, untiled on the image", () => {
  const a = estimatePeak({ width: 2048, height: 2048, tileSize: 512, overlap: 64 });
  const b = estimatePeak({ width: 4096, height: 4096, tileSize: 512, overlap: 64 });
  const c = estimatePeak({ width: 4096, height: 4096, tileSize: 1024, overlap: 128 });
  assert.ok(a.untiled < b.untiled);
  assert.ok(Math.abs(b.untiled / a.untiled - 4) < 1e-9);
  assert.ok(a.tiled < a.untiled && b.tiled < b.untiled);
  assert.ok(c.tiled > b.tiled);
  // untiled KL decode of a 128x128 latent matches ComfyUI core's planner (2178*64 per latent px) in fp32
  const d = estimatePeak({ width: 1024, height: 1024, tileSize: 2048, overlap: 0, dtypeBytes: 4 });
  assert.equal(d.untiled, 2178 * 64 * 128 * 128 * 4);
  assert.equal(d.tiles, 1);
  assert.equal(d.tiled, d.untiled);
  // half precision halves it; the tiny family needs far less
  const e = estimatePeak({ width: 1024, height: 1024, tileSize: 2048, overlap: 0, dtypeBytes: 2 });
  assert.equal(e.untiled * 2, d.untiled);
  assert.ok(estimatePeak({ width: 1024, height: 1024, tileSize: 2048, overlap: 0, family: "tiny" }).untiled
    < d.untiled / 10);
});

test("bytes are formatted compactly", () => {
  assert.equal(formatBytes(2.34e9), "2.3 GB");
  assert.equal(formatBytes(23.4e9), "23 GB");
  assert.equal(formatBytes(640e6), "640 MB");
  assert.equal(formatBytes(12e3), "12 KB");
  assert.equal(formatBytes(NaN), "?");
});

test("presets set tile and overlap, corrected for the VAE", () => {
  assert.deepEqual(PRESETS.map((p) => p.name), ["auto", "512", "768", "1024"]);
  assert.deepEqual(presetValues("768"), { mode: null, tileSize: 768, overlap: 96 });
  assert.deepEqual(presetValues("1024", { downscale: 32 }), { mode: null, tileSize: 1024, overlap: 128 });
  assert.deepEqual(presetValues("768", { downscale: 32 }), { mode: null, tileSize: 768, overlap: 96 });
  assert.deepEqual(presetValues("auto", { defaults: { tileSize: 640, overlap: 80 } }),
    { mode: "auto", tileSize: 640, overlap: 80 });
  assert.equal(presetValues("nope"), null);
});

test("current values map back to a preset", () => {
  assert.equal(matchPreset({ mode: "auto", tileSize: 512, overlap: 64 }), "auto");
  assert.equal(matchPreset({ mode: "always", tileSize: 512, overlap: 64 }), "512");
  assert.equal(matchPreset({ mode: "auto", tileSize: 768, overlap: 96 }), "768");
  assert.equal(matchPreset({ mode: "always", tileSize: 1024, overlap: 128 }), "1024");
  assert.equal(matchPreset({ mode: "auto", tileSize: 700, overlap: 64 }), null);
});

test("summary: unknown size, never mode, server estimate wins", () => {
  assert.equal(summarize({ tileSize: 512, overlap: 64 }).known, false);
  const s = summarize({ width: 1536, height: 1024, tileSize: 512, overlap: 64, mode: "always" });
  assert.equal(s.tiles, 6);
  assert.ok(s.peakBytes < s.untiledBytes);
  const n = summarize({ width: 1536, height: 1024, tileSize: 512, overlap: 64, mode: "never" });
  assert.equal(n.tiles, 1);
  assert.equal(n.peakBytes, n.untiledBytes);
  const srv = summarize({ width: 1536, height: 1024, tileSize: 512, overlap: 64,
    server: { peakBytes: 123, tiles: [[0, 0, 768, 1024], [768, 0, 1536, 1024]], cols: 2, rows: 1 } });
  assert.equal(srv.peakBytes, 123);
  assert.deepEqual([srv.grid.count, srv.grid.cols, srv.grid.rows, srv.grid.tiles[1].w], [2, 2, 1, 768]);
});

test("VAE family and downscale are guessed from loader file names", async () => {
  const { guessVae } = await import("../../web/lib/tile_plan.js");
  assert.deepEqual(guessVae("vae_approx/taef2"), { family: "tiny", downscale: 8, known: true });
  assert.deepEqual(guessVae("vae_approx/taesana"), { family: "tiny", downscale: 32, known: true });
  assert.deepEqual(guessVae("dc-ae-f32c32-sana-1.0"), { family: "dc", downscale: 32, known: true });
  assert.deepEqual(guessVae("sdxl_vae.safetensors"), { family: "kl", downscale: 8, known: true });
  assert.deepEqual(guessVae("x.safetensors", "dc"), { family: "dc", downscale: 32, known: true });
  assert.deepEqual(guessVae("", "auto"), { family: "kl", downscale: 8, known: false });
});

test("the fix line's values are on the inputs' steps and need no further correction", async () => {
  const { acceptedTiling, correctTiling: correct } = await import("../../web/lib/tile_plan.js");
  // overlap 500 with tile 512: the Python side would use 248, which the overlap input (step 16) turns into
  // 256, which does not fit again; the fix line writes 240
  assert.deepEqual(acceptedTiling({ tileSize: 512, overlap: 500, downscale: 8 }), { tileSize: 512, overlap: 240 });
  assert.deepEqual(acceptedTiling({ tileSize: 768, overlap: 500, downscale: 8 }), { tileSize: 768, overlap: 368 });
  for (const [t, o, ds] of [[512, 500, 8], [1000, 700, 32], [70, 70, 8], [4096, 3000, 8], [640, 320, 32],
    [96, 47, 8], [9000, 64, 16], [300, 1024, 32]]) {
    const a = acceptedTiling({ tileSize: t, overlap: o, downscale: ds });
    assert.equal((a.tileSize - 64) % 32, 0, `${t},${o},${ds}`);
    assert.equal(a.overlap % 16, 0, `${t},${o},${ds}`);
    const again = correct({ tileSize: a.tileSize, overlap: a.overlap, downscale: ds });
    assert.equal(again.changed, false, `${t},${o},${ds}: ${JSON.stringify(a)} ${again.notes}`);
  }
});
