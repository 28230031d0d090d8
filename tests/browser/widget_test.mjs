// Drives Debian's chromium (playwright-core) against a running ComfyUI host with this pack loaded and checks
// the tile-settings widget end to end under each renderer: the classic canvas and the Vue node renderer
// ("Nodes 2.0", setting Comfy.VueNodes.Enabled). Run by tests/test_widget_browser.py:
//   COMFY_URL=http://127.0.0.1:PORT VAE_NAME=<entry> ARTIFACTS=<dir> FRONTEND=<label> RENDERERS=classic,vue \
//     node tests/browser/widget_test.mjs
// Every action is what a person does: a click on a preset button, on an input's arrow, on the fix line, on
// the Run button. Prints one JSON object (the measured facts) as the last stdout line; exits 1 on a failed check.
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { join } from "node:path";

const URL = process.env.COMFY_URL ?? "http://127.0.0.1:8188";
const VAE_NAME = process.env.VAE_NAME ?? "";
const ARTIFACTS = process.env.ARTIFACTS ?? "artifacts";
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const FRONTEND = process.env.FRONTEND ?? "frontend";
const RENDERERS = (process.env.RENDERERS ?? "classic,vue").split(",").filter(Boolean);
const PACK = /\/extensions\/comfyui-vae-suite\/|\/vae_suite\//;

const facts = { frontend: FRONTEND, checks: {} };
const failures = [];
function check(name, ok, detail) {
  facts.checks[name] = { ok: !!ok, ...(detail === undefined ? {} : { detail }) };
  if (!ok) failures.push(`${name}: ${JSON.stringify(detail)}`);
}

async function setSetting(id, value) {
  const r = await fetch(`${URL}/api/settings/${id}`, { method: "POST", body: JSON.stringify(value) });
  if (!r.ok) throw new Error(`setting ${id}: ${r.status}`);
}

async function openPage(browser, { blockPackJs = false } = {}) {
  const ctx = await browser.newContext({ viewport: { width: 1400, height: 900 } });
  const page = await ctx.newPage();
  const errors = [];
  page.on("console", (m) => {
    if (m.type() === "error") errors.push({ text: m.text(), url: m.location()?.url ?? "" });
  });
  page.on("pageerror", (e) => errors.push({ text: String(e?.stack || e), url: "" }));
  const failed = [];
  page.on("response", (r) => { if (r.status() >= 400) failed.push([r.status(), r.url()]); });
  if (blockPackJs) {
    await page.route(/\/extensions\/comfyui-vae-suite\//, (r) => r.fulfill({ status: 200,
      contentType: "text/javascript", body: "" }));
  }
  await page.goto(URL, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => {
    const t = window.LiteGraph?.registered_node_types;
    return t && Object.keys(t).length > 0 && window.app?.graph && window.app?.canvas;
  }, null, { timeout: 90000 });
  await page.waitForTimeout(800); // extensions' setup() and the first draw
  return { ctx, page, errors, failed };
}

/** EmptyLatentImage(1536x1024) -> VAESuiteDecodeTiled <- VAESuiteLoader, -> PreviewImage. */
async function buildGraph(page) {
  return page.evaluate((vaeName) => {
    const { app, LiteGraph } = window;
    app.graph.clear();
    const add = (type, pos) => {
      const n = LiteGraph.createNode(type);
      n.pos = pos;
      app.graph.add(n);
      return n;
    };
    const latent = add("EmptyLatentImage", [20, 120]);
    latent.widgets.find((w) => w.name === "width").value = 1536;
    latent.widgets.find((w) => w.name === "height").value = 1024;
    const loader = add("VAESuiteLoader", [20, 400]);
    if (vaeName) loader.widgets.find((w) => w.name === "vae_name").value = vaeName;
    const dec = add("VAESuiteDecodeTiled", [400, 120]);
    const prev = add("PreviewImage", [820, 120]);
    latent.connect(0, dec, 0);
    loader.connect(0, dec, 1);
    dec.connect(0, prev, 0);
    app.canvas.ds.scale = 1;
    app.canvas.ds.offset = [0, 0];
    app.graph.setDirtyCanvas(true, true);
    return { latent: latent.id, loader: loader.id, dec: dec.id, prev: prev.id };
  }, VAE_NAME);
}

const widgetSel = (id) => `.vae-suite-tiles[data-vae-suite-node="${id}"]`;

function values(page, id) {
  return page.evaluate((nid) => {
    const n = window.app.graph.getNodeById(nid);
    const get = (name) => n.widgets?.find((w) => w.name === name)?.value;
    return { tiling: get("tiling"), tile_size: get("tile_size"), overlap: get("overlap"),
      hasWidget: !!n.widgets?.find((w) => w.name === "vae_suite_tiles") };
  }, id);
}

/** What the widget shows: its text lines, the preset lit, the tiles drawn, the fix line. */
function shown(page, id) {
  return page.evaluate((sel) => {
    const r = document.querySelector(sel);
    if (!r) return null;
    const box = r.getBoundingClientRect();
    return { lines: [...r.querySelectorAll(".vst-lines div")].map((d) => d.textContent),
      pressed: [...r.querySelectorAll("button[aria-pressed=true]")].map((b) => b.dataset.preset),
      tiles: r.querySelectorAll("rect.vst-tile").length, fix: r.querySelector(".vst-fix").hidden ? null
        : r.querySelector(".vst-fix").textContent, visible: box.width > 100 && box.height > 60 };
  }, widgetSel(id));
}

/** Wait until the widget shows what `pred` wants (it redraws within a few hundred ms). */
async function until(page, id, pred, ms = 4000) {
  const t0 = Date.now();
  let s = await shown(page, id);
  while (!(s && pred(s)) && Date.now() - t0 < ms) {
    await page.waitForTimeout(100);
    s = await shown(page, id);
  }
  return s;
}

/** A value typed into an input (sets it as the input's own editor does, through its callback). */
function typeValue(page, id, name, value) {
  return page.evaluate(({ nid, name, value }) => {
    const w = window.app.graph.getNodeById(nid).widgets.find((x) => x.name === name);
    w.value = value;
    w.callback?.(value);
    window.app.graph.setDirtyCanvas(true, true);
  }, { nid: id, name, value });
}

/** Click the "increase" arrow of an INT input as a person does, under either renderer. */
async function clickIncrement(page, renderer, id, name) {
  if (renderer === "vue") {
    const node = page.locator(`[data-node-id="${id}"]`);
    const newer = node.locator(`[data-widget-name="${name}"] [data-testid="increment"]`);
    if (await newer.count()) return newer.first().click();
    return node.locator(`span[data-pc-name="inputnumber"]:has(input[aria-label="${name}"]) `
      + "button[data-pc-section=\"incrementbutton\"]").first().click();
  }
  const p = await page.evaluate(({ nid, name }) => {
    const { app, LiteGraph } = window;
    const n = app.graph.getNodeById(nid);
    const w = n.widgets.find((x) => x.name === name);
    const h = LiteGraph.NODE_WIDGET_HEIGHT ?? 20;
    const [cx, cy] = app.canvas.ds.convertOffsetToCanvas([n.pos[0] + n.size[0] - 22, n.pos[1] + (w.last_y ?? w.y) + h / 2]);
    const r = app.canvas.canvas.getBoundingClientRect();
    const k = r.width / app.canvas.canvas.width * (window.devicePixelRatio || 1);
    return { x: r.left + cx * k, y: r.top + cy * k };
  }, { nid: id, name });
  await page.mouse.click(p.x, p.y);
}

async function nodeShot(page, renderer, id, path) {
  const clip = await page.evaluate(({ nid, vue }) => {
    const { app, LiteGraph } = window;
    if (vue) {
      const r = document.querySelector(`[data-node-id="${nid}"]`).getBoundingClientRect();
      return { x: r.left - 8, y: r.top - 8, width: r.width + 16, height: r.height + 16 };
    }
    const n = app.graph.getNodeById(nid);
    const th = LiteGraph.NODE_TITLE_HEIGHT ?? 30;
    const [x0, y0] = app.canvas.ds.convertOffsetToCanvas([n.pos[0] - 8, n.pos[1] - th - 8]);
    const [x1, y1] = app.canvas.ds.convertOffsetToCanvas([n.pos[0] + n.size[0] + 8, n.pos[1] + n.size[1] + 8]);
    const r = app.canvas.canvas.getBoundingClientRect();
    const k = r.width / app.canvas.canvas.width * (window.devicePixelRatio || 1);
    return { x: r.left + x0 * k, y: r.top + y0 * k, width: (x1 - x0) * k, height: (y1 - y0) * k };
  }, { nid: id, vue: renderer === "vue" });
  await page.screenshot({ path, clip });
}

async function runRenderer(browser, renderer, index) {
  const tag = `${renderer}_`;
  const c = (name, ok, detail) => check(tag + name, ok, detail);
  await setSetting("Comfy.VueNodes.Enabled", renderer === "vue");
  const { ctx, page, errors, failed } = await openPage(browser);
  const vueOn = await page.evaluate(() => !!document.querySelector("[data-node-id]")
    || window.app.ui?.settings?.getSettingValue?.("Comfy.VueNodes.Enabled"));
  const ids = await buildGraph(page);
  const id = ids.dec;
  // a different batch per renderer, so the second prompt is not answered from the server's cache
  await typeValue(page, ids.latent, "batch_size", index + 1);
  const aliases = await page.evaluate(() => window.LiteGraph.registered_node_types.VAESuiteDecodeTiled?.nodeData
    ?.search_aliases ?? null);
  c("search_aliases_reach_frontend", Array.isArray(aliases) && aliases.includes("tiled vae"), aliases);
  c("renderer_is_active", renderer === "vue" ? await page.locator(`[data-node-id="${id}"]`).count() === 1
    : !(await page.locator(`[data-node-id="${id}"]`).count()), { vueOn });

  // the widget shows the linked latent's tile grid, as the route plans it
  let s = await until(page, id, (x) => x.tiles === 6);
  await page.waitForFunction((nid) => window.app.graph.getNodeById(nid).widgets
    .find((x) => x.name === "vae_suite_tiles").getState().server, id, { timeout: 15000 }).catch(() => null);
  const st = await page.evaluate((nid) => {
    const w = window.app.graph.getNodeById(nid).widgets.find((x) => x.name === "vae_suite_tiles");
    const g = w.getState();
    return { server: g.server && { count: g.server.count, tiles: g.server.tiles?.length }, routeError: g.routeError };
  }, id);
  c("widget_shows_linked_grid", s?.visible && s.lines[0]?.startsWith("1536×1024") && s.tiles === 6
    && s.pressed.join() === "auto", s);
  c("grid_is_the_routes_plan", st.server?.count === 6 && st.server.tiles === 6 && !st.routeError, st);

  // link changes redraw it
  await page.evaluate((i) => window.app.graph.getNodeById(i.dec).disconnectInput(0), ids);
  s = await until(page, id, (x) => x.lines[0]?.startsWith("size unknown"));
  c("unlinked_shows_size_unknown", s?.lines[0]?.startsWith("size unknown") && s.tiles === 0, s);
  await page.evaluate((i) => window.app.graph.getNodeById(i.latent).connect(0, window.app.graph.getNodeById(i.dec), 0), ids);
  s = await until(page, id, (x) => x.tiles === 6);
  c("relinked_shows_grid", s?.tiles === 6, s);

  // an upstream size change redraws it
  await typeValue(page, ids.latent, "width", 2048);
  s = await until(page, id, (x) => x.tiles === 8);
  c("upstream_size_change_redraws", s?.lines[0]?.startsWith("2048×1024") && s.tiles === 8, s);
  await typeValue(page, ids.latent, "width", 1536);
  await until(page, id, (x) => x.tiles === 6);

  // a preset button
  await page.locator(`${widgetSel(id)} button[data-preset="768"]`).click();
  let v = await values(page, id);
  s = await until(page, id, (x) => x.tiles === 4);
  c("preset_768_click_sets_inputs", v.tile_size === 768 && v.overlap === 96, v);
  c("preset_768_shown", s?.pressed.join() === "768" && s.tiles === 4, s);

  // an input's arrow
  await clickIncrement(page, renderer, id, "overlap");
  await page.waitForTimeout(300);
  v = await values(page, id);
  s = await until(page, id, (x) => x.pressed.length === 0);
  c("overlap_arrow_steps_value", v.tile_size === 768 && v.overlap === 112, v);
  c("overlap_arrow_redraws", s?.pressed.length === 0 && s.fix === null, s);

  // a value that does not fit: shown, fixed by a click on the fix line, and the fix stays fixed
  await typeValue(page, id, "overlap", 496); // on the input's step of 16, as its editor allows
  const typed = (await values(page, id)).overlap;
  s = await until(page, id, (x) => x.fix !== null);
  c("bad_overlap_shown", typed === 496 && s?.fix?.includes(`overlap ${typed} → 368 (< tile/2)`), { typed, s });
  await nodeShot(page, renderer, id, join(ARTIFACTS, `widget_${FRONTEND}_${renderer}_fix.png`));
  await page.locator(`${widgetSel(id)} button.vst-fix`).click();
  await page.waitForTimeout(600);
  v = await values(page, id);
  s = await until(page, id, (x) => x.fix === null);
  c("fix_line_click_fixes", v.overlap === 368 && v.tile_size === 768, v);
  c("fix_does_not_loop", s?.fix === null, s);

  // back to the preset, then the Run button: the prompt carries the values
  await page.locator(`${widgetSel(id)} button[data-preset="768"]`).click();
  await until(page, id, (x) => x.pressed.join() === "768");
  await nodeShot(page, renderer, id, join(ARTIFACTS, `widget_${FRONTEND}_${renderer}.png`));
  const promptReq = page.waitForRequest((r) => /\/prompt$/.test(r.url()) && r.method() === "POST", { timeout: 30000 });
  await page.locator('[data-testid="queue-button"]').first().click();
  const req = await promptReq;
  const body = req.postDataJSON();
  const resp = await req.response();
  const inputs = body.prompt[String(id)]?.inputs ?? {};
  c("prompt_carries_values", inputs.tiling === "auto" && inputs.tile_size === 768 && inputs.overlap === 96
    && !("vae_suite_tiles" in inputs), inputs);
  const answer = await resp.json();
  c("prompt_accepted", resp.status() === 200 && !!answer.prompt_id, { status: resp.status(), answer });
  facts[`${renderer}_prompt_id`] = answer.prompt_id;
  const wfNode = body.extra_data?.extra_pnginfo?.workflow?.nodes?.find((n) => String(n.id) === String(id));
  c("workflow_widgets_values", JSON.stringify(wfNode?.widgets_values) === JSON.stringify(["auto", 768, 96, 4]),  // + temporal_size's default
    wfNode?.widgets_values);

  // a finished run: the widget shows the run's own size and VAE (the test VAE has one level: f1, so the
  // 192x128 latent decodes to 192x128 px), also with the latent unlinked
  const run = await page.waitForFunction((nid) => window.app.graph.getNodeById(nid).__vaeSuiteLastRun, id,
    { timeout: 120000 }).then((h) => h.jsonValue(), () => null);
  await page.evaluate((i) => window.app.graph.getNodeById(i.dec).disconnectInput(0), ids);
  s = await until(page, id, (x) => x.lines[0]?.startsWith(`${run?.width}×${run?.height} px`));
  c("finished_run_redraws", run?.width === 192 && s?.lines[0] === "192×128 px · kl f1", { run, s });
  await page.evaluate((i) => window.app.graph.getNodeById(i.latent).connect(0, window.app.graph.getNodeById(i.dec), 0), ids);

  // a loaded workflow keeps the values and is drawn
  const wf = await page.evaluate(() => window.app.graph.serialize());
  await page.evaluate(async (w) => { window.app.graph.clear(); await window.app.loadGraphData(w); }, wf);
  await page.waitForTimeout(500);
  v = await values(page, id);
  s = await until(page, id, (x) => x.tiles === 4);
  c("loaded_workflow_keeps_values", v.tile_size === 768 && v.overlap === 96 && v.hasWidget, v);
  c("loaded_workflow_drawn", s?.visible && s.tiles === 4 && s.pressed.join() === "768", s);

  const ours = errors.filter((e) => PACK.test(e.text) || PACK.test(e.url));
  c("no_console_error_from_pack", ours.length === 0, ours);
  const oursHttp = failed.filter(([, u]) => PACK.test(u));
  c("no_failed_request_from_pack", oursHttp.length === 0, oursHttp);
  facts[`${renderer}_console_errors`] = errors.map((e) => e.text.slice(0, 160));
  await ctx.close();
  return wf;
}

async function main() {
  mkdirSync(ARTIFACTS, { recursive: true });
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
      "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run"],
  });
  try {
    let wf = null;
    for (const [i, r] of RENDERERS.entries()) wf = await runRenderer(browser, r, i);
    // without our JS a saved workflow keeps its values and queues the same prompt
    await setSetting("Comfy.VueNodes.Enabled", false);
    const { ctx, page } = await openPage(browser, { blockPackJs: true });
    await page.evaluate(async (w) => { window.app.graph.clear(); await window.app.loadGraphData(w); }, wf);
    const dec = wf.nodes.find((n) => n.type === "VAESuiteDecodeTiled").id;
    const bv = await values(page, dec);
    check("without_js_values_kept", bv.tile_size === 768 && bv.overlap === 96 && bv.tiling === "auto"
      && !bv.hasWidget, bv);
    const prompt = await page.evaluate(async () => (await window.app.graphToPrompt()).output);
    const bi = prompt[String(dec)]?.inputs ?? {};
    check("without_js_prompt_same", bi.tile_size === 768 && bi.overlap === 96, bi);
    await ctx.close();
  } finally {
    await browser.close();
  }
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
