// directcall console. Everything a device or a caller sent is put in the page
// with textContent, never as HTML.
import { fetchEventSource } from '/console/vendor/fetch-event-source/index.js';

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = 'directcall-token';
const LOG_ROWS = 300;
const HISTORY = 300;
const FINAL_STATES = new Set(['answered', 'answered_late', 'bad_reply', 'offline', 'unavailable']);

let token = sessionStorage.getItem(TOKEN_KEY);
let stream = null;
let records = false;
let maxWait = 1;

// The test reads this: a Content-Security-Policy violation is a bug.
let violations = 0;
document.addEventListener('securitypolicyviolation', () => {
  violations += 1;
  document.body.dataset.cspViolations = String(violations);
});

function authHeaders() {
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function clock(ms) {
  const d = new Date(ms);
  const time = d.toLocaleTimeString([], { hour12: false });
  const millis = String(d.getMilliseconds()).padStart(3, '0');
  const today = new Date().toDateString() === d.toDateString();
  return today ? `${time}.${millis}` : `${d.toLocaleDateString()} ${time}`;
}

function outcomeClass(outcome) {
  if (outcome === 'ok') return 'o-ok';
  if (outcome === 'timeout') return 'o-timeout';
  if (outcome === 'offline' || outcome === 'unknown_device') return 'o-offline';
  if (outcome === 'accepted') return 'o-accepted';
  return 'o-error';
}

function setConn(text, state) {
  const c = $('conn');
  c.textContent = text;
  c.className = state || '';
}

// ---------------------------------------------------------------- access

class Unauthorized extends Error {}

function showLogin(message) {
  if (stream) stream.abort();
  if (groupCall && groupCall.running) groupCall.controller.abort();
  $('main').hidden = true;
  $('signout').hidden = true;
  $('login').hidden = false;
  $('login-error').textContent = message || '';
  setConn('token needed', 'down');
  $('token').focus();
}

$('login-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const value = $('token').value.trim();
  if (!value) {
    $('login-error').textContent = 'Enter a token.';
    return;
  }
  token = value;
  sessionStorage.setItem(TOKEN_KEY, token);
  $('token').value = '';
  start();
});

$('signout').addEventListener('click', () => {
  token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  showLogin('');
});

// ---------------------------------------------------------------- devices

// The gateway sends the device list a page at a time (`/v1/devices`), so
// an open page costs it the same with ten devices or 200,000: the page
// holds the pages it loaded, the counts, and the last call of recent
// targets.
const PAGE = 100;
const LAST_CALLS = 1000;
const COUNTS_EVERY_MS = 5000;

/** The loaded pages: target -> { online, since_ms }. */
const devices = new Map();
/** target -> { at_ms, method, outcome } of its latest call, the newest LAST_CALLS targets. */
const lastCalls = new Map();
let presence = false;
/** The next page's cursor (the last name loaded), or null when all are loaded. */
let next = null;
let counts = { total: 0, online: 0, offline: 0 };
// Answers to an older query are dropped.
let listing = 0;
let loadingMore = false;

function noteCall(target, last) {
  lastCalls.delete(target);
  lastCalls.set(target, last);
  if (lastCalls.size > LAST_CALLS) lastCalls.delete(lastCalls.keys().next().value);
}

/** The targets called lately (newest first), where they are news. */
function noteRecent(recent) {
  for (const r of [...recent].reverse()) {
    const known = lastCalls.get(r.target);
    if (!known || known.at_ms < r.at_ms) noteCall(r.target, { at_ms: r.at_ms, method: r.method, outcome: r.outcome });
  }
}

/** The search box as a glob: as typed if it has `*` or `?`, else anything containing it. */
function searchGlob() {
  const text = $('filter').value.trim();
  if (!text) return '';
  return /[*?]/.test(text) ? text : `*${text}*`;
}

/** The glob as the gateway reads it: `*` any run, `?` any one, either case. */
function globTest(glob) {
  if (!glob) return () => true;
  const body = glob.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '.*').replace(/\?/g, '.');
  const re = new RegExp(`^${body}$`, 'is');
  return (name) => re.test(name);
}

function query(after) {
  const params = new URLSearchParams({ limit: String(PAGE) });
  const glob = searchGlob();
  if (glob) params.set('match', glob);
  if ($('state-filter').value) params.set('state', $('state-filter').value);
  if (after) params.set('after', after);
  return params;
}

/** Whether a device with this name and state belongs in the list as queried. */
function wanted(target, online) {
  const state = $('state-filter').value;
  if (state && (state === 'online') !== online) return false;
  return globTest(searchGlob())(target);
}

/** Whether `target` sorts within the pages loaded (by code units, as the gateway sorts ASCII names). */
function inLoaded(target) {
  return next === null || target <= next;
}

function applyDevices(body, append) {
  if (!append) devices.clear();
  presence = body.presence;
  for (const d of body.devices) devices.set(d.target, { online: d.online, since_ms: d.since_ms });
  noteRecent(body.recent);
  next = body.next;
  counts = { total: body.total, online: body.online, offline: body.offline };
  renderDevices();
}

function deviceRow(target, d) {
  const tr = el('tr');
  tr.dataset.target = target;
  tr.append(el('td', target, 'target wrap'));
  const state = d.online === undefined ? 'unknown' : d.online ? 'online' : 'offline';
  tr.append(el('td', state, `state state-${state}`));
  const since = el('td', d.since_ms ? clock(d.since_ms) : '–', 'since');
  if (d.since_ms) since.title = new Date(d.since_ms).toISOString();
  tr.append(since);
  const last = el('td', '', 'last');
  const call = lastCalls.get(target);
  if (call) {
    last.append(el('span', `${clock(call.at_ms)} ${call.method} `));
    last.append(el('span', call.outcome, outcomeClass(call.outcome)));
  } else {
    last.textContent = '–';
  }
  tr.append(last);
  const action = el('td');
  const pick = el('button', 'Call', 'plain');
  pick.type = 'button';
  pick.setAttribute('aria-label', `Call a method on ${target}`);
  pick.addEventListener('click', () => {
    $('target').value = target;
    updateCurl();
    $('method').focus();
  });
  action.append(pick);
  tr.append(action);
  return tr;
}

function renderDevices() {
  $('presence-note').textContent = presence
    ? 'Online and offline come from presence records; the list updates live. Search by part of a name, or a glob (Car*7).'
    : 'This gateway tracks no presence (--presence off): only targets called lately are listed.';
  const shown = new Map(devices);
  // Targets called lately with no presence record, where the pages
  // loaded would have listed them.
  if (!$('state-filter').value) {
    const match = globTest(searchGlob());
    for (const target of lastCalls.keys()) {
      if (!shown.has(target) && match(target) && (!presence || inLoaded(target))) shown.set(target, {});
    }
  }
  const names = [...shown.keys()].sort();
  $('devices').tBodies[0].replaceChildren(...names.map((t) => deviceRow(t, shown.get(t))));
  $('devices-empty').hidden = shown.size > 0;
  $('devices-more').hidden = next === null;
  const n = (x) => x.toLocaleString('en');
  const filtered = searchGlob() || $('state-filter').value ? ' matching' : '';
  $('devices-count').textContent = presence
    ? `${n(devices.size)} of ${n(counts.total)}${filtered} shown (${n(counts.online)} online, ${n(counts.offline)} offline).`
    : '';
}

async function fetchPage(after) {
  const r = await fetch(`/v1/devices?${query(after)}`, { headers: authHeaders() });
  if (r.status === 401) throw new Unauthorized();
  if (!r.ok) throw new Error(`GET /v1/devices: HTTP ${r.status}`);
  return r.json();
}

/** Loads the first page of the list as queried now. */
async function refreshDevices() {
  const mine = ++listing;
  const body = await fetchPage(null);
  if (mine === listing) applyDevices(body, false);
}

async function moreDevices() {
  if (loadingMore || next === null) return;
  loadingMore = true;
  const mine = listing;
  try {
    const body = await fetchPage(next);
    if (mine === listing) applyDevices(body, true);
  } catch (err) {
    if (err instanceof Unauthorized) showLogin(token ? 'That token was refused.' : '');
  } finally {
    loadingMore = false;
  }
}

let searchTimer = null;
function searchSoon() {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => refreshDevices().catch(() => {}), 250);
}
$('filter').addEventListener('input', searchSoon);
$('state-filter').addEventListener('change', searchSoon);
$('devices-more').addEventListener('click', moreDevices);
// Scrolled to the end of the list: the next page.
new IntersectionObserver((entries) => {
  if (entries.some((e) => e.isIntersecting)) moreDevices();
}, { root: $('devices-scroll') }).observe($('devices-more'));

// The counts cover devices not loaded too: read again, at most every few
// seconds, after a change.
let countsTimer = null;
function recountSoon() {
  if (countsTimer) return;
  countsTimer = setTimeout(async () => {
    countsTimer = null;
    const mine = listing;
    try {
      const params = query(null);
      params.set('limit', '1');
      const r = await fetch(`/v1/devices?${params}`, { headers: authHeaders() });
      if (!r.ok || mine !== listing) return;
      const body = await r.json();
      counts = { total: body.total, online: body.online, offline: body.offline };
      renderDevices();
    } catch {
      // The next change tries again.
    }
  }, COUNTS_EVERY_MS);
}

// A fleet coming back after a broker restart sends thousands of changes:
// the list is drawn once per frame, and read again at most once a second.
let renderScheduled = false;
function renderSoon() {
  if (renderScheduled) return;
  renderScheduled = true;
  requestAnimationFrame(() => {
    renderScheduled = false;
    renderDevices();
  });
}

let refreshTimer = null;
function refreshSoon() {
  if (refreshTimer) return;
  refreshTimer = setTimeout(() => {
    refreshTimer = null;
    refreshDevices().catch(() => {});
  }, 1000);
}

function onDevice(d) {
  const known = devices.has(d.target);
  if (wanted(d.target, d.online) && (known || inLoaded(d.target))) {
    devices.set(d.target, { online: d.online, since_ms: d.since_ms });
  } else if (known) {
    devices.delete(d.target);
  }
  recountSoon();
  renderSoon();
}

// ---------------------------------------------------------------- live log

let paused = false;
const held = [];

function logRow(c) {
  const tr = el('tr');
  tr.dataset.target = c.target;
  tr.dataset.outcome = c.outcome;
  tr.append(el('td', clock(c.at_ms), 'mono'));
  tr.append(el('td', c.target, 'wrap'));
  tr.append(el('td', c.method, 'wrap'));
  const status = c.device_status !== undefined ? ` (${c.device_status})` : '';
  // A device's own error (404 for an unknown method) is coloured as one.
  const failed = c.device_status !== undefined && c.device_status >= 400;
  tr.append(el('td', `${c.outcome}${status}`, failed ? 'o-error' : outcomeClass(c.outcome)));
  tr.append(el('td', `${c.latency_ms.toFixed(1)} ms`, 'mono'));
  tr.append(el('td', c.credential));
  return tr;
}

function addCalls(calls) {
  const tbody = $('log').tBodies[0];
  for (const c of calls) tbody.prepend(logRow(c));
  while (tbody.rows.length > LOG_ROWS) tbody.deleteRow(-1);
  noteLog();
}

// Calls the gateway counted but did not send (more than a page shows came
// at once).
let notShown = 0;

function noteLog() {
  const shown = $('log').tBodies[0].rows.length;
  const skipped = notShown > 0 ? ` ${notShown} more too fast to list (see the charts).` : '';
  $('log-note').textContent = paused
    ? `Paused: ${held.length} new call(s) waiting.${skipped}`
    : `${shown} call(s) shown, newest first.${skipped}`;
}

// Calls are drawn once per frame, however many arrive: a busy gateway
// streams thousands a second.
const incoming = [];
let drawScheduled = false;

function onCall(c) {
  noteCall(c.target, { at_ms: c.at_ms, method: c.method, outcome: c.outcome });
  incoming.push(c);
  if (incoming.length > LOG_ROWS) incoming.shift();
  if (!drawScheduled) {
    drawScheduled = true;
    requestAnimationFrame(drawCalls);
  }
}

function drawCalls() {
  drawScheduled = false;
  const calls = incoming.splice(0);
  if (paused) {
    held.push(...calls);
    if (held.length > LOG_ROWS) held.splice(0, held.length - LOG_ROWS);
    noteLog();
  } else {
    addCalls(calls);
  }
  renderDevices();
}

$('pause').addEventListener('click', () => {
  paused = !paused;
  $('pause').setAttribute('aria-pressed', String(paused));
  $('pause').textContent = paused ? 'Resume' : 'Pause';
  if (!paused) addCalls(held.splice(0));
  noteLog();
});

// ---------------------------------------------------------------- charts

const RATE_SERIES = [
  ['ok', '#1a7f37'],
  ['timeout', '#bc4c00'],
  ['offline', '#6e7781'],
  ['accepted', '#0969da'],
  ['refused', '#cf222e'],
];
// Outcomes other than these four are refusals and errors (4xx, 503).
// A device never seen (strict presence) counts as offline.
const rateOf = (calls, name) => {
  if (name === 'offline') return (calls.offline || 0) + (calls.unknown_device || 0);
  if (name !== 'refused') return calls[name] || 0;
  return Object.entries(calls)
    .filter(([k]) => !['ok', 'timeout', 'offline', 'unknown_device', 'accepted'].includes(k))
    .reduce((sum, [, n]) => sum + n, 0);
};

const rateData = [[], ...RATE_SERIES.map(() => [])];
const latencyData = [[], [], [], []];
let rateChart = null;
let latencyChart = null;

function addSeconds(seconds) {
  for (const s of seconds) {
    rateData[0].push(s.t);
    RATE_SERIES.forEach(([name], i) => rateData[i + 1].push(rateOf(s.calls, name)));
    latencyData[0].push(s.t);
    latencyData[1].push(s.p50_ms ?? null);
    latencyData[2].push(s.p90_ms ?? null);
    latencyData[3].push(s.p99_ms ?? null);
  }
  for (const data of [rateData, latencyData]) {
    const extra = data[0].length - HISTORY;
    if (extra > 0) data.forEach((column) => column.splice(0, extra));
  }
  if (rateChart) rateChart.setData(rateData);
  if (latencyChart) latencyChart.setData(latencyData);
}

function chartWidth(id) {
  return Math.max(240, $(id).clientWidth || 400);
}

// Time of day on the x axis (uPlot's default adds overlapping date rows).
const timeAxis = {
  space: 70,
  values: (u, ticks) => ticks.map((t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false })),
};

function makeCharts() {
  if (rateChart || typeof uPlot === 'undefined') return;
  rateChart = new uPlot(
    {
      width: chartWidth('chart-rate'),
      height: 200,
      scales: { y: { range: (u, min, max) => [0, Math.max(1, max)] } },
      series: [{}, ...RATE_SERIES.map(([label, stroke]) => ({ label, stroke, width: 2 }))],
      axes: [timeAxis, { label: 'calls/s' }],
    },
    rateData,
    $('chart-rate'),
  );
  latencyChart = new uPlot(
    {
      width: chartWidth('chart-latency'),
      height: 200,
      scales: { y: { range: (u, min, max) => [0, Math.max(1, max ?? 1)] } },
      series: [
        {},
        { label: 'p50', stroke: '#0969da', width: 2, spanGaps: false },
        { label: 'p90', stroke: '#bc4c00', width: 2, spanGaps: false },
        { label: 'p99', stroke: '#cf222e', width: 2, spanGaps: false },
      ],
      axes: [timeAxis, { label: 'ms' }],
    },
    latencyData,
    $('chart-latency'),
  );
  new ResizeObserver(() => {
    rateChart.setSize({ width: chartWidth('chart-rate'), height: 200 });
    latencyChart.setSize({ width: chartWidth('chart-latency'), height: 200 });
  }).observe($('charts-panel'));
}

// ---------------------------------------------------------------- event stream

function openStream() {
  if (stream) stream.abort();
  const controller = new AbortController();
  stream = controller;
  fetchEventSource('/v1/events', {
    headers: authHeaders(),
    signal: controller.signal,
    openWhenHidden: true,
    async onopen(response) {
      if (response.status === 401) throw new Unauthorized();
      const type = response.headers.get('content-type') || '';
      if (!response.ok || !type.startsWith('text/event-stream')) {
        throw new Error(`GET /v1/events: HTTP ${response.status}`);
      }
      setConn('live', 'live');
    },
    onmessage(message) {
      const data = message.data ? JSON.parse(message.data) : null;
      switch (message.event) {
        case 'hello':
          records = data.records;
          maxWait = data.max_timeout_s;
          // The first page, unfiltered: the page asks for its own query.
          if (searchGlob() || $('state-filter').value) {
            noteRecent(data.recent);
            refreshDevices().catch(() => {});
          } else {
            listing += 1;
            applyDevices(data, false);
          }
          $('log').tBodies[0].replaceChildren();
          held.length = 0;
          incoming.length = 0;
          addCalls(data.calls);
          rateData.forEach((c) => c.splice(0));
          latencyData.forEach((c) => c.splice(0));
          addSeconds(data.seconds);
          break;
        case 'calls':
          data.calls.forEach(onCall);
          if (data.more > 0) notShown += data.more;
          break;
        case 'device':
          onDevice(data);
          break;
        case 'seconds':
          addSeconds(data);
          break;
        case 'lagged':
          // Presence changes were missed: the list as it is now.
          refreshSoon();
          break;
        default:
          break;
      }
    },
    onclose() {
      // The gateway ended the stream (it is stopping): try again.
      throw new Error('stream closed');
    },
    onerror(err) {
      if (err instanceof Unauthorized) {
        showLogin(token ? 'That token was refused.' : '');
        throw err;
      }
      setConn('reconnecting…', 'down');
      return 2000;
    },
  }).catch(() => {});
}

// ---------------------------------------------------------------- call form

let generation = 0;

function shellQuote(s) {
  return `'${String(s).replace(/'/g, "'\\''")}'`;
}

function callUrl(target, method) {
  return `/v1/targets/${encodeURIComponent(target)}/methods/${encodeURIComponent(method)}`;
}

/** The request body, or an error message. */
function readForm() {
  const target = $('target').value.trim();
  const method = $('method').value.trim();
  const timeout = Number($('timeout').value);
  const key = $('idem').value.trim();
  let request;
  let problem = null;
  try {
    request = JSON.parse($('request').value);
  } catch (e) {
    problem = `The request is not valid JSON: ${e.message}`;
  }
  return { target, method, timeout, key, request, problem };
}

function updateCurl() {
  const f = readForm();
  if (f.problem) {
    $('curl').value = '# fix the request JSON first';
    return;
  }
  const body = JSON.stringify({ request: f.request, timeout_ms: f.timeout || undefined });
  const parts = [
    'curl -sS -X POST',
    shellQuote(`${window.location.origin}${callUrl(f.target || 'TARGET', f.method || 'METHOD')}`),
    "-H 'content-type: application/json'",
  ];
  if (token) parts.push('-H "Authorization: Bearer $DIRECTCALL_TOKEN"');
  if (f.key) parts.push('-H', shellQuote(`Idempotency-Key: ${f.key}`));
  parts.push('-d', shellQuote(body));
  $('curl').value = parts.join(' ');
}

for (const id of ['target', 'method', 'request', 'timeout', 'idem']) {
  $(id).addEventListener('input', updateCurl);
}

$('copy-curl').addEventListener('click', async () => {
  try {
    await navigator.clipboard.writeText($('curl').value);
    $('copy-curl').textContent = 'Copied';
  } catch {
    $('curl').select();
    $('copy-curl').textContent = 'Selected: press Ctrl+C';
  }
  setTimeout(() => { $('copy-curl').textContent = 'Copy curl command'; }, 2000);
});

function invalid(id, message) {
  const field = $(id);
  field.setAttribute('aria-invalid', 'true');
  $('request-error').textContent = message;
  field.focus();
}

$('call-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  for (const id of ['target', 'method', 'request', 'timeout']) $(id).removeAttribute('aria-invalid');
  $('request-error').textContent = '';
  const f = readForm();
  if (!f.target) return invalid('target', 'Name a target.');
  if (!f.method) return invalid('method', 'Name a method.');
  if (f.problem) return invalid('request', f.problem);
  if (!Number.isInteger(f.timeout) || f.timeout < 1) return invalid('timeout', 'The timeout is a whole number of milliseconds, at least 1.');
  updateCurl();
  const mine = ++generation;
  const headers = { 'content-type': 'application/json', ...authHeaders() };
  if (f.key) headers['Idempotency-Key'] = f.key;
  $('send').disabled = true;
  $('result').hidden = true;
  const started = performance.now();
  let response;
  let body;
  try {
    response = await fetch(callUrl(f.target, f.method), {
      method: 'POST',
      headers,
      body: JSON.stringify({ request: f.request, timeout_ms: f.timeout }),
    });
    const text = await response.text();
    try {
      body = JSON.parse(text);
    } catch {
      body = text;
    }
  } catch (err) {
    $('send').disabled = false;
    $('request-error').textContent = `The gateway could not be reached: ${err.message}`;
    return;
  }
  const latency = performance.now() - started;
  $('send').disabled = false;
  if (response.status === 401) {
    showLogin(token ? 'That token was refused.' : '');
    return;
  }
  showResult(response.status, body, latency);
  if (records && body && typeof body.id === 'string') followRecord(body.id, mine);
});

function showResult(status, body, latency) {
  $('result').hidden = false;
  $('result-status').textContent = String(status);
  $('result-status').className = status === 200 ? 'o-ok' : status === 504 ? 'o-timeout' : 'o-error';
  $('result-outcome').textContent = body && body.result ? body.result : '–';
  $('result-outcome').className = body && body.result ? outcomeClass(body.result) : '';
  // The device's own verdict: 404 for a method it does not know.
  const device = body && body.status !== undefined ? body.status : null;
  $('result-device-status').textContent = device === null ? '–' : String(device);
  $('result-device-status').className = device === null ? '' : device < 400 ? 'o-ok' : 'o-error';
  $('result-latency').textContent = `${latency.toFixed(1)} ms`;
  $('result-id').textContent = body && body.id ? body.id : '–';
  const shown = body && typeof body === 'object' && 'response' in body ? body.response : body;
  $('response').textContent = typeof shown === 'string' ? shown : JSON.stringify(shown, null, 2);
  $('record').hidden = true;
  $('late').hidden = true;
  $('timeline').replaceChildren();
}

function renderRecord(r) {
  $('record').hidden = false;
  const items = [el('li', `sent at ${clock(r.sent_at_ms)}`)];
  if (r.delivered_at_ms) items.push(el('li', `delivered +${r.delivered_at_ms - r.sent_at_ms} ms`));
  if (r.state === 'answered') items.push(el('li', `answered +${r.answered_at_ms - r.sent_at_ms} ms (status ${r.status})`, 'o-ok'));
  if (r.state === 'timed_out') items.push(el('li', 'no answer by the deadline; waiting for a late one…', 'o-timeout'));
  if (r.state === 'answered_late') {
    items.push(el('li', 'no answer by the deadline', 'o-timeout'));
    items.push(el('li', `answered late +${r.answered_at_ms - r.sent_at_ms} ms (status ${r.status})`, 'o-accepted'));
    $('late').hidden = false;
    $('late-response').textContent = typeof r.response === 'string' ? r.response : JSON.stringify(r.response, null, 2);
  }
  if (r.state === 'bad_reply') items.push(el('li', `bad reply +${r.answered_at_ms - r.sent_at_ms} ms: ${r.response}`, 'o-error'));
  if (r.state === 'offline') items.push(el('li', 'offline: not delivered', 'o-offline'));
  if (r.state === 'unavailable') items.push(el('li', 'no broker connection', 'o-error'));
  if (r.state === 'sent' || r.state === 'delivered') items.push(el('li', 'waiting for the answer…'));
  $('timeline').replaceChildren(...items);
}

/** Shows the call's record, and keeps long-polling it until it is final. */
async function followRecord(id, mine) {
  let wait = 0;
  for (let round = 0; round < 40 && mine === generation; round += 1) {
    let response;
    try {
      response = await fetch(`/v1/calls/${encodeURIComponent(id)}?wait=${wait}`, { headers: authHeaders() });
    } catch {
      return;
    }
    if (!response.ok || mine !== generation) return;
    const r = await response.json();
    renderRecord(r);
    if (FINAL_STATES.has(r.state)) return;
    wait = Math.min(30, maxWait);
  }
}

// ---------------------------------------------------------------- group call

// `POST /v1/methods/{method}` with `Accept: application/x-ndjson`: one
// line per device as it answers, then the summary. A call to 10,000
// devices must not freeze the page: every result is counted and goes in
// the histogram, the first GROUP_ROWS are listed, and the page draws once
// per frame however fast the lines come.
const GROUP_ROWS = 1000;
const GROUP_OUTCOMES = ['ok', 'device_error', 'timeout', 'offline', 'refused'];
// Latency buckets' upper edges (ms); the last bucket is everything above.
const BUCKET_EDGES = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 60000];
const BUCKET_LABELS = ['<1', '1–2', '2–5', '5–10', '10–20', '20–50', '50–100', '100–200', '200–500',
  '500–1k', '1k–2k', '2k–5k', '5k–10k', '10k–20k', '20k–60k', '≥60k'];
const MIN_BARS = 6;

/** The running (or last) group call. */
let groupCall = null;
let histChart = null;

function groupKind() {
  return document.querySelector('input[name="g-kind"]:checked').value;
}

function showGroupKind() {
  const kind = groupKind();
  for (const k of ['targets', 'match', 'group']) $(`g-by-${k}`).hidden = k !== kind;
}
for (const radio of document.querySelectorAll('input[name="g-kind"]')) {
  radio.addEventListener('change', showGroupKind);
}

/** The group call's body, or the field at fault and why. */
function readGroupForm() {
  const kind = groupKind();
  const body = {};
  if (kind === 'targets') {
    const targets = $('g-targets').value.split(/[\s,]+/).filter((t) => t);
    if (targets.length === 0) return { field: 'g-targets', problem: 'Name at least one device.' };
    body.targets = targets;
  } else if (kind === 'match') {
    const pattern = $('g-match').value.trim();
    if (!pattern) return { field: 'g-match', problem: 'Give a pattern, such as Kiosk*.' };
    body.match = pattern;
    body.online_only = $('g-online').checked;
  } else {
    const name = $('g-group').value.trim();
    if (!name) return { field: 'g-group', problem: 'Name a group.' };
    body.group = name;
  }
  const method = $('g-method').value.trim();
  if (!method) return { field: 'g-method', problem: 'Name a method.' };
  try {
    body.request = JSON.parse($('g-request').value);
  } catch (e) {
    return { field: 'g-request', problem: `The request is not valid JSON: ${e.message}` };
  }
  const timeout = Number($('g-timeout').value);
  if (!Number.isInteger(timeout) || timeout < 1) {
    return { field: 'g-timeout', problem: 'The timeout is a whole number of milliseconds.' };
  }
  body.timeout_ms = timeout;
  return { method, body };
}

function bucketOf(latency) {
  const i = BUCKET_EDGES.findIndex((edge) => latency < edge);
  return i === -1 ? BUCKET_EDGES.length : i;
}

/** The bars to draw: the buckets from the first answered to the last, at least MIN_BARS. */
function histogramData(buckets) {
  const used = buckets.map((n, i) => (n > 0 ? i : -1)).filter((i) => i >= 0);
  let lo = used.length ? used[0] : 0;
  let hi = used.length ? used[used.length - 1] : 0;
  while (hi - lo + 1 < MIN_BARS) {
    if (hi < buckets.length - 1) hi += 1;
    else lo -= 1;
  }
  const xs = [];
  for (let i = lo; i <= hi; i += 1) xs.push(i);
  return [xs, xs.map((i) => buckets[i])];
}

function makeHistogram() {
  if (histChart || typeof uPlot === 'undefined') return;
  histChart = new uPlot(
    {
      width: chartWidth('g-hist'),
      height: 180,
      legend: { show: false },
      cursor: { show: false },
      scales: {
        x: { time: false, range: (u, min, max) => [min - 0.5, max + 0.5] },
        y: { range: (u, min, max) => [0, Math.max(1, max)] },
      },
      series: [
        {},
        { label: 'answers', fill: '#0969da', stroke: '#0969da', width: 1, paths: uPlot.paths.bars({ size: [0.8, 64] }), points: { show: false } },
      ],
      axes: [
        { label: 'ms', splits: (u) => u.data[0], values: (u, splits) => splits.map((i) => BUCKET_LABELS[i] ?? '') },
        { label: 'answers', incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000] },
      ],
    },
    histogramData(new Array(BUCKET_LABELS.length).fill(0)),
    $('g-hist'),
  );
  new ResizeObserver(() => histChart.setSize({ width: chartWidth('g-hist'), height: 180 })).observe($('group-panel'));
}

function resultRow(r) {
  const tr = el('tr');
  tr.dataset.target = r.target;
  tr.dataset.outcome = r.outcome;
  tr.append(el('td', r.target, 'wrap'));
  tr.append(el('td', r.replayed ? `${r.outcome} (replayed)` : r.outcome, outcomeClass(r.outcome)));
  tr.append(el('td', r.status ?? '–', r.status >= 400 ? 'o-error' : ''));
  tr.append(el('td', typeof r.latency_ms === 'number' ? `${r.latency_ms.toFixed(1)} ms` : '–', 'mono'));
  let detail = r.reason ?? '';
  if ('response' in r) detail = typeof r.response === 'string' ? r.response : JSON.stringify(r.response);
  if (detail.length > 300) detail = `${detail.slice(0, 300)}…`;
  tr.append(el('td', detail, 'detail'));
  return tr;
}

function drawGroup(call) {
  call.drawScheduled = false;
  if (call !== groupCall) return;
  if (call.pending.length) {
    $('g-results').tBodies[0].append(...call.pending.splice(0).map(resultRow));
  }
  const n = (x) => x.toLocaleString('en');
  const items = GROUP_OUTCOMES.map((o) => {
    const li = el('li');
    li.dataset.outcome = o;
    li.append(el('span', o.replace('_', ' '), outcomeClass(o)), ' ', el('span', n(call.counts[o]), 'n'));
    return li;
  });
  const total = el('li');
  total.dataset.outcome = 'total';
  const expected = call.summary && call.summary.expected !== null && call.summary.expected !== undefined
    ? ` of ${n(call.summary.expected)} expected` : '';
  total.append(el('span', 'total'), ' ', el('span', `${n(call.total)}${expected}`, 'n'));
  $('g-counts').replaceChildren(...items, total);
  const answers = call.buckets.reduce((a, b) => a + b, 0);
  if (histChart) histChart.setData(histogramData(call.buckets));
  const bars = call.buckets.map((c, i) => (c ? `${n(c)} at ${BUCKET_LABELS[i]} ms` : '')).filter((t) => t);
  $('g-hist').setAttribute('aria-label', answers
    ? `Latency of ${n(answers)} answer(s): ${bars.join(', ')}.`
    : 'No answer yet.');
  $('g-hist').dataset.answers = String(answers);
  $('g-note').textContent = call.total > call.listed
    ? `The first ${n(call.listed)} of ${n(call.total)} results are listed; all are counted above and in the histogram.`
    : `${n(call.total)} result(s), in the order they came.`;
}

function drawGroupSoon(call) {
  if (call.drawScheduled) return;
  call.drawScheduled = true;
  requestAnimationFrame(() => drawGroup(call));
}

function onGroupResult(call, r) {
  call.total += 1;
  if (GROUP_OUTCOMES.includes(r.outcome)) call.counts[r.outcome] += 1;
  if (typeof r.latency_ms === 'number') call.buckets[bucketOf(r.latency_ms)] += 1;
  if (call.listed < GROUP_ROWS) {
    call.listed += 1;
    call.pending.push(r);
  }
  drawGroupSoon(call);
}

function onGroupSummary(call, id, summary) {
  call.summary = summary;
  // The gateway's counts are the call's.
  for (const o of GROUP_OUTCOMES) call.counts[o] = summary[o] ?? call.counts[o];
  call.total = summary.total ?? call.total;
  const n = (x) => x.toLocaleString('en');
  const expected = summary.expected === null || summary.expected === undefined
    ? ' (membership unknown: every answer that came)' : ` of ${n(summary.expected)} expected`;
  $('g-state').textContent = `Done: ${n(summary.total)} result(s)${expected} in ${n(summary.elapsed_ms)} ms. Call id ${id}.`;
  $('g-state').className = 'done';
  // Drawn now, not on the next frame: the page never says "Done" beside
  // counts of before the summary.
  drawGroup(call);
}

/** Each line of an NDJSON body, parsed, as it comes. */
async function readLines(response, onLine) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let rest = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    const lines = (rest + decoder.decode(value, { stream: true })).split('\n');
    rest = lines.pop();
    for (const line of lines) if (line.trim()) onLine(JSON.parse(line));
  }
  rest += decoder.decode();
  if (rest.trim()) onLine(JSON.parse(rest));
}

function groupEnded(call, message, state) {
  if (call !== groupCall) return;
  call.running = false;
  $('g-send').disabled = false;
  $('g-stop').hidden = true;
  if (message) {
    $('g-state').textContent = message;
    $('g-state').className = state;
  }
  drawGroupSoon(call);
}

$('group-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  for (const id of ['g-targets', 'g-match', 'g-group', 'g-method', 'g-request', 'g-timeout']) $(id).removeAttribute('aria-invalid');
  $('g-error').textContent = '';
  const f = readGroupForm();
  if (f.problem) {
    $(f.field).setAttribute('aria-invalid', 'true');
    $('g-error').textContent = f.problem;
    $(f.field).focus();
    return;
  }
  if (groupCall && groupCall.running) groupCall.controller.abort();
  const call = {
    controller: new AbortController(),
    counts: Object.fromEntries(GROUP_OUTCOMES.map((o) => [o, 0])),
    buckets: new Array(BUCKET_LABELS.length).fill(0),
    total: 0,
    listed: 0,
    pending: [],
    summary: null,
    running: true,
    drawScheduled: false,
  };
  groupCall = call;
  $('g-send').disabled = true;
  $('g-stop').hidden = false;
  $('g-result').hidden = false;
  $('g-results').tBodies[0].replaceChildren();
  $('g-state').textContent = 'Calling…';
  $('g-state').className = '';
  makeHistogram();
  drawGroup(call);
  let response;
  try {
    response = await fetch(`/v1/methods/${encodeURIComponent(f.method)}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', Accept: 'application/x-ndjson', ...authHeaders() },
      body: JSON.stringify(f.body),
      signal: call.controller.signal,
    });
  } catch (err) {
    const stopped = err.name === 'AbortError';
    if (!stopped) $('g-error').textContent = `The gateway could not be reached: ${err.message}`;
    groupEnded(call, stopped ? 'Stopped before the gateway answered.' : 'Not sent.', 'o-error');
    return;
  }
  if (response.status === 401) {
    groupEnded(call, 'Not sent.', 'o-error');
    showLogin(token ? 'That token was refused.' : '');
    return;
  }
  if (!response.ok) {
    const text = await response.text().catch(() => '');
    let message = text;
    try {
      const body = JSON.parse(text);
      message = typeof body.response === 'string' ? body.response : body.message ?? text;
    } catch {
      // Not JSON: the text as it came.
    }
    $('g-error').textContent = `The gateway refused the call (HTTP ${response.status}): ${message}`;
    groupEnded(call, `Refused: HTTP ${response.status}.`, 'o-error');
    return;
  }
  $('g-state').textContent = 'Running: results appear as each device answers.';
  try {
    if ((response.headers.get('content-type') || '').startsWith('application/x-ndjson')) {
      await readLines(response, (line) => {
        if (call !== groupCall) return;
        if (line.summary) onGroupSummary(call, line.id, line.summary);
        else onGroupResult(call, line);
      });
    } else {
      // A gateway that answers one document: the same, all at once.
      const body = await response.json();
      for (const r of body.results) onGroupResult(call, r);
      onGroupSummary(call, body.id, body.summary);
    }
  } catch (err) {
    const how = err.name === 'AbortError' ? 'Stopped' : `The answer broke off (${err.message})`;
    groupEnded(call, `${how} after ${call.total.toLocaleString('en')} result(s); the devices not listed may still answer the gateway.`, 'o-timeout');
    return;
  }
  groupEnded(call, call.summary ? null : 'The answer ended before its summary.', 'o-timeout');
});

$('g-stop').addEventListener('click', () => {
  if (groupCall && groupCall.running) groupCall.controller.abort();
});

// ---------------------------------------------------------------- start

async function start() {
  setConn('connecting…', '');
  try {
    await refreshDevices();
  } catch (err) {
    if (err instanceof Unauthorized) {
      showLogin(token ? 'That token was refused.' : '');
    } else {
      setConn(err.message, 'down');
      setTimeout(start, 3000);
    }
    return;
  }
  $('login').hidden = true;
  $('main').hidden = false;
  $('signout').hidden = !token;
  makeCharts();
  updateCurl();
  noteLog();
  openStream();
}

start();
