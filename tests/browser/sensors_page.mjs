#!/usr/bin/env node
// Real-browser check of the sensors card on the dai-edge status page.
//
// usage: node tests/browser/sensors_page.mjs --url http://127.0.0.1:PORT/ --sensor NAME --label L
//          --screenshot PATH [--timeout-ms 15000] [--chromium /usr/bin/chromium]
//
// Loads the edge status page in headless Chromium (playwright-core, Debian's chromium), waits until
// the sensors card shows NAME healthy ("ok"), marked SIMULATED, with a chart of recent values (at
// least one polyline with points) and a latest prediction starting with L; then takes a screenshot
// and prints a one-line JSON summary. Exit 0 only when every check passed and the page logged no
// console error or warning, threw no page error and made no failed or external request.

import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { parseArgs } from 'node:util';

const fail = (msg) => {
  process.stderr.write(`sensors_page: ${msg}\n`);
  process.exit(1);
};
let opts;
try {
  ({ values: opts } = parseArgs({
    options: {
      url: { type: 'string' },
      sensor: { type: 'string' },
      label: { type: 'string' },
      screenshot: { type: 'string' },
      'timeout-ms': { type: 'string', default: '15000' },
      chromium: { type: 'string', default: '/usr/bin/chromium' },
    },
    strict: true,
  }));
} catch (e) {
  fail(e.message);
}
for (const k of ['url', 'sensor', 'label', 'screenshot']) if (!opts[k]) fail(`--${k} is required`);
const pageUrl = new URL(opts.url);
const timeoutMs = Number(opts['timeout-ms']);
const watchdog = setTimeout(() => fail('watchdog: the run took too long'), timeoutMs + 60_000);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const problems = [];
const summary = { ok: false, url: pageUrl.href, snapshot: null, screenshot: null, problems };

function inspect({ sensor, label }) {
  const text = (el) => (el ? el.textContent.replace(/\s+/g, ' ').trim() : null);
  const issues = [];
  const card = document.getElementById('sensors-card');
  if (!card || card.hidden) issues.push('sensors card hidden');
  const row = document.querySelector(`#sensors tr[data-sensor="${sensor}"]`);
  if (!row) return { issues: [...issues, `no row for sensor ${sensor}`] };
  const health = text(row.querySelector('[data-field="health"]'));
  if (health !== 'ok') issues.push(`health ${JSON.stringify(health)}, expected "ok"`);
  const simulated = text(row.querySelector('[data-field="simulated"]'));
  if (simulated !== 'SIMULATED') issues.push('not marked SIMULATED');
  const lines = Array.from(row.querySelectorAll('[data-field="chart"] polyline'));
  const points = lines.map((l) => (l.getAttribute('points') || '').split(' ').filter(Boolean).length);
  if (!points.some((n) => n > 10)) issues.push(`chart has no data: ${JSON.stringify(points)}`);
  const preds = Array.from(row.querySelectorAll('[data-field="predictions"] .line2')).map(text);
  if (!preds.length || !preds[0].startsWith(label)) issues.push(`latest prediction ${JSON.stringify(preds[0])}, expected ${label}`);
  return { health, simulated, points, preds, issues };
}

let context = null;
const userDataDir = mkdtempSync(join(tmpdir(), 'dai-sensors-page-'));
const seenProblems = [];
try {
  const { chromium } = await import('playwright-core');
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: opts.chromium,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking'],
    viewport: { width: 1280, height: 900 },
    timeout: 20_000,
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.on('console', (m) => {
    if (m.type() === 'error' || m.type() === 'warning') seenProblems.push(`console ${m.type()}: ${m.text()}`);
  });
  page.on('pageerror', (e) => seenProblems.push(`page error: ${e}`));
  page.on('requestfailed', (r) => seenProblems.push(`request failed: ${r.url()}`));
  page.on('request', (r) => {
    const u = r.url();
    if (!u.startsWith('data:') && new URL(u).origin !== pageUrl.origin) seenProblems.push(`external request: ${u}`);
  });
  page.on('response', (r) => {
    if (r.status() >= 400) seenProblems.push(`HTTP ${r.status()}: ${r.url()}`);
  });
  const resp = await page.goto(pageUrl.href, { waitUntil: 'load', timeout: 20_000 });
  if (!resp || resp.status() !== 200) problems.push(`GET ${pageUrl.href}: ${resp ? resp.status() : 'no response'}`);
  const deadline = Date.now() + timeoutMs;
  let snap;
  for (;;) {
    snap = await page.evaluate(inspect, { sensor: opts.sensor, label: opts.label });
    if (snap.issues.length === 0 || Date.now() > deadline) break;
    await sleep(200);
  }
  summary.snapshot = snap;
  problems.push(...snap.issues);
  mkdirSync(dirname(resolve(opts.screenshot)), { recursive: true });
  await page.screenshot({ path: resolve(opts.screenshot), fullPage: true });
  summary.screenshot = resolve(opts.screenshot);
  await sleep(200);
  problems.push(...seenProblems);
} catch (e) {
  problems.push(`unexpected: ${e && e.stack ? e.stack : e}`);
} finally {
  if (context) await Promise.race([context.close().catch(() => {}), sleep(5000)]);
  rmSync(userDataDir, { recursive: true, force: true });
}
clearTimeout(watchdog);
summary.ok = problems.length === 0;
process.stdout.write(JSON.stringify(summary) + '\n');
if (!summary.ok) {
  process.stderr.write('sensors_page: FAILED\n' + problems.map((p) => `  - ${p}\n`).join(''));
  process.exit(1);
}
process.stderr.write('sensors_page: OK\n');
