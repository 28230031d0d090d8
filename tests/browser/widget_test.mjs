// Drives Debian's chromium (playwright-core) against a running ComfyUI host with this pack loaded, and
// checks the tile-settings widget end to end. Run by tests/test_widget_browser.py:
//   COMFY_URL=http://127.0.0.1:PORT VAE_NAME=<entry> ARTIFACTS=<dir> node tests/browser/widget_test.mjs
// Prints one JSON object (the measured facts) as the last stdout line; exits 1 on a failed check.
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { join } from "node:path";

const URL = process.env.COMFY_URL ?? "http://127.0.0.1:8188";
const VAE_NAME = process.env.VAE_NAME ?? "";
const ARTIFACTS = process.env.ARTIFACTS ?? "artifacts";
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const PACK_JS = /\/extensions\/comfyui-vae-suite\//;

const facts = { checks: {} };
const failures = [];
function check(name, ok, detail) {
  facts.checks[name] = { ok: !!ok, ...(detail === undefined ? {} : { detail }) };
  if (!ok) failures.push(`${name}: ${JSON.stringify(detail)}`);
}

function watchConsole(page, sink) {
  page.on("console", (m) => {
    if (m.type() !== "error") return;
    const loc = m.location();
    sink.push({ text: m.text(), url: loc?.url ?? "" });
  });
  page.on("pageerror", (e) => sink.push({ text: String(e?.stack || e), url: "" }));
}

async function waitReady(page) {
  await page.goto(URL, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => {
    const t = window.LiteGraph?.registered_node_types;
    return t && Object.keys(t).length > 0 && window.app?.graph && window.app?.canvas;
  }, null, { timeout: 60000 });
  // let extensions' setup() and the first draw happen
  await page.waitForTimeout(500);
}

/** Builds EmptyLatentImage(1536x1024) -> VAESuiteDecodeTiled <- VAESuiteLoader, -> PreviewImage. */
async function buildGraph(page) {
  return page.evaluate(async (vaeName) => {
    const { app, LiteGraph } = window;
    app.graph.clear();
    const add = (type, pos) => {
      const n = LiteGraph.createNode(type);
      n.pos = pos;
      app.graph.add(n);
      return n;
    };
    const latent = add("EmptyLatentImage", [20, 140]);
    latent.widgets.find((w) => w.name === "width").value = 1536;
    latent.widgets.find((w) => w.name === "height").value = 1024;
    const loader = add("VAESuiteLoader", [20, 360]);
    const lw = loader.widgets.find((w) => w.name === "vae_name");
    if (vaeName) lw.value = vaeName;
    const dec = add("VAESuiteDecodeTiled", [380, 140]);
    const prev = add("PreviewImage", [760, 140]);
    latent.connect(0, dec, 0);
    loader.connect(0, dec, 1);
    dec.connect(0, prev, 0);
    app.canvas.ds.scale = 1;
    app.canvas.ds.offset = [70, 0];
    app.graph.setDirtyCanvas(true, true);
    return { latent: latent.id, loader: loader.id, dec: dec.id, prev: prev.id, vaeName: lw.value,
      vaeOptions: lw.options?.values ?? null };
  }, VAE_NAME);
}

function nodeValues(page, id) {
  return page.evaluate((nid) => {
    const n = window.app.graph.getNodeById(nid);
    const get = (name) => n.widgets?.find((w) => w.name === name)?.value;
    return { tiling: get("tiling"), tile_size: get("tile_size"), overlap: get("overlap"),
      hasWidget: !!n.widgets?.find((w) => w.name === "vae_suite_tiles") };
  }, id);
}

/** Screen point (page CSS px) of a spot of our widget: kind "chip" (preset name) or "warn". */
async function widgetPoint(page, id, kind, name) {
  const p = await page.evaluate(({ nid, kind, name }) => {
    const { app } = window;
    const n = app.graph.getNodeById(nid);
    const w = n.widgets.find((x) => x.name === "vae_suite_tiles");
    let gx;
    let gy;
    if (kind === "chip") {
      const c = w.chips.find((x) => x.name === name);
      if (!c) return null;
      gx = n.pos[0] + c.x + c.w / 2;
      gy = n.pos[1] + (w.last_y ?? w.y) + 4 + 10;
    } else {
      if (!w.warnLine) return null;
      gx = n.pos[0] + w.warnLine.x + 20;
      gy = n.pos[1] + w.warnLine.y + w.warnLine.h / 2;
    }
    const [cx, cy] = app.canvas.ds.convertOffsetToCanvas([gx, gy]);
    const r = app.canvas.canvas.getBoundingClientRect();
    const k = r.width / app.canvas.canvas.width * (window.devicePixelRatio || 1);
    return { x: r.left + cx * k, y: r.top + cy * k };
  }, { nid: id, kind, name });
  return p;
}

async function redraw(page) {
  await page.evaluate(() => { window.app.graph.setDirtyCanvas(true, true); window.app.canvas.draw(true, true); });
  await page.waitForTimeout(150);
}

async function main() {
  mkdirSync(ARTIFACTS, { recursive: true });
  // playwright gives each launch a fresh temporary --user-data-dir itself (it refuses one in args)
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  try {
    // ------------------------------------------------------------ baseline: the same page without our JS
    const base = await browser.newContext({ viewport: { width: 1400, height: 900 } });
    const basePage = await base.newPage();
    const baseErrors = [];
    watchConsole(basePage, baseErrors);
    await basePage.route(PACK_JS, (r) => r.fulfill({ status: 200, contentType: "text/javascript", body: "" }));
    await waitReady(basePage);
    const baseIds = await buildGraph(basePage);
    await redraw(basePage);
    facts.baseline_errors = baseErrors.map((e) => e.text.slice(0, 200));

    // ------------------------------------------------------------ with the pack's extension
    const ctx = await browser.newContext({ viewport: { width: 1400, height: 900 } });
    const page = await ctx.newPage();
    const errors = [];
    const packRequests = [];
    watchConsole(page, errors);
    const failedResponses = [];
    page.on("response", (r) => {
      if (PACK_JS.test(r.url())) packRequests.push([r.url(), r.status()]);
      if (r.status() >= 400) failedResponses.push([r.status(), r.url()]);
    });
    await waitReady(page);

    const loaded = await page.evaluate(() => {
      const names = (window.app.extensions ?? []).map((e) => e.name);
      return { registered: names.includes("vae_suite.tile_settings") };
    });
    check("extension_registered", loaded.registered, loaded);
    check("pack_js_served", packRequests.length >= 2 && packRequests.every(([, s]) => s === 200), packRequests);

    const ids = await buildGraph(page);
    facts.vae_name = ids.vaeName;
    await redraw(page);
    await page.waitForTimeout(400); // the tile_plan route answers, then the node redraws
    await redraw(page);

    let v = await nodeValues(page, ids.dec);
    check("widget_added", v.hasWidget, v);
    const st0 = await page.evaluate((nid) => {
      const n = window.app.graph.getNodeById(nid);
      const w = n.widgets.find((x) => x.name === "vae_suite_tiles");
      const s = w.state; // set by draw(): proves it was drawn
      return s && { drawn: true, preset: s.preset, size: s.size, count: s.summary?.grid?.count,
        server: s.server, peak: s.summary?.peakBytes, widgetsOrder: n.widgets.map((x) => x.name),
        nodeSize: [...n.size] };
    }, ids.dec);
    check("widget_drawn_with_grid", st0?.drawn && st0.size?.width === 1536 && st0.size?.height === 1024
      && st0.count === 6, st0);
    check("server_plan_used", st0?.server?.count === 6 && st0.server.tiles?.length === 6, st0?.server);
    facts.initial = st0;

    // ------------------------------------------------------------ a preset, chosen with the mouse
    const chip = await widgetPoint(page, ids.dec, "chip", "768");
    await page.mouse.click(chip.x, chip.y);
    await redraw(page);
    v = await nodeValues(page, ids.dec);
    check("preset_768_sets_ints", v.tile_size === 768 && v.overlap === 96, v);
    const st1 = await page.evaluate((nid) => {
      const w = window.app.graph.getNodeById(nid).widgets.find((x) => x.name === "vae_suite_tiles");
      return { preset: w.state.preset, count: w.state.summary.grid.count };
    }, ids.dec);
    check("preset_768_grid", st1.preset === "768" && st1.count === 4, st1);

    // ------------------------------------------------------------ a value that does not fit, fixed by a click
    await page.evaluate((nid) => {
      const w = window.app.graph.getNodeById(nid).widgets.find((x) => x.name === "overlap");
      w.value = 500;
    }, ids.dec);
    await redraw(page);
    const warn = await page.evaluate((nid) => {
      const w = window.app.graph.getNodeById(nid).widgets.find((x) => x.name === "vae_suite_tiles");
      return { notes: w.state.corrected.notes, overlap: w.state.corrected.overlap, line: !!w.warnLine };
    }, ids.dec);
    check("bad_overlap_shown", warn.line && warn.overlap === 376 && warn.notes.join() === "overlap 500 → 376 (< tile/2)", warn);
    await page.screenshot({ path: join(ARTIFACTS, "widget_warning.png"), clip: await nodeClip(page, ids.dec) });
    const wp = await widgetPoint(page, ids.dec, "warn");
    await page.mouse.click(wp.x, wp.y);
    await redraw(page);
    v = await nodeValues(page, ids.dec);
    check("bad_overlap_fixed_by_click", v.overlap === 376, v);
    // back to the preset for the rest
    const chip2 = await widgetPoint(page, ids.dec, "chip", "768");
    await page.mouse.click(chip2.x, chip2.y);
    await redraw(page);
    v = await nodeValues(page, ids.dec);
    check("preset_again", v.tile_size === 768 && v.overlap === 96, v);

    // ------------------------------------------------------------ screenshot of the node
    await page.screenshot({ path: join(ARTIFACTS, "widget_node.png"), clip: await nodeClip(page, ids.dec) });
    await page.screenshot({ path: join(ARTIFACTS, "widget_graph.png") });

    // ------------------------------------------------------------ the queued prompt carries the values
    const promptReq = page.waitForRequest((r) => /\/prompt$/.test(r.url()) && r.method() === "POST", { timeout: 30000 });
    await page.evaluate(() => window.app.queuePrompt(0, 1));
    const req = await promptReq;
    const body = req.postDataJSON();
    const resp = await req.response();
    const decInputs = body.prompt[String(ids.dec)]?.inputs ?? {};
    check("prompt_carries_values", decInputs.tile_size === 768 && decInputs.overlap === 96
      && !("vae_suite_tiles" in decInputs), decInputs);
    const answer = await resp.json();
    check("prompt_accepted", resp.status() === 200 && !!answer.prompt_id, { status: resp.status(), answer });
    facts.prompt_id = answer.prompt_id;
    const wfNode = body.extra_data?.extra_pnginfo?.workflow?.nodes?.find((n) => n.id === ids.dec);
    check("workflow_widgets_values", JSON.stringify(wfNode?.widgets_values) === JSON.stringify(["auto", 768, 96]),
      wfNode?.widgets_values);

    // ------------------------------------------------------------ save + reload keeps them
    const wf = await page.evaluate(() => window.app.graph.serialize());
    facts.saved_workflow = wf;
    await page.evaluate(async (w) => { window.app.graph.clear(); await window.app.loadGraphData(w); }, wf);
    await redraw(page);
    v = await nodeValues(page, ids.dec);
    check("reloaded_workflow_keeps_values", v.tile_size === 768 && v.overlap === 96 && v.hasWidget, v);
    // the whole page reloaded: the frontend restores the open workflow
    await page.waitForTimeout(1200); // the frontend persists the workflow on a timer
    await waitReady(page);
    await redraw(page);
    v = await nodeValues(page, ids.dec);
    check("page_reload_keeps_values", v.tile_size === 768 && v.overlap === 96 && v.hasWidget, v);

    // ------------------------------------------------------------ without our JS the saved workflow still works
    await basePage.evaluate(async (w) => { window.app.graph.clear(); await window.app.loadGraphData(w); }, wf);
    const bv = await nodeValues(basePage, ids.dec);
    check("without_js_values_kept", bv.tile_size === 768 && bv.overlap === 96 && bv.tiling === "auto"
      && !bv.hasWidget, bv);
    const basePrompt = await basePage.evaluate(async () => (await window.app.graphToPrompt()).output);
    const bInputs = basePrompt[String(ids.dec)]?.inputs ?? {};
    check("without_js_prompt_same", bInputs.tile_size === 768 && bInputs.overlap === 96, bInputs);
    facts.baseline_ids = baseIds;

    // ------------------------------------------------------------ the encode and inpaint-decode nodes get it too
    const enc = await page.evaluate(async () => {
      const { app, LiteGraph } = window;
      const img = LiteGraph.createNode("EmptyImage");
      img.pos = [20, 560];
      app.graph.add(img);
      img.widgets.find((w) => w.name === "width").value = 2048;
      img.widgets.find((w) => w.name === "height").value = 1000;
      const e = LiteGraph.createNode("VAESuiteEncode");
      e.pos = [380, 560];
      app.graph.add(e);
      img.connect(0, e, 0);
      const a = LiteGraph.createNode("VAESuiteAsymInpaintDecode");
      app.graph.add(a);
      const w = e.widgets.find((x) => x.name === "vae_suite_tiles");
      const st = w?.getState();
      const out = { encode: !!w, asym: !!a.widgets.find((x) => x.name === "vae_suite_tiles"),
        size: st?.size, count: st?.summary?.grid?.count,
        valuesSerialized: e.serialize().widgets_values };
      app.graph.remove(a);
      return out;
    });
    check("encode_and_asym_nodes_have_widget", enc.encode && enc.asym && enc.size?.width === 2048
      && enc.size?.height === 1000 && enc.count === 8, enc);

    // ------------------------------------------------------------ console errors of the pack
    const baseSet = new Set(baseErrors.map((e) => e.text));
    // ours: anything raised from our JS files, or an error text the page without our JS never logs (the
    // frontend itself asks api.comfy.org about every custom node type, also without our JS: not ours)
    const ours = errors.filter((e) => PACK_JS.test(e.text) || PACK_JS.test(e.url) || !baseSet.has(e.text));
    facts.console_errors = errors.map((e) => e.text.slice(0, 200));
    facts.failed_responses = failedResponses;
    check("no_console_error_from_pack", ours.length === 0, ours);
    // generic "Failed to load resource" texts look alike: also no failed request to our JS or our route
    const oursHttp = failedResponses.filter(([, u]) => PACK_JS.test(u) || /\/vae_suite\//.test(u));
    check("no_failed_request_from_pack", oursHttp.length === 0, oursHttp);
  } finally {
    await browser.close();
  }
}

/** Page-pixel clip around a node (title bar included). */
async function nodeClip(page, id) {
  return page.evaluate((nid) => {
    const { app, LiteGraph } = window;
    const n = app.graph.getNodeById(nid);
    const th = LiteGraph.NODE_TITLE_HEIGHT ?? 30;
    const [x0, y0] = app.canvas.ds.convertOffsetToCanvas([n.pos[0] - 8, n.pos[1] - th - 8]);
    const [x1, y1] = app.canvas.ds.convertOffsetToCanvas([n.pos[0] + n.size[0] + 8, n.pos[1] + n.size[1] + 8]);
    const r = app.canvas.canvas.getBoundingClientRect();
    const k = r.width / app.canvas.canvas.width * (window.devicePixelRatio || 1);
    return { x: r.left + x0 * k, y: r.top + y0 * k, width: (x1 - x0) * k, height: (y1 - y0) * k };
  }, id);
}

main().then(() => {
  process.stdout.write(`${JSON.stringify(facts)}\n`);
  if (failures.length) {
    process.stderr.write(`FAILED:\n${failures.join("\n")}\n`);
    process.exit(1);
  }
}).catch((e) => {
  process.stdout.write(`${JSON.stringify({ ...facts, crash: String(e?.stack || e) })}\n`);
  process.stderr.write(`${e?.stack || e}\n`);
  process.exit(2);
});
