// Drives ComfyUI's web UI in headless Chromium for tests/test_browser.py.
//
//   node tests/browser_driver.mjs < job.json > result.json
//
// job: {url, chromium, playwright (path of the playwright-core package), out (folder for
//       screenshots), viewport: {width, height}, search: [queries], templates: {pack, names: [...]},
//       runs: [{name, widgets: {nodeId: {widget: value}}}], timeout_ms}
// First the node search as a user opens it (double-click on an empty canvas, type): the first
// results' names per query. For every template: fetch it the way the UI's template browser
// does, app.loadGraphData it, and report the view the UI restored (scale, offset, the zoom below
// which it stops drawing text), the groups, combo values missing from their lists, the nodes
// the UI knows (type, has_errors, registered), the ones inside the visible canvas after fitting
// the view, any dialog shown, the graph as the UI serializes it and the API prompt the UI would
// queue (app.graphToPrompt). Then each of `runs`: load it, set the given widget values, queue it
// from the page with app.queuePrompt and wait for the outcome; the output images are loaded in
// the page (<img>) to get their real sizes, and every node's box and group are taken again once
// the UI has laid out the previews it received (screenshot "<name> after a run.png", at the
// workflow's saved view). Everything goes to stdout as one JSON object; progress lines go to stderr.
import { createRequire } from 'node:module';
import fs from 'node:fs';
import path from 'node:path';

const job = JSON.parse(fs.readFileSync(0, 'utf8'));
const require = createRequire(import.meta.url);
const { chromium } = require(job.playwright);
const log = (...a) => console.error('[browser]', ...a);
const t0 = Date.now();
const result = { templates: {}, runs: {}, search: {}, console_errors: [], not_found: [], timings: {} };

const browser = await chromium.launch({
  executablePath: job.chromium,
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
});
result.timings.launch_s = (Date.now() - t0) / 1000;
try {
  const context = await browser.newContext({ viewport: job.viewport || { width: 1600, height: 1000 } });
  await context.addInitScript(() => { localStorage.setItem('vueNodesBannerDismissed', 'true'); });
  const page = await context.newPage();
  page.on('console', (m) => { if (m.type() === 'error') result.console_errors.push(m.text()); });
  page.on('pageerror', (e) => result.console_errors.push(`pageerror: ${e.message}`));
  page.on('response', (r) => { if (r.status() === 404) result.not_found.push(r.url()); });

  await page.goto(job.url, { waitUntil: 'domcontentloaded' });
  await page.waitForFunction(() => window.app && window.app.graph && window.app.canvas && window.LiteGraph &&
    Object.keys(window.LiteGraph.registered_node_types).length > 50 &&
    window.app.extensionManager?.workflow?.activeWorkflow, null, { timeout: 90000 });
  result.timings.page_ready_s = (Date.now() - t0) / 1000;
  log(`page ready after ${result.timings.page_ready_s} s`);

  result.template_index = await page.evaluate(async () => (await fetch('/api/workflow_templates')).json());

  // Node search: on an empty graph, double-click the canvas (the search box opens), type.
  if (job.search?.length) {
    await page.keyboard.press('Escape');  // any dialog the first page load opened
    await page.evaluate(() => { window.app.graph.clear(); window.app.canvas.setDirty(true, true); });
    await page.waitForTimeout(500);
    const input = page.locator('.comfy-vue-node-search-container input').first();
    for (const q of job.search) {
      for (let attempt = 0; ; attempt++) {
        try {
          await page.mouse.dblclick(job.viewport ? job.viewport.width / 2 : 800, job.viewport ? job.viewport.height / 2 : 500);
          await input.waitFor({ timeout: 5000 });
          await input.fill(q, { timeout: 5000 });
          await page.waitForSelector('li.p-autocomplete-option', { timeout: 10000 });
          await page.waitForTimeout(600);  // the list settles (the search box debounces typing)
          result.search[q] = await page.evaluate(() => [...document.querySelectorAll('li.p-autocomplete-option')]
            .slice(0, 10).map((e) => e.getAttribute('aria-label')));
          break;
        } catch (e) {
          if (attempt >= 2) {
            await page.screenshot({ path: path.join(job.out, 'search box did not open.png') });
            throw e;
          }
        } finally {
          await page.keyboard.press('Escape');
          await input.waitFor({ state: 'hidden', timeout: 5000 }).catch(() => {});
        }
      }
    }
    log(`search: ${job.search.length} queries`);
  }

  for (const name of job.templates.names) {
    const t1 = Date.now();
    const r = await page.evaluate(async ({ pack, name }) => {
      const app = window.app, LG = window.LiteGraph;
      const res = await fetch(`/api/workflow_templates/${encodeURIComponent(pack)}/${encodeURIComponent(name)}.json`);
      if (!res.ok) return { fetch_status: res.status };
      // the thumbnail the template browser shows beside it (its getTemplateThumbnailUrl)
      const thumb = await fetch(`/api/workflow_templates/${encodeURIComponent(pack)}/${encodeURIComponent(name)}.jpg`);
      const thumb_type = thumb.headers.get('content-type');
      const json = await res.json();
      await app.loadGraphData(json, true, true, name);
      await new Promise((ok) => setTimeout(ok, 300));
      const canvas = app.canvas;
      // The view the UI restored from the file (extra.ds), as the user first sees it.
      const view = { scale: canvas.ds.scale, offset: Array.from(canvas.ds.offset), low_quality: !!canvas.low_quality,
                     lod_scale: canvas._lowQualityZoomThreshold ?? null,
                     canvas: [canvas.canvas.width / (window.devicePixelRatio || 1),
                              canvas.canvas.height / (window.devicePixelRatio || 1)] };
      const groups = (app.graph.groups || app.graph._groups || []).map((g) => ({ title: g.title,
        bounding: Array.from(g._bounding || g.bounding) }));
      // combo values (files) the UI does not find in the server's lists
      const missing_values = [];
      for (const n of app.graph.nodes) {
        for (const w of n.widgets || []) {
          const values = w.options?.values;
          if (w.type === 'combo' && Array.isArray(values) && !values.includes(w.value)) {
            missing_values.push({ id: n.id, type: n.type, widget: w.name, value: w.value });
          }
        }
      }
      // Fit everything into view, then check each node's box against the visible area.
      const nodes = app.graph.nodes;
      let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
      for (const n of nodes) {
        x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - LG.NODE_TITLE_HEIGHT);
        x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
      }
      const w = canvas.canvas.width, h = canvas.canvas.height;
      // margins: the sidebar (left) and the tab bar (top) lie over the canvas element
      const scale = Math.min((w - 120) / (x1 - x0), (h - 120) / (y1 - y0));
      canvas.ds.scale = scale;
      canvas.ds.offset = [-x0 + 90 / scale, -y0 + 80 / scale];
      canvas.setDirty(true, true);
      canvas.draw(true, true);
      const visible = nodes.filter((n) => {
        const [sx, sy] = canvas.ds.convertOffsetToCanvas([n.pos[0], n.pos[1]]);
        const [ex, ey] = canvas.ds.convertOffsetToCanvas([n.pos[0] + n.size[0], n.pos[1] + n.size[1]]);
        return sx >= -1 && sy >= -1 && ex <= w + 1 && ey <= h + 1;
      }).map((n) => n.id);
      const dialogs = [...document.querySelectorAll('.p-dialog')].map((d) => ({
        label: d.getAttribute('aria-labelledby'), text: d.innerText.slice(0, 300) }));
      const prompt = await app.graphToPrompt();
      return {
        view, groups, missing_values,
        boxes: nodes.map((n) => ({ id: n.id, type: n.type, x: n.pos[0], y: n.pos[1] - LG.NODE_TITLE_HEIGHT,
                                   w: n.size[0], h: n.size[1] + LG.NODE_TITLE_HEIGHT })),
        thumb_status: thumb.status, thumb_type,
        fetch_status: res.status,
        file_node_ids: json.nodes.map((n) => n.id),
        nodes: nodes.map((n) => ({ id: n.id, type: n.type, has_errors: !!n.has_errors,
                                   registered: n.type in LG.registered_node_types })),
        visible,
        canvas_graph_is_app_graph: canvas.graph === app.graph,
        dialogs,
        serialized: app.graph.serialize(),
        api: prompt.output,
      };
    }, { pack: job.templates.pack, name });
    r.seconds = (Date.now() - t1) / 1000;
    result.templates[name] = r;
    await page.screenshot({ path: path.join(job.out, `${name}.png`) });
    // Close any dialog before the next load.
    await page.keyboard.press('Escape');
    log(`${name}: ${r.nodes ? r.nodes.length : 0} nodes, ${r.dialogs ? r.dialogs.length : 0} dialogs, ${r.seconds} s`);
  }

  for (const run of job.runs || []) {
    const t2 = Date.now();
    const q = await page.evaluate(async ({ pack, name, widgets, timeout }) => {
      const app = window.app, api = app.api;
      const json = await (await fetch(`/api/workflow_templates/${encodeURIComponent(pack)}/${encodeURIComponent(name)}.json`)).json();
      await app.loadGraphData(json, true, true, name);
      const changed = [];
      for (const [id, values] of Object.entries(widgets)) {
        const node = app.graph.getNodeById(Number(id));
        for (const [wname, value] of Object.entries(values)) {
          const w = node.widgets.find((x) => x.name === wname);
          if (!w) throw new Error(`node ${id} has no widget ${wname}`);
          w.value = value;
          w.callback?.(value);
          changed.push(`${id}.${wname}=${value}`);
        }
      }
      // Start from an idle server (a run that timed out before is let finish), then take only
      // the events of this prompt: the first one started after queueing.
      const t0 = Date.now();
      for (;;) {
        const queue = await (await fetch('/api/queue')).json();
        if (!queue.queue_running.length && !queue.queue_pending.length) break;
        if (Date.now() - t0 > timeout) return { outcome: 'server busy', changed, images: [], boxes: [], groups: [] };
        await new Promise((ok) => setTimeout(ok, 500));
      }
      const events = [];
      const handlers = [];
      let ours = null;
      const done = new Promise((resolve) => {
        const timer = setTimeout(() => resolve('timeout'), timeout);
        const on = (type) => {
          const h = (e) => {
            const id = e.detail?.prompt_id;
            if (type === 'execution_start' && ours === null) ours = id;
            if (id !== undefined && id !== ours) return;
            events.push({ type, detail: e.detail });
            if (!['executed', 'execution_start'].includes(type)) { clearTimeout(timer); resolve(type); }
          };
          api.addEventListener(type, h);
          handlers.push([type, h]);
        };
        on('execution_start'); on('executed'); on('execution_success'); on('execution_error');
        on('execution_interrupted');
      });
      await app.queuePrompt(0, 1);
      const outcome = await done;
      for (const [type, h] of handlers) api.removeEventListener(type, h);
      const images = events.filter((e) => e.type === 'executed')
        .flatMap((e) => (e.detail.output?.images || []).map((im) => ({ node: e.detail.node, ...im })));
      // Show each image as the UI serves it and measure it.
      const shown = [];
      for (const im of images) {
        const url = `/api/view?filename=${encodeURIComponent(im.filename)}&subfolder=${encodeURIComponent(im.subfolder || '')}&type=${im.type}`;
        const img = document.createElement('img');
        img.className = 'linfusion-test-output';
        img.style = `position:fixed;right:${8 + 130 * shown.length}px;bottom:8px;z-index:99999;max-width:120px;border:3px solid lime`;
        await new Promise((ok, bad) => { img.onload = ok; img.onerror = () => bad(new Error(`cannot load ${url}`)); img.src = url; document.body.appendChild(img); });
        shown.push({ ...im, natural: [img.naturalWidth, img.naturalHeight] });
      }
      const prompt_id = events.find((e) => e.detail?.prompt_id)?.detail.prompt_id;
      // Let the UI lay out the previews it received, then take every node's box and group, at
      // the workflow's saved view (what the user sees after the run).
      await new Promise((ok) => setTimeout(ok, 500));
      const ds = json.extra?.ds;
      if (ds) { app.canvas.ds.scale = ds.scale; app.canvas.ds.offset = [...ds.offset]; }
      app.canvas.setDirty(true, true);
      app.canvas.draw(true, true);
      const LG = window.LiteGraph;
      const boxes = app.graph.nodes.map((n) => ({ id: n.id, type: n.type, x: n.pos[0], y: n.pos[1] - LG.NODE_TITLE_HEIGHT,
                                                 w: n.size[0], h: n.size[1] + LG.NODE_TITLE_HEIGHT }));
      const groups = (app.graph.groups || app.graph._groups || []).map((g) => ({ title: g.title,
        bounding: Array.from(g._bounding || g.bounding) }));
      return { outcome, changed, images: shown, prompt_id, boxes, groups,
               error: events.find((e) => e.type === 'execution_error')?.detail };
    }, { pack: job.templates.pack, name: run.name, widgets: run.widgets, timeout: job.timeout_ms || 480000 });
    q.seconds = (Date.now() - t2) / 1000;
    if (q.images.length) {
      await page.locator('.linfusion-test-output').first().waitFor({ state: 'visible', timeout: 10000 });
    }
    await page.waitForTimeout(300);
    await page.screenshot({ path: path.join(job.out, `${run.name} after a run.png`) });
    await page.evaluate(() => document.querySelectorAll('.linfusion-test-output').forEach((e) => e.remove()));
    result.runs[run.name] = q;
    log(`${run.name}: ${q.outcome}, ${q.images.length} image(s), ${q.seconds} s`);
  }
} finally {
  await browser.close();
  result.timings.total_s = (Date.now() - t0) / 1000;
  process.stdout.write(JSON.stringify(result));
}
