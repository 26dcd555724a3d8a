#!/usr/bin/env node
// Real-browser check of the dai-cloud status page.
//
// usage: node tests/browser/cloud_page.mjs --url http://127.0.0.1:PORT/ --model NAME --version N
//          --devices a,b,c --screenshot PATH [--timeout-ms 15000] [--chromium /usr/bin/chromium]
//
// Loads the page in headless Chromium (playwright-core, Debian's chromium), waits until the models
// table shows NAME at version N, every listed device is "online" in the devices table, and the
// recent-updates table has rows; then takes a screenshot and prints a one-line JSON summary. Exit 0
// only when every check passed and the page logged no console error or warning, threw no page error
// and made no failed or external request. Every wait is bounded.

import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { parseArgs } from 'node:util';

const fail = (msg) => {
  process.stderr.write(`cloud_page: ${msg}\n`);
  process.exit(1);
};
let opts;
try {
  ({ values: opts } = parseArgs({
    options: {
      url: { type: 'string' },
      model: { type: 'string' },
      version: { type: 'string' },
      devices: { type: 'string', default: '' },
      screenshot: { type: 'string' },
      'timeout-ms': { type: 'string', default: '15000' },
      chromium: { type: 'string', default: '/usr/bin/chromium' },
    },
    strict: true,
  }));
} catch (e) {
  fail(e.message);
}
for (const k of ['url', 'model', 'version', 'screenshot']) if (!opts[k]) fail(`--${k} is required`);
const pageUrl = new URL(opts.url);
const devices = opts.devices.split(',').map((s) => s.trim()).filter(Boolean);
const timeoutMs = Number(opts['timeout-ms']);
const watchdog = setTimeout(() => fail('watchdog: the run took too long'), timeoutMs + 60_000);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const problems = [];
const summary = { ok: false, url: pageUrl.href, snapshot: null, screenshot: null, problems };

function inspect({ model, version, devices }) {
  const text = (el) => (el ? el.textContent.replace(/\s+/g, ' ').trim() : null);
  const issues = [];
  const row = document.querySelector(`#models tr[data-model="${model}"]`);
  const current = row ? text(row.querySelector('td.current')) : null;
  if (current !== version) issues.push(`model ${model}: current shows ${JSON.stringify(current)}, expected ${version}`);
  const states = {};
  for (const d of devices) {
    const tr = document.querySelector(`#devices tr[data-device="${d}"]`);
    states[d] = tr ? text(tr.children[1]) : null;
    if (states[d] !== 'online') issues.push(`device ${d}: state ${JSON.stringify(states[d])}, expected "online"`);
  }
  const recent = document.querySelectorAll('#recent tbody tr').length;
  if (recent === 0) issues.push('no rows in #recent');
  const error = text(document.getElementById('error'));
  if (error) issues.push(`error banner: ${error}`);
  return { current, states, recent, summary: text(document.getElementById('summary')), issues };
}

let context = null;
const userDataDir = mkdtempSync(join(tmpdir(), 'dai-cloud-page-'));
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
    snap = await page.evaluate(inspect, { model: opts.model, version: opts.version, devices });
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
  process.stderr.write('cloud_page: FAILED\n' + problems.map((p) => `  - ${p}\n`).join(''));
  process.exit(1);
}
process.stderr.write('cloud_page: OK\n');
