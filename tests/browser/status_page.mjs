#!/usr/bin/env node
// Real-browser check of the DAI daemon status page.
//
// usage: node tests/browser/status_page.mjs --url http://127.0.0.1:PORT/ \
//          --expect-models a,b,c --screenshot PATH [--expect-training MODEL ...] [--timeout-ms 15000]
//          [--chromium /usr/bin/chromium] [--token TOKEN [--login]]
//
// Loads the page in headless Chromium (through playwright-core, no bundled browser), waits until
// every expected model is rendered ready with a numeric p95 and requests > 0 (and, for each
// --expect-training model, the on-device training card shows exactly one visible
// [data-training-model=MODEL] row whose [data-field="head_version"] has a value), then waits for one
// more successful poll (#last-update changes), takes a full-page screenshot and prints a one-line
// JSON summary on stdout. Exit status 0 only when every check passed and the page logged no console
// error or warning and threw no page error; 1 otherwise (including bad arguments). Every wait is
// bounded, and a watchdog ends the run if anything hangs.
//
// With --token (a daemon with http.auth_token_file): the page is opened as URL?token=TOKEN (the
// handoff), and the address bar must no longer show the token once the page has loaded, the tab's
// sessionStorage must hold it, and every poll must succeed. With --token --login: the page is
// opened without a token, must show its #login form after a 401 (the only HTTP errors allowed,
// before the login), takes TOKEN typed into #login-token, and must then pass the same checks.

import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { parseArgs } from 'node:util';

const CHROMIUM_ARGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

function usage(msg) {
  if (msg) process.stderr.write(`status_page: ${msg}\n`);
  process.stderr.write(
    'usage: node status_page.mjs --url URL --expect-models a,b,c --screenshot PATH ' +
      '[--expect-training MODEL (repeatable, or a,b)] [--timeout-ms 15000] [--chromium /usr/bin/chromium]\n',
  );
  process.exit(1);
}

let opts;
try {
  ({ values: opts } = parseArgs({
    options: {
      url: { type: 'string' },
      'expect-models': { type: 'string', default: '' },
      'expect-training': { type: 'string', multiple: true, default: [] },
      screenshot: { type: 'string' },
      'timeout-ms': { type: 'string', default: '15000' },
      chromium: { type: 'string', default: '/usr/bin/chromium' },
      token: { type: 'string' },
      login: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
    allowPositionals: false,
  }));
} catch (e) {
  usage(e.message);
}
if (opts.help) usage();
if (!opts.url) usage('--url is required');
if (!opts.screenshot) usage('--screenshot is required');
let pageUrl;
try {
  pageUrl = new URL(opts.url);
} catch {
  usage(`not a URL: ${opts.url}`);
}
const expected = opts['expect-models'].split(',').map((s) => s.trim()).filter(Boolean);
const expectedTraining = opts['expect-training']
  .flatMap((v) => v.split(','))
  .map((s) => s.trim())
  .filter(Boolean);
const readyTimeoutMs = Number(opts['timeout-ms']);
if (!Number.isFinite(readyTimeoutMs) || readyTimeoutMs <= 0) usage('--timeout-ms must be a positive number');
const screenshotPath = resolve(opts.screenshot);
const token = opts.token ?? null;
if (opts.login && !token) usage('--login needs --token');
// What the browser is pointed at: the page itself, or the page with the token handoff.
const openUrl = new URL(pageUrl.href);
if (token && !opts.login) openUrl.searchParams.set('token', token);
let loggedIn = !opts.login;

// Second-poll wait: the page polls every second, so a few seconds is plenty.
const LIVE_TIMEOUT_MS = 10_000;
const STEP_TIMEOUT_MS = 20_000; // launch, navigation, screenshot
const WATCHDOG_MS = readyTimeoutMs + LIVE_TIMEOUT_MS + 4 * STEP_TIMEOUT_MS;

const started = Date.now();
const failures = [];
const consoleProblems = [];
const pageErrors = [];
const badRequests = [];
const summary = {
  ok: false,
  url: pageUrl.href,
  expected_models: expected,
  expected_training: expectedTraining,
  models: {},
  training: {},
  extra_models: [],
  last_update: [],
  checks: {},
  console: consoleProblems,
  page_errors: pageErrors,
  bad_requests: badRequests,
  screenshot: null,
  elapsed_ms: 0,
  failures,
};

let context = null;
let userDataDir = null;

function finish(code) {
  summary.ok = code === 0;
  summary.elapsed_ms = Date.now() - started;
  process.stdout.write(JSON.stringify(summary) + '\n');
  if (code !== 0) {
    process.stderr.write('status_page: FAILED\n');
    for (const f of failures) process.stderr.write(`  - ${f}\n`);
  } else {
    const tr = expectedTraining.length ? `, ${expectedTraining.length} training` : '';
    process.stderr.write(`status_page: OK (${expected.length} models${tr}, ${summary.elapsed_ms} ms)\n`);
  }
  return code;
}

const watchdog = setTimeout(() => {
  failures.push(`watchdog: the whole run took longer than ${WATCHDOG_MS} ms`);
  finish(1);
  if (userDataDir) rmSync(userDataDir, { recursive: true, force: true });
  process.exit(1);
}, WATCHDOG_MS);

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Runs in the page: what the status page shows right now.
function inspectPage({ models: expectedNames, training: expectedTrainingNames }) {
  const text = (el) => (el ? el.textContent.replace(/\s+/g, ' ').trim() : null);
  const num = (cell) => {
    if (!cell) return null;
    const raw = cell.getAttribute('data-value');
    const v = raw !== null && raw !== '' ? Number(raw) : Number.parseFloat(cell.textContent.replace(/,/g, ''));
    return Number.isFinite(v) ? v : null;
  };
  const lu = document.getElementById('last-update');
  const banner = document.getElementById('conn-banner');
  const rows = Array.from(document.querySelectorAll('#models tr[data-model]'));
  const models = {};
  const counts = {};
  for (const tr of rows) {
    const name = tr.getAttribute('data-model');
    counts[name] = (counts[name] || 0) + 1;
    const cell = (f) => tr.querySelector(`[data-field="${f}"]`);
    models[name] = {
      version: text(cell('version')),
      state: text(cell('state')),
      p95: num(cell('p95')),
      p95_text: text(cell('p95')),
      requests: num(cell('requests')),
    };
  }
  const problems = [];
  if (!document.getElementById('models')) problems.push('no #models table');
  if (!lu) problems.push('no #last-update element');
  else if (!text(lu)) problems.push('#last-update is empty (no successful poll yet)');
  for (const name of expectedNames) {
    const m = models[name];
    if (!m) {
      problems.push(`model ${name}: no row tr[data-model] in #models`);
      continue;
    }
    if (counts[name] !== 1) problems.push(`model ${name}: ${counts[name]} rows, expected 1`);
    if (m.state !== 'ready') problems.push(`model ${name}: state is ${JSON.stringify(m.state)}, expected "ready"`);
    if (m.p95 === null) problems.push(`model ${name}: p95 is not numeric (${JSON.stringify(m.p95_text)})`);
    if (!(m.requests > 0)) problems.push(`model ${name}: requests is ${JSON.stringify(m.requests)}, expected > 0`);
    if (!m.version) problems.push(`model ${name}: empty version cell`);
  }
  // On-device training card: one row per model, [data-training-model=NAME] with data-field cells.
  const training = {};
  const trainingCounts = {};
  for (const tr of document.querySelectorAll('[data-training-model]')) {
    const name = tr.getAttribute('data-training-model');
    trainingCounts[name] = (trainingCounts[name] || 0) + 1;
    const cell = (f) => tr.querySelector(`[data-field="${f}"]`);
    const chart = cell('loss_chart');
    const line = chart ? chart.querySelector('polyline') : null;
    training[name] = {
      visible: tr.getClientRects().length > 0,
      head_version: text(cell('head_version')),
      state: text(cell('state')),
      samples: text(cell('samples')),
      outbox: text(cell('outbox')),
      last_outcome: text(cell('last_outcome')),
      val: text(cell('val')),
      loss_chart: chart ? { polyline: !!line, points: line ? line.getAttribute('points') : null } : null,
    };
  }
  for (const name of expectedTrainingNames) {
    const t = training[name];
    if (!t) {
      problems.push(`training ${name}: no [data-training-model] element`);
      continue;
    }
    if (trainingCounts[name] !== 1) problems.push(`training ${name}: ${trainingCounts[name]} elements, expected 1`);
    if (!t.visible) problems.push(`training ${name}: element is not visible`);
    // Empty or the page's placeholder dash means no head version was reported.
    if (!t.head_version || t.head_version === '\u2014') {
      problems.push(`training ${name}: [data-field="head_version"] shows ${JSON.stringify(t.head_version)}, expected a version`);
    }
  }
  if (banner && !banner.hidden) problems.push(`#conn-banner is shown: ${text(banner)}`);
  const login = document.getElementById('login');
  if (login && !login.hidden) problems.push(`#login is shown: ${text(login)}`);
  const alerts = document.getElementById('alerts');
  return {
    lastUpdate: text(lu),
    seq: lu ? lu.getAttribute('data-seq') : null,
    bannerVisible: !!banner && !banner.hidden && banner.getClientRects().length > 0,
    models,
    training,
    problems,
    panels: {
      cache_hit_ratio: text(document.getElementById('cache-hit-ratio')),
      cpu: text(document.getElementById('cpu')),
      rss: text(document.getElementById('rss')),
      alerts: alerts ? alerts.querySelectorAll('li').length : null,
      alerts_none: alerts ? alerts.querySelectorAll('li.none').length : null,
      decisions: !!document.getElementById('decisions'),
      conn_banner: !!banner,
    },
  };
}

async function pollPage(page, predicate, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  let snap = null;
  for (;;) {
    snap = await page.evaluate(inspectPage, { models: expected, training: expectedTraining });
    if (predicate(snap)) return { ok: true, snap };
    if (Date.now() >= deadline) return { ok: false, snap };
    await sleep(150);
  }
}

async function main() {
  let chromium;
  try {
    ({ chromium } = await import('playwright-core'));
  } catch (e) {
    failures.push(`cannot load playwright-core (run npm ci in tests/browser): ${e.message}`);
    return 1;
  }

  userDataDir = mkdtempSync(join(tmpdir(), 'dai-status-page-'));
  try {
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: opts.chromium,
      headless: true,
      args: CHROMIUM_ARGS,
      viewport: { width: 1440, height: 900 },
      timeout: STEP_TIMEOUT_MS,
    });
  } catch (e) {
    failures.push(`cannot launch ${opts.chromium}: ${e.message.split('\n')[0]}`);
    return 1;
  }

  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(STEP_TIMEOUT_MS);
  let refusedBeforeLogin = 0;
  // With --login, Chromium reports each refused poll as a console error; those (no more than the
  // polls refused before the login, checked at the end) are the expected ones.
  let refusedLogged = 0;
  const isRefusedPoll = (text, url) =>
    opts.login && /status of 401\b/.test(text) && !!url && new URL(url).pathname === '/v1/status';
  page.on('console', (msg) => {
    const type = msg.type();
    if (type === 'error' || type === 'warning') {
      const loc = msg.location();
      const url = loc && loc.url ? loc.url : undefined;
      if (isRefusedPoll(msg.text(), url)) {
        refusedLogged += 1;
        return;
      }
      consoleProblems.push({ type, text: msg.text(), url });
    }
  });
  page.on('pageerror', (err) => pageErrors.push(String(err && err.stack ? err.stack : err)));
  // The page must be self-contained: anything fetched from another origin is a failure,
  // and so is any failed request or HTTP error on the page's own origin.
  page.on('request', (req) => {
    const u = req.url();
    if (u.startsWith('data:') || u.startsWith('about:')) return;
    try {
      if (new URL(u).origin !== pageUrl.origin) badRequests.push({ url: u, why: 'external resource' });
    } catch {
      badRequests.push({ url: u, why: 'unparsable URL' });
    }
  });
  page.on('requestfailed', (req) => badRequests.push({ url: req.url(), why: req.failure()?.errorText ?? 'failed' }));
  page.on('response', (res) => {
    if (res.status() === 401 && !loggedIn) refusedBeforeLogin += 1;
    else if (res.status() >= 400) badRequests.push({ url: res.url(), why: `HTTP ${res.status()}` });
  });

  let resp;
  try {
    resp = await page.goto(openUrl.href, { waitUntil: 'load', timeout: STEP_TIMEOUT_MS });
  } catch (e) {
    failures.push(`cannot load ${pageUrl.href}: ${e.message.split('\n')[0]}`);
    return 1;
  }
  if (token && !opts.login) {
    // The handoff: the token must be gone from the address bar and kept for this tab.
    const shown = page.url();
    const stored = await page.evaluate(() => sessionStorage.getItem('dai-edge-token'));
    summary.checks.address_bar = shown.replace(token, '<TOKEN>');
    summary.checks.token_in_session_storage = stored === token;
    if (shown.includes(token) || new URL(shown).searchParams.has('token')) {
      failures.push(`the address bar still shows the token: ${summary.checks.address_bar}`);
    }
    if (stored !== token) failures.push('sessionStorage does not hold the token after the handoff');
  }
  if (opts.login) {
    // No token yet: the first poll is refused and the page asks for one.
    try {
      await page.locator('#login').waitFor({ state: 'visible', timeout: readyTimeoutMs });
      summary.checks.login_shown = true;
      await page.fill('#login-token', token);
      loggedIn = true;
      await page.press('#login-token', 'Enter');
    } catch (e) {
      failures.push(`#login was not shown after a refused poll: ${e.message.split('\n')[0]}`);
      loggedIn = true;
    }
    summary.checks.refused_before_login = refusedBeforeLogin;
    if (refusedBeforeLogin === 0) failures.push('no poll was refused (401) before the login');
  }
  if (!resp) {
    failures.push(`no response for ${pageUrl.href}`);
  } else {
    const ct = resp.headers()['content-type'] || '';
    summary.checks.http_status = resp.status();
    summary.checks.content_type = ct;
    if (resp.status() !== 200) failures.push(`GET ${pageUrl.href} answered HTTP ${resp.status()}`);
    if (!/^text\/html\b/i.test(ct)) failures.push(`GET ${pageUrl.href} has Content-Type ${JSON.stringify(ct)}, expected text/html`);
  }

  // 1. First successful poll with every expected model ready, numeric p95, requests > 0, and every
  //    --expect-training model shown with a head version.
  const first = await pollPage(page, (s) => s.problems.length === 0, readyTimeoutMs);
  summary.models = first.snap.models;
  summary.training = first.snap.training;
  summary.extra_models = Object.keys(first.snap.models).filter((n) => !expected.includes(n));
  summary.last_update.push(first.snap.lastUpdate);
  summary.checks.ready_within_ms = first.ok ? Date.now() - started : null;
  if (!first.ok) {
    failures.push(`page not ready within ${readyTimeoutMs} ms:`);
    for (const p of first.snap.problems) failures.push(`  ${p}`);
  } else {
    // 2. One more successful poll: the figures are live, not a one-off render.
    const before = first.snap.lastUpdate;
    const beforeSeq = first.snap.seq;
    const live = await pollPage(
      page,
      (s) => !!s.lastUpdate && s.lastUpdate !== before && s.seq !== beforeSeq,
      LIVE_TIMEOUT_MS,
    );
    summary.last_update.push(live.snap.lastUpdate);
    summary.models = live.snap.models;
    summary.training = live.snap.training;
    summary.checks.live_update = live.ok;
    if (!live.ok) {
      failures.push(`#last-update did not change within ${LIVE_TIMEOUT_MS} ms (stayed ${JSON.stringify(before)})`);
    } else if (live.snap.problems.length) {
      failures.push('after the second poll:');
      for (const p of live.snap.problems) failures.push(`  ${p}`);
    }
    const panels = live.snap.panels;
    summary.checks.panels = panels;
    summary.checks.conn_banner_visible = live.snap.bannerVisible;
    if (live.snap.bannerVisible) failures.push('#conn-banner is visible although polls succeed');
    if (!panels.conn_banner) failures.push('no #conn-banner element');
    if (!panels.decisions) failures.push('no #decisions element');
    if (!panels.alerts) failures.push('#alerts has no li (expected alert items or one li.none)');
    for (const id of ['cache_hit_ratio', 'cpu', 'rss']) {
      if (!panels[id]) failures.push(`#${id.replace(/_/g, '-')} is missing or empty`);
    }
  }

  // Screenshot in every case that got this far: it is the first thing to look at when a check fails.
  try {
    mkdirSync(dirname(screenshotPath), { recursive: true });
    await page.screenshot({ path: screenshotPath, fullPage: true, timeout: STEP_TIMEOUT_MS });
    summary.screenshot = screenshotPath;
  } catch (e) {
    failures.push(`screenshot to ${screenshotPath} failed: ${e.message.split('\n')[0]}`);
  }

  // Let late console messages arrive before judging them.
  await sleep(200);
  if (refusedLogged > refusedBeforeLogin) {
    failures.push(`${refusedLogged} console errors for refused polls, but only ${refusedBeforeLogin} polls were refused`);
  }
  const late = [
    ...consoleProblems.map((c) => `console ${c.type}: ${c.text}${c.url ? ` (${c.url})` : ''}`),
    ...pageErrors.map((e) => `page error: ${e.split('\n')[0]}`),
    ...badRequests.map((r) => `request ${r.url}: ${r.why}`),
  ];
  // Freeze what is reported: closing the browser may abort an in-flight poll afterwards.
  summary.console = [...consoleProblems];
  summary.page_errors = [...pageErrors];
  summary.bad_requests = [...badRequests];
  const seen = new Map();
  for (const f of late) seen.set(f, (seen.get(f) || 0) + 1);
  for (const [f, n] of seen) failures.push(n > 1 ? `${f} (x${n})` : f);

  return failures.length ? 1 : 0;
}

let code = 1;
try {
  code = await main();
} catch (e) {
  failures.push(`unexpected error: ${e && e.stack ? e.stack : e}`);
  code = 1;
} finally {
  if (context) {
    await Promise.race([context.close().catch(() => {}), sleep(5000)]);
  }
  if (userDataDir) rmSync(userDataDir, { recursive: true, force: true });
}
clearTimeout(watchdog);
process.exit(finish(code));
