// The shared part of the single-page Chromium checks (cloud_page.mjs,
// sensors_page.mjs): arguments, a watchdog, headless Chromium through
// playwright-core, every console error or warning, page error, failed or
// external request and HTTP error collected, polling the page's own
// `inspect(arg)` until it reports no issue (bounded), a screenshot, and a
// one-line JSON summary on stdout. Exit 0 only when nothing was found.

import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { parseArgs } from 'node:util';

export async function runPageCheck({ name, options, required, inspect, inspectArg }) {
  const fail = (msg) => {
    process.stderr.write(`${name}: ${msg}\n`);
    process.exit(1);
  };
  let opts;
  try {
    ({ values: opts } = parseArgs({
      options: {
        url: { type: 'string' },
        screenshot: { type: 'string' },
        'timeout-ms': { type: 'string', default: '15000' },
        chromium: { type: 'string', default: '/usr/bin/chromium' },
        ...options,
      },
      strict: true,
    }));
  } catch (e) {
    fail(e.message);
  }
  for (const k of ['url', 'screenshot', ...required]) if (!opts[k]) fail(`--${k} is required`);
  const pageUrl = new URL(opts.url);
  const timeoutMs = Number(opts['timeout-ms']);
  const watchdog = setTimeout(() => fail('watchdog: the run took too long'), timeoutMs + 60_000);
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  const problems = [];
  const summary = { ok: false, url: pageUrl.href, snapshot: null, screenshot: null, problems };
  let context = null;
  const userDataDir = mkdtempSync(join(tmpdir(), `dai-${name}-`));
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
      snap = await page.evaluate(inspect, inspectArg(opts));
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
    process.stderr.write(`${name}: FAILED\n` + problems.map((p) => `  - ${p}\n`).join(''));
    process.exit(1);
  }
  process.stderr.write(`${name}: OK\n`);
}
