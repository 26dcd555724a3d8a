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


import { runPageCheck } from './page_check.mjs';

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

await runPageCheck({
  name: 'sensors_page',
  options: {
    sensor: { type: 'string' },
    label: { type: 'string' },
  },
  required: ['sensor', 'label'],
  inspect,
  inspectArg: (o) => ({ sensor: o.sensor, label: o.label }),
});
