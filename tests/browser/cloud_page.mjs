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


import { runPageCheck } from './page_check.mjs';

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

await runPageCheck({
  name: 'cloud_page',
  options: {
    model: { type: 'string' },
    version: { type: 'string' },
    devices: { type: 'string', default: '' },
  },
  required: ['model', 'version'],
  inspect,
  inspectArg: (o) => ({ model: o.model, version: o.version, devices: o.devices.split(',').map((s) => s.trim()).filter(Boolean) }),
});
