// shardflow's pages: devices, a device's telemetry and attributes, rule
// chains, integrations and the converter test, drawn from the same HTTP API
// that API clients use. The session token lives in an HttpOnly cookie this
// script cannot read; it only holds the session's CSRF token, sent with
// every POST and DELETE. Live updates come from the server-sent events of
// /api/shardflow/live, which say what changed; the page then reads it.
'use strict';

(function () {
  const SCOPES = [
    { id: 'CLIENT_SCOPE', title: 'Client attributes', writable: false },
    { id: 'SHARED_SCOPE', title: 'Shared attributes', writable: true },
    { id: 'SERVER_SCOPE', title: 'Server attributes', writable: true },
  ];
  const WINDOWS = [
    { ms: 15 * 60e3, label: 'Last 15 minutes' },
    { ms: 60 * 60e3, label: 'Last hour' },
    { ms: 6 * 3600e3, label: 'Last 6 hours' },
    { ms: 24 * 3600e3, label: 'Last 24 hours' },
    { ms: 7 * 86400e3, label: 'Last 7 days' },
    { ms: 30 * 86400e3, label: 'Last 30 days' },
  ];
  const SVG_NS = 'http://www.w3.org/2000/svg';

  const session = { csrf: null, user: null };
  // Things the current page started (event streams, timers), stopped when
  // another page is shown.
  let pageCleanups = [];
  let idCounter = 0;

  // ------------------------------------------------------------ helpers --

  function uid(prefix) {
    idCounter += 1;
    return prefix + '-' + idCounter;
  }

  // Builds an element: h('a', {href: '#/x', class: 'y'}, 'text', child).
  // Attributes named on* add listeners; `text` sets textContent.
  function h(tag, attrs, ...children) {
    const svg = tag.startsWith('svg:');
    const el = svg ? document.createElementNS(SVG_NS, tag.slice(4)) : document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name.startsWith('on')) el.addEventListener(name.slice(2), value);
      else if (name === 'text') el.textContent = value;
      else if (name === 'value' && !svg) el.value = value;
      else el.setAttribute(name, value === true ? '' : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  function announce(text) {
    const region = document.getElementById('announce');
    region.textContent = '';
    // A change the screen reader notices even when the text repeats.
    setTimeout(() => { region.textContent = text; }, 50);
  }

  function formatTime(ms) {
    if (ms === null || ms === undefined) return '';
    const d = new Date(ms);
    const pad = (n) => String(n).padStart(2, '0');
    return d.getFullYear() + '-' + pad(d.getMonth() + 1) + '-' + pad(d.getDate()) + ' ' +
      pad(d.getHours()) + ':' + pad(d.getMinutes()) + ':' + pad(d.getSeconds());
  }

  function formatValue(value) {
    if (value === null || value === undefined) return '';
    return typeof value === 'object' ? JSON.stringify(value) : String(value);
  }

  function debounce(fn, ms) {
    let timer = null;
    return function (...args) {
      clearTimeout(timer);
      timer = setTimeout(() => fn(...args), ms);
    };
  }

  class HttpError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(method, path, body) {
    const headers = { Accept: 'application/json' };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    if (method !== 'GET' && session.csrf) headers['X-CSRF-Token'] = session.csrf;
    const response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: 'same-origin',
      cache: 'no-store',
    });
    const text = await response.text();
    let data = null;
    if (text) {
      try { data = JSON.parse(text); } catch (e) { data = text; }
    }
    if (response.status === 401 && path !== '/api/shardflow/login') {
      // Several requests of a page can fail at once: one login form.
      if (session.user) showLogin('Your session has ended; please log in again.');
      else if (!document.getElementById('login-username')) showLogin();
      throw new HttpError(401, 'not logged in');
    }
    if (!response.ok) {
      const message = data && data.message ? data.message : 'HTTP ' + response.status;
      throw new HttpError(response.status, message);
    }
    return data;
  }

  function onCleanup(fn) {
    pageCleanups.push(fn);
  }

  // A live event stream for the current page; `handlers` by event name.
  function listen(path, handlers) {
    const source = new EventSource(path);
    for (const [name, handler] of Object.entries(handlers)) {
      source.addEventListener(name, (event) => {
        let data = null;
        try { data = JSON.parse(event.data); } catch (e) { data = null; }
        handler(data);
      });
    }
    onCleanup(() => source.close());
    return source;
  }

  function errorBox(error) {
    return h('p', { class: 'error', role: 'alert', text: error.message || String(error) });
  }

  // Shows a page: clears the main region, stops the previous page's
  // streams, and moves focus to the new heading.
  function showPage(title, ...content) {
    for (const fn of pageCleanups) fn();
    pageCleanups = [];
    const main = document.getElementById('main');
    main.replaceChildren(...content);
    document.title = title + ' · shardflow';
    const heading = main.querySelector('h1');
    if (heading) {
      heading.setAttribute('tabindex', '-1');
      heading.focus({ preventScroll: false });
    }
  }

  function markNav(section) {
    for (const link of document.querySelectorAll('#nav a')) {
      if (link.dataset.section === section) link.setAttribute('aria-current', 'page');
      else link.removeAttribute('aria-current');
    }
  }

  // -------------------------------------------------------------- login --

  function showLogin(message) {
    session.csrf = null;
    session.user = null;
    document.getElementById('nav').hidden = true;
    document.getElementById('user').hidden = true;
    const error = h('p', { class: 'error', role: 'alert', id: 'login-error' });
    if (message) error.textContent = message;
    const form = h('form', { class: 'login card', novalidate: true },
      h('label', { for: 'login-username', text: 'Username' }),
      h('input', { id: 'login-username', name: 'username', type: 'text', autocomplete: 'username', required: true }),
      h('label', { for: 'login-password', text: 'Password' }),
      h('input', { id: 'login-password', name: 'password', type: 'password', autocomplete: 'current-password', required: true }),
      error,
      h('button', { type: 'submit', class: 'primary', text: 'Log in' }));
    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      error.textContent = '';
      try {
        const answer = await api('POST', '/api/shardflow/login', {
          username: form.username.value,
          password: form.password.value,
        });
        startSession(answer);
        route();
      } catch (e) {
        error.textContent = e.status === 401 ? 'Wrong username or password.' : e.message;
        form.password.focus();
      }
    });
    showPage('Log in', h('h1', { text: 'Log in to shardflow' }),
      h('p', { text: 'Use the API credentials of this shardflow service ([http] username and password).' }),
      form);
    setTimeout(() => form.username.focus(), 0);
  }

  function startSession(info) {
    session.csrf = info.csrfToken;
    session.user = info.username;
    document.getElementById('username').textContent = info.username;
    document.getElementById('nav').hidden = false;
    document.getElementById('user').hidden = false;
  }

  async function logout() {
    try {
      await api('POST', '/api/shardflow/logout');
    } catch (e) {
      // The session may have ended already; the login page follows anyway.
    }
    showLogin('You are logged out.');
  }

  // ------------------------------------------------------------ devices --

  function devicesPage(params) {
    markNav('devices');
    const pageSize = Number(params.get('pageSize')) || 20;
    let page = Number(params.get('page')) || 0;
    let search = params.get('q') || '';

    const searchInput = h('input', { id: 'device-search', type: 'search', value: search, autocomplete: 'off' });
    const body = h('tbody');
    const caption = h('caption', { text: 'Devices' });
    const pageInfo = h('span', { class: 'page-info', 'aria-live': 'polite' });
    const prev = h('button', { type: 'button', text: 'Previous page' });
    const next = h('button', { type: 'button', text: 'Next page' });
    const status = h('div');

    async function load() {
      const query = new URLSearchParams({ pageSize, page });
      if (search) query.set('textSearch', search);
      try {
        const result = await api('GET', '/api/tenant/devices?' + query);
        status.replaceChildren();
        body.replaceChildren(...result.data.map((d) => h('tr', {},
          h('th', { scope: 'row' }, h('a', { href: '#/device/' + d.id.id, text: d.name })),
          h('td', { text: d.type }),
          h('td', { text: d.label || '' }),
          h('td', {}, h('time', { datetime: new Date(d.createdTime).toISOString(), text: formatTime(d.createdTime) })))));
        if (result.data.length === 0) {
          body.replaceChildren(h('tr', {}, h('td', { colspan: 4, class: 'empty',
            text: search ? 'No device name contains “' + search + '”.' : 'No devices yet. They appear here as records arrive.' })));
        }
        const pages = Math.max(1, result.totalPages);
        caption.textContent = 'Devices (' + result.totalElements + ')';
        pageInfo.textContent = 'Page ' + (page + 1) + ' of ' + pages;
        prev.disabled = page === 0;
        next.disabled = !result.hasNext;
      } catch (e) {
        if (e.status !== 401) status.replaceChildren(errorBox(e));
      }
    }

    const setHash = () => {
      const query = new URLSearchParams();
      if (search) query.set('q', search);
      if (page) query.set('page', page);
      history.replaceState(null, '', '#/devices' + (query.toString() ? '?' + query : ''));
    };
    searchInput.addEventListener('input', debounce(() => {
      search = searchInput.value.trim();
      page = 0;
      setHash();
      load();
    }, 250));
    prev.addEventListener('click', () => { page = Math.max(0, page - 1); setHash(); load(); });
    next.addEventListener('click', () => { page += 1; setHash(); load(); });

    const form = h('form', { role: 'search', class: 'search', onsubmit: (e) => { e.preventDefault(); } },
      h('label', { for: 'device-search', text: 'Search by name' }), searchInput);
    showPage('Devices',
      h('h1', { text: 'Devices' }),
      form,
      status,
      h('div', { class: 'table-wrap' },
        h('table', { id: 'devices' }, caption,
          h('thead', {}, h('tr', {},
            h('th', { scope: 'col', text: 'Name' }),
            h('th', { scope: 'col', text: 'Type' }),
            h('th', { scope: 'col', text: 'Label' }),
            h('th', { scope: 'col', text: 'Created' }))),
          body)),
      h('nav', { class: 'pager', 'aria-label': 'Pages' }, prev, pageInfo, next));

    const reload = debounce(load, 200);
    listen('/api/shardflow/live?only=created', {
      ready: reload,
      lagged: reload,
      changes: (changes) => {
        const created = (changes || []).filter((c) => c.kind === 'entityCreated' && c.entityType === 'DEVICE');
        if (created.length) {
          announce('New device: ' + created.map((c) => c.name).join(', '));
          reload();
        }
      },
    });
    load();
  }

  // ------------------------------------------------------------- device --

  function devicePage(id, tab) {
    markNav('devices');
    const header = h('div');
    const panels = {};
    const tabs = [
      { id: 'latest', title: 'Latest telemetry' },
      { id: 'chart', title: 'Chart' },
      { id: 'attributes', title: 'Attributes' },
    ];
    const tablist = h('div', { role: 'tablist', 'aria-label': 'Device data', class: 'tabs' });
    const buttons = tabs.map((t) => {
      const button = h('button', {
        type: 'button', role: 'tab', id: 'tab-' + t.id, 'aria-controls': 'panel-' + t.id, text: t.title,
      });
      button.addEventListener('click', () => select(t.id, true));
      button.addEventListener('keydown', (event) => {
        const index = tabs.findIndex((x) => x.id === t.id);
        let target = null;
        if (event.key === 'ArrowRight') target = (index + 1) % tabs.length;
        if (event.key === 'ArrowLeft') target = (index + tabs.length - 1) % tabs.length;
        if (event.key === 'Home') target = 0;
        if (event.key === 'End') target = tabs.length - 1;
        if (target !== null) {
          event.preventDefault();
          select(tabs[target].id, true);
        }
      });
      tablist.append(button);
      panels[t.id] = h('section', { role: 'tabpanel', id: 'panel-' + t.id, 'aria-labelledby': 'tab-' + t.id, tabindex: 0 });
      return button;
    });

    function select(which, focus) {
      tabs.forEach((t, i) => {
        const on = t.id === which;
        buttons[i].setAttribute('aria-selected', on ? 'true' : 'false');
        buttons[i].tabIndex = on ? 0 : -1;
        panels[t.id].hidden = !on;
        if (on && focus) buttons[i].focus();
      });
      history.replaceState(null, '', '#/device/' + id + '/' + which);
      if (which === 'chart') chart.show();
    }

    const latest = latestPanel(id, panels.latest);
    const chart = chartPanel(id, panels.chart);
    const attributes = attributesPanel(id, panels.attributes);

    showPage('Device',
      h('p', { class: 'crumbs' }, h('a', { href: '#/devices', text: '← Devices' })),
      header, tablist, panels.latest, panels.chart, panels.attributes);
    select(tabs.some((t) => t.id === tab) ? tab : 'latest', false);

    api('GET', '/api/device/' + encodeURIComponent(id)).then((device) => {
      document.title = device.name + ' · shardflow';
      header.replaceChildren(
        h('h1', { text: device.name }),
        h('dl', { class: 'facts' },
          h('dt', { text: 'Type' }), h('dd', { text: device.type }),
          h('dt', { text: 'Label' }), h('dd', { text: device.label || '—' }),
          h('dt', { text: 'Created' }), h('dd', { text: formatTime(device.createdTime) }),
          h('dt', { text: 'Id' }), h('dd', {}, h('code', { text: device.id.id }))));
    }).catch((e) => {
      header.replaceChildren(h('h1', { text: 'Device' }), errorBox(e));
    });

    listen('/api/shardflow/live?entityId=' + encodeURIComponent(id), {
      ready: () => { latest.load(); attributes.loadAll(); },
      lagged: () => { latest.load(); attributes.loadAll(); chart.refresh(); },
      changes: (changes) => {
        for (const change of changes || []) {
          if (change.entityId !== id) continue;
          if (change.kind === 'telemetry') {
            latest.changed(change.keys);
            chart.changed(change.keys);
          } else if (change.kind === 'attributes') {
            attributes.load(change.scope);
          }
        }
      },
    });
  }

  function latestPanel(id, panel) {
    const body = h('tbody');
    const status = h('div');
    const fresh = new Set();
    panel.append(
      h('h2', { text: 'Latest telemetry' }),
      h('p', { class: 'hint', text: 'Updates live as new values are stored.' }),
      status,
      h('div', { class: 'table-wrap' },
        h('table', { id: 'latest' },
          h('caption', { class: 'sr-only', text: 'Latest telemetry' }),
          h('thead', {}, h('tr', {},
            h('th', { scope: 'col', text: 'Key' }),
            h('th', { scope: 'col', text: 'Value' }),
            h('th', { scope: 'col', text: 'Last update' }))),
          body)));

    async function load() {
      try {
        const values = await api('GET', '/api/plugins/telemetry/DEVICE/' + id + '/values/timeseries?useStrictDataTypes=true');
        status.replaceChildren();
        const keys = Object.keys(values).sort();
        body.replaceChildren(...keys.map((key) => {
          const point = values[key][0];
          return h('tr', { 'data-key': key, class: fresh.has(key) ? 'fresh' : null },
            h('th', { scope: 'row', text: key }),
            h('td', { class: 'value', text: formatValue(point.value) }),
            h('td', {}, h('time', { datetime: new Date(point.ts).toISOString(), text: formatTime(point.ts) })));
        }));
        if (!keys.length) body.replaceChildren(h('tr', {}, h('td', { colspan: 3, class: 'empty', text: 'No telemetry yet.' })));
        fresh.clear();
      } catch (e) {
        if (e.status !== 401) status.replaceChildren(errorBox(e));
      }
    }
    const reload = debounce(load, 150);
    return {
      load,
      changed(keys) {
        for (const key of keys) fresh.add(key);
        reload();
      },
    };
  }

  function chartPanel(id, panel) {
    const keySelect = h('select', { id: 'chart-key' });
    const windowSelect = h('select', { id: 'chart-window' },
      ...WINDOWS.map((w, i) => h('option', { value: w.ms, selected: i === 1, text: w.label })));
    const figure = h('figure', { class: 'chart' });
    const status = h('div');
    let shown = false;
    panel.append(
      h('h2', { text: 'History' }),
      h('form', { class: 'inline', onsubmit: (e) => e.preventDefault() },
        h('label', { for: 'chart-key', text: 'Telemetry key' }), keySelect,
        h('label', { for: 'chart-window', text: 'Time window' }), windowSelect),
      status, figure);

    async function loadKeys() {
      const keys = await api('GET', '/api/plugins/telemetry/DEVICE/' + id + '/keys/timeseries');
      const current = keySelect.value;
      keySelect.replaceChildren(...keys.map((k) => h('option', { value: k, text: k })));
      if (keys.includes(current)) keySelect.value = current;
      return keys;
    }

    async function refresh() {
      if (!shown) return;
      try {
        status.replaceChildren();
        if (!keySelect.value) {
          const keys = await loadKeys();
          if (!keys.length) {
            figure.replaceChildren(h('p', { class: 'empty', text: 'No telemetry yet.' }));
            return;
          }
        }
        const key = keySelect.value;
        const end = Date.now();
        const start = end - Number(windowSelect.value);
        const query = new URLSearchParams({ keys: key, startTs: start, endTs: end, limit: 10000, useStrictDataTypes: 'true' });
        const history = await api('GET', '/api/plugins/telemetry/DEVICE/' + id + '/values/timeseries?' + query);
        const points = (history[key] || []).slice().reverse();
        drawChart(figure, key, points, start, end);
      } catch (e) {
        if (e.status !== 401) status.replaceChildren(errorBox(e));
      }
    }
    const later = debounce(refresh, 300);
    keySelect.addEventListener('change', refresh);
    windowSelect.addEventListener('change', refresh);
    return {
      show() {
        shown = true;
        loadKeys().then(refresh).catch((e) => { if (e.status !== 401) status.replaceChildren(errorBox(e)); });
      },
      refresh,
      changed(keys) {
        if (shown && keys.includes(keySelect.value)) later();
        if (shown && keys.some((k) => ![...keySelect.options].some((o) => o.value === k))) loadKeys();
      },
    };
  }

  // Draws a line chart of numeric points as inline SVG, with a data table
  // for those who do not see the chart.
  function drawChart(figure, key, points, start, end) {
    const numeric = points.filter((p) => typeof p.value === 'number');
    const caption = h('figcaption', {
      text: key + ': ' + points.length + ' value' + (points.length === 1 ? '' : 's') + ' from ' + formatTime(start) + ' to ' + formatTime(end),
    });
    const table = h('details', {}, h('summary', { text: 'Values as a table' }),
      h('div', { class: 'table-wrap' }, h('table', {},
        h('thead', {}, h('tr', {}, h('th', { scope: 'col', text: 'Time' }), h('th', { scope: 'col', text: 'Value' }))),
        h('tbody', {}, ...points.slice().reverse().map((p) => h('tr', {},
          h('td', { text: formatTime(p.ts) }), h('td', { text: formatValue(p.value) })))))));
    if (!points.length) {
      figure.replaceChildren(caption, h('p', { class: 'empty', text: 'No values in this time window.' }));
      return;
    }
    if (!numeric.length) {
      figure.replaceChildren(caption, h('p', { text: 'The values of ' + key + ' are not numbers; they are listed below.' }), table);
      return;
    }
    const W = 720, H = 300, L = 60, R = 16, T = 16, B = 40;
    let min = Math.min(...numeric.map((p) => p.value));
    let max = Math.max(...numeric.map((p) => p.value));
    if (min === max) { min -= 1; max += 1; }
    const x = (ts) => L + (W - L - R) * (ts - start) / (end - start);
    const y = (v) => T + (H - T - B) * (1 - (v - min) / (max - min));
    const svg = h('svg:svg', { viewBox: '0 0 ' + W + ' ' + H, role: 'img', 'aria-label': 'Chart of ' + key, class: 'plot' });
    for (let i = 0; i <= 4; i++) {
      const v = min + (max - min) * i / 4;
      svg.append(h('svg:line', { x1: L, x2: W - R, y1: y(v), y2: y(v), class: 'grid' }));
      svg.append(h('svg:text', { x: L - 6, y: y(v) + 4, 'text-anchor': 'end', class: 'tick', text: Number(v.toPrecision(4)) }));
    }
    for (let i = 0; i <= 3; i++) {
      const ts = start + (end - start) * i / 3;
      const anchor = i === 0 ? 'start' : i === 3 ? 'end' : 'middle';
      svg.append(h('svg:text', { x: x(ts), y: H - 14, 'text-anchor': anchor, class: 'tick', text: formatTime(ts).slice(5, 16) }));
    }
    svg.append(h('svg:polyline', { class: 'line', points: numeric.map((p) => x(p.ts).toFixed(1) + ',' + y(p.value).toFixed(1)).join(' ') }));
    for (const p of numeric.slice(-200)) {
      svg.append(h('svg:circle', { cx: x(p.ts).toFixed(1), cy: y(p.value).toFixed(1), r: 3, class: 'dot' },
        h('svg:title', { text: formatTime(p.ts) + ': ' + p.value })));
    }
    figure.replaceChildren(caption, svg, table);
  }

  // The value typed into an attribute form, as JSON of the chosen type.
  function parseAttributeValue(type, text) {
    if (type === 'string') return text;
    if (type === 'boolean') return text === 'true';
    if (type === 'number') {
      const n = Number(text.trim());
      if (text.trim() === '' || !Number.isFinite(n)) throw new Error('“' + text + '” is not a number.');
      return n;
    }
    try {
      return JSON.parse(text);
    } catch (e) {
      throw new Error('The value is not valid JSON: ' + e.message);
    }
  }

  function typeOf(value) {
    if (typeof value === 'number') return 'number';
    if (typeof value === 'boolean') return 'boolean';
    if (typeof value === 'string') return 'string';
    return 'json';
  }

  function attributesPanel(id, panel) {
    const sections = {};
    panel.append(h('h2', { text: 'Attributes' }),
      h('p', { class: 'hint', text: 'Client attributes come from devices. Saving or deleting a shared or server attribute goes through the rule chain (Attributes Updated / Attributes Deleted).' }));
    for (const scope of SCOPES) {
      sections[scope.id] = scopeSection(id, scope);
      panel.append(sections[scope.id].element);
    }
    return {
      load(scope) { if (sections[scope]) sections[scope].load(); },
      loadAll() { for (const s of Object.values(sections)) s.load(); },
    };
  }

  function scopeSection(id, scope) {
    const base = '/api/plugins/telemetry/DEVICE/' + id;
    const body = h('tbody');
    const status = h('div', { class: 'form-status', 'aria-live': 'polite' });
    const headingId = uid('scope');
    const element = h('section', { class: 'scope', 'aria-labelledby': headingId, 'data-scope': scope.id },
      h('h3', { id: headingId, text: scope.title }));
    let form = null;

    if (scope.writable) {
      const keyId = uid('attr-key'), typeId = uid('attr-type'), valueId = uid('attr-value');
      const key = h('input', { id: keyId, name: 'key', type: 'text', required: true, autocomplete: 'off' });
      const type = h('select', { id: typeId, name: 'type' },
        h('option', { value: 'string', text: 'String' }),
        h('option', { value: 'number', text: 'Number' }),
        h('option', { value: 'boolean', text: 'Boolean' }),
        h('option', { value: 'json', text: 'JSON' }));
      const value = h('input', { id: valueId, name: 'value', type: 'text', autocomplete: 'off' });
      const submit = h('button', { type: 'submit', class: 'primary', text: 'Save attribute' });
      const cancel = h('button', { type: 'button', text: 'Cancel edit', hidden: true });
      form = h('form', { class: 'attr-form', 'aria-label': 'Add or edit a ' + scope.title.toLowerCase().replace(/s$/, '') },
        h('div', { class: 'field' }, h('label', { for: keyId, text: 'Key' }), key),
        h('div', { class: 'field' }, h('label', { for: typeId, text: 'Type' }), type),
        h('div', { class: 'field grow' }, h('label', { for: valueId, text: 'Value' }), value),
        h('div', { class: 'actions' }, submit, cancel));
      const endEdit = () => {
        form.reset();
        key.readOnly = false;
        cancel.hidden = true;
      };
      cancel.addEventListener('click', () => { endEdit(); key.focus(); });
      form.addEventListener('submit', async (event) => {
        event.preventDefault();
        status.replaceChildren();
        const name = key.value.trim();
        if (!name) {
          status.replaceChildren(h('p', { class: 'error', role: 'alert', text: 'The key must not be empty.' }));
          key.focus();
          return;
        }
        let parsed;
        try {
          parsed = parseAttributeValue(type.value, value.value);
        } catch (e) {
          status.replaceChildren(h('p', { class: 'error', role: 'alert', text: e.message }));
          value.focus();
          return;
        }
        submit.disabled = true;
        try {
          await api('POST', base + '/attributes/' + scope.id, { [name]: parsed });
          status.replaceChildren(h('p', { class: 'ok', text: 'Saved ' + name + '.' }));
          endEdit();
          await load();
          key.focus();
        } catch (e) {
          if (e.status !== 401) status.replaceChildren(errorBox(e));
        } finally {
          submit.disabled = false;
        }
      });
      form.edit = (attribute) => {
        key.value = attribute.key;
        key.readOnly = true;
        type.value = typeOf(attribute.value);
        value.value = typeof attribute.value === 'string' ? attribute.value : JSON.stringify(attribute.value);
        cancel.hidden = false;
        value.focus();
      };
    }

    const columns = [
      h('th', { scope: 'col', text: 'Key' }),
      h('th', { scope: 'col', text: 'Value' }),
      h('th', { scope: 'col', text: 'Last update' }),
    ];
    if (scope.writable) columns.push(h('th', { scope: 'col', text: 'Actions' }));
    element.append(h('div', { class: 'table-wrap' },
      h('table', { class: 'attributes' },
        h('caption', { class: 'sr-only', text: scope.title }),
        h('thead', {}, h('tr', {}, ...columns)), body)));
    if (form) element.append(form);
    element.append(status);

    function row(attribute) {
      const cells = [
        h('th', { scope: 'row', text: attribute.key }),
        h('td', { class: 'value', text: formatValue(attribute.value) }),
        h('td', { text: formatTime(attribute.lastUpdateTs) }),
      ];
      if (scope.writable) {
        const actions = h('td', { class: 'row-actions' });
        const showButtons = () => {
          actions.replaceChildren(
            h('button', { type: 'button', 'aria-label': 'Edit ' + attribute.key, text: 'Edit', onclick: () => form.edit(attribute) }),
            h('button', { type: 'button', class: 'danger', 'aria-label': 'Delete ' + attribute.key, text: 'Delete', onclick: confirmDelete }));
        };
        const confirmDelete = () => {
          const yes = h('button', { type: 'button', class: 'danger', text: 'Yes, delete ' + attribute.key });
          const no = h('button', { type: 'button', text: 'Keep it' });
          yes.addEventListener('click', async () => {
            yes.disabled = true;
            try {
              await api('DELETE', base + '/' + scope.id + '?keys=' + encodeURIComponent(attribute.key));
              status.replaceChildren(h('p', { class: 'ok', text: 'Deleted ' + attribute.key + '.' }));
              await load();
            } catch (e) {
              if (e.status !== 401) status.replaceChildren(errorBox(e));
              showButtons();
            }
          });
          no.addEventListener('click', () => { showButtons(); actions.querySelector('button').focus(); });
          actions.replaceChildren(h('span', { class: 'confirm', text: 'Delete?' }), yes, no);
          yes.focus();
        };
        showButtons();
        cells.push(actions);
      }
      return h('tr', { 'data-key': attribute.key }, ...cells);
    }

    let shown = null;
    async function load() {
      try {
        const attributes = await api('GET', base + '/values/attributes/' + scope.id);
        // Redrawn only when something changed, so a live announcement of
        // this page's own save does not undo an edit or a confirmation.
        const text = JSON.stringify(attributes);
        if (text === shown) return;
        shown = text;
        body.replaceChildren(...attributes.map(row));
        if (!attributes.length) {
          body.replaceChildren(h('tr', {}, h('td', { colspan: scope.writable ? 4 : 3, class: 'empty', text: 'None.' })));
        }
      } catch (e) {
        if (e.status !== 401) status.replaceChildren(errorBox(e));
      }
    }
    return { element, load: debounce(load, 100) };
  }

  // -------------------------------------------------------- rule chains --

  function chainsPage() {
    markNav('chains');
    const content = h('div');
    let last = null;
    showPage('Rule chains', h('h1', { text: 'Rule chains' }),
      h('p', { class: 'hint', text: 'Read-only: the chain files stay the source of truth.' }), content);
    async function load() {
      try {
        const answer = await api('GET', '/api/shardflow/ruleChains');
        const text = JSON.stringify(answer);
        if (text === last) return;
        last = text;
        // Tables the user opened stay open when the counts change.
        const open = new Set([...content.querySelectorAll('details[open]')].map((d) => d.dataset.chain));
        renderChains(content, answer);
        for (const d of content.querySelectorAll('details')) d.open = open.has(d.dataset.chain);
      } catch (e) {
        if (e.status !== 401) content.replaceChildren(errorBox(e));
      }
    }
    load();
    const timer = setInterval(load, 3000);
    onCleanup(() => clearInterval(timer));
  }

  function renderChains(content, answer) {
    const reload = answer.reload || {};
    const reloadText = reload.ok
      ? 'Last reload succeeded' + (reload.loadedMs ? ' at ' + formatTime(reload.loadedMs) : '') + ' (version ' + reload.version + ').'
      : 'Last reload failed' + (reload.attemptMs ? ' at ' + formatTime(reload.attemptMs) : '') + ': ' + (reload.error || 'unknown error');
    const parts = [h('p', { class: reload.ok ? 'ok' : 'error', role: reload.ok ? null : 'alert', id: 'reload-result', text: reloadText })];
    for (const chain of answer.chains || []) {
      const headingId = uid('chain');
      parts.push(h('section', { class: 'chain card', 'aria-labelledby': headingId },
        h('h2', { id: headingId, text: chain.name + (chain.root ? ' (root)' : '') }),
        h('p', { class: 'hint', text: chain.file + ' · version ' + chain.version }),
        chainGraph(chain),
        chainTable(chain)));
    }
    content.replaceChildren(...parts);
  }

  function shortType(type) {
    const last = String(type).split('.').pop();
    return last.replace(/^Tb/, '').replace(/Node$/, '');
  }

  function nodeCounts(stats) {
    const s = stats || {};
    const out = Object.values(s.out || {}).reduce((a, b) => a + b, 0);
    return { in: s.in || 0, errors: s.errors || 0, out };
  }

  // The chain as an SVG graph: nodes where the export's layout puts them
  // (a column layout by depth when it has none), edges labelled with their
  // relation.
  function chainGraph(chain) {
    const NW = 190, NH = 58;
    const nodes = chain.nodes || [];
    const positions = layoutNodes(chain, NW, NH);
    const xs = positions.map((p) => p.x), ys = positions.map((p) => p.y);
    // The frame fits the nodes (exports place them anywhere).
    const span = (values) => (values.length ? [Math.min(...values), Math.max(...values)] : [0, 0]);
    const [minX, maxX] = span(xs), [minY, maxY] = span(ys);
    const width = maxX - minX + NW + 40, height = maxY - minY + NH + 40;
    const svg = h('svg:svg', {
      viewBox: (minX - 20) + ' ' + (minY - 20) + ' ' + width + ' ' + height,
      // Drawn at its natural size; the frame scrolls on narrow screens.
      width, height,
      role: 'img', 'aria-label': 'Graph of ' + chain.name + ': ' + nodes.length + ' nodes, ' + (chain.connections || []).length + ' connections (listed in the table below)',
      class: 'graph',
    });
    const defs = h('svg:defs', {}, h('svg:marker', { id: 'arrow', viewBox: '0 0 10 10', refX: 10, refY: 5, markerWidth: 8, markerHeight: 8, orient: 'auto-start-reverse' },
      h('svg:path', { d: 'M 0 0 L 10 5 L 0 10 z', class: 'arrowhead' })));
    svg.append(defs);
    const grouped = {};
    for (const c of chain.connections || []) {
      const k = c.fromIndex + '>' + c.toIndex;
      (grouped[k] = grouped[k] || []).push(c.type);
    }
    for (const [k, types] of Object.entries(grouped)) {
      const [from, to] = k.split('>').map(Number);
      const a = positions[from], b = positions[to];
      if (!a || !b) continue;
      const x1 = a.x + NW, y1 = a.y + NH / 2, x2 = b.x, y2 = b.y + NH / 2;
      const mx = (x1 + x2) / 2;
      svg.append(h('svg:path', { d: 'M ' + x1 + ' ' + y1 + ' C ' + mx + ' ' + y1 + ', ' + mx + ' ' + y2 + ', ' + x2 + ' ' + y2, class: 'edge', 'marker-end': 'url(#arrow)' }));
      // The label sits on the curve near its target, where edges that
      // leave one node have spread apart.
      const t = 0.72, u = 1 - t;
      const lx = u * u * u * x1 + 3 * u * u * t * mx + 3 * u * t * t * mx + t * t * t * x2;
      const ly = u * u * u * y1 + 3 * u * u * t * y1 + 3 * u * t * t * y2 + t * t * t * y2;
      svg.append(h('svg:text', { x: lx.toFixed(1), y: (ly - 5).toFixed(1), 'text-anchor': 'middle', class: 'edge-label', text: types.join(' / ') }));
    }
    nodes.forEach((node, i) => {
      const p = positions[i];
      const counts = nodeCounts(node.stats);
      const first = node.index === (chain.firstNodeIndex === undefined ? 0 : chain.firstNodeIndex);
      const g = h('svg:g', { class: 'node' + (counts.errors ? ' has-errors' : '') + (first ? ' first' : '') });
      g.append(h('svg:rect', { x: p.x, y: p.y, width: NW, height: NH, rx: 8 }));
      g.append(h('svg:text', { x: p.x + 10, y: p.y + 20, class: 'node-name', text: clip(node.name, 24) }));
      g.append(h('svg:text', { x: p.x + 10, y: p.y + 36, class: 'node-type', text: shortType(node.type) }));
      g.append(h('svg:text', { x: p.x + 10, y: p.y + 51, class: 'node-stats', text: 'in ' + counts.in + ' · out ' + counts.out + ' · errors ' + counts.errors }));
      g.append(h('svg:title', { text: node.name + ' (' + node.type + ')' }));
      svg.append(g);
    });
    return h('div', { class: 'graph-wrap' }, svg);
  }

  function clip(text, n) {
    text = String(text || '');
    return text.length > n ? text.slice(0, n - 1) + '…' : text;
  }

  function layoutNodes(chain, NW, NH) {
    const nodes = chain.nodes || [];
    if (nodes.length && nodes.every((n) => n.layout && Number.isFinite(n.layout.x) && Number.isFinite(n.layout.y))) {
      return nodes.map((n) => ({ x: n.layout.x, y: n.layout.y }));
    }
    // Depth from the first node along the connections; nodes in a column
    // per depth.
    const depth = nodes.map(() => 0);
    // Nodes that no connection reaches stay in the first column.
    for (let pass = 0; pass < nodes.length; pass++) {
      for (const c of chain.connections || []) {
        if (depth[c.toIndex] !== undefined && depth[c.toIndex] < depth[c.fromIndex] + 1) depth[c.toIndex] = depth[c.fromIndex] + 1;
      }
    }
    const rows = {};
    return nodes.map((n, i) => {
      const d = depth[i];
      rows[d] = (rows[d] || 0) + 1;
      return { x: d * (NW + 200), y: (rows[d] - 1) * (NH + 30) };
    });
  }

  function chainTable(chain) {
    const nodes = chain.nodes || [];
    const outgoing = (i) => (chain.connections || []).filter((c) => c.fromIndex === i)
      .map((c) => c.type + ' → ' + (nodes[c.toIndex] ? nodes[c.toIndex].name : '#' + c.toIndex)).join('; ');
    return h('details', { class: 'nodes', 'data-chain': chain.id }, h('summary', { text: 'Nodes and connections as a table' }),
      h('div', { class: 'table-wrap' }, h('table', {},
        h('thead', {}, h('tr', {},
          h('th', { scope: 'col', text: '#' }),
          h('th', { scope: 'col', text: 'Node' }),
          h('th', { scope: 'col', text: 'Type' }),
          h('th', { scope: 'col', text: 'Messages in' }),
          h('th', { scope: 'col', text: 'Out by relation' }),
          h('th', { scope: 'col', text: 'Errors' }),
          h('th', { scope: 'col', text: 'Connections' }))),
        h('tbody', {}, ...nodes.map((node, i) => {
          const s = node.stats || {};
          const out = Object.entries(s.out || {}).map(([r, n]) => r + ': ' + n).join(', ');
          return h('tr', {},
            h('td', { text: node.index === undefined ? i : node.index }),
            h('th', { scope: 'row', text: node.name }),
            h('td', { text: shortType(node.type) }),
            h('td', { text: s.in || 0 }),
            h('td', { text: out || '—' }),
            h('td', { text: s.errors || 0 }),
            h('td', { text: outgoing(i) || '—' }));
        })))));
  }

  // ------------------------------------------------------- integrations --

  function integrationsPage() {
    markNav('integrations');
    const content = h('div');
    const updated = h('p', { class: 'hint' });
    showPage('Integrations', h('h1', { text: 'Integrations' }), updated, content);
    async function load() {
      try {
        const answer = await api('GET', '/api/shardflow/integrations');
        updated.textContent = 'Updated ' + formatTime(Date.now()) + '; refreshes every 2 seconds.';
        content.replaceChildren(...answer.integrations.map(integrationSection));
      } catch (e) {
        if (e.status !== 401) content.replaceChildren(errorBox(e));
      }
    }
    load();
    const timer = setInterval(load, 2000);
    onCleanup(() => clearInterval(timer));
  }

  function integrationSection(integration) {
    const headingId = uid('integration');
    const rows = integration.shards.map((s) => h('tr', { class: 'state-' + s.state.toLowerCase() },
      h('th', { scope: 'row', text: s.shardId }),
      h('td', {}, h('span', { class: 'badge', text: s.state })),
      h('td', { class: 'mono', title: s.checkpoint || '', text: s.checkpoint ? clip(s.checkpoint, 18) : '—' }),
      h('td', { text: s.millisBehindLatest === null ? '—' : s.millisBehindLatest + ' ms' }),
      h('td', { text: s.recordsRead }),
      h('td', { text: s.recordsPerSecond }),
      h('td', { text: s.recordsFailed }),
      h('td', { text: s.inFlight }),
      h('td', { class: s.lastError ? 'last-error' : null, text: s.lastError || '—' })));
    return h('section', { class: 'card integration', 'aria-labelledby': headingId },
      h('h2', { id: headingId, text: integration.name }),
      h('dl', { class: 'facts' },
        h('dt', { text: 'Stream' }), h('dd', { text: integration.stream }),
        h('dt', { text: 'Dead letters' }), h('dd', { class: 'dead-letters', text: integration.deadLetters }),
        integration.pending ? [h('dt', { text: 'Waiting' }), h('dd', { text: integration.pending })] : null),
      h('div', { class: 'table-wrap' }, h('table', {},
        h('caption', { class: 'sr-only', text: 'Shards of ' + integration.name }),
        h('thead', {}, h('tr', {},
          h('th', { scope: 'col', text: 'Shard' }),
          h('th', { scope: 'col', text: 'State' }),
          h('th', { scope: 'col', text: 'Checkpoint' }),
          h('th', { scope: 'col', text: 'Lag' }),
          h('th', { scope: 'col', text: 'Records read' }),
          h('th', { scope: 'col', text: 'Records/s' }),
          h('th', { scope: 'col', text: 'Failed' }),
          h('th', { scope: 'col', text: 'In flight' }),
          h('th', { scope: 'col', text: 'Last error' }))),
        h('tbody', {}, rows.length ? rows : h('tr', {}, h('td', { colspan: 9, class: 'empty', text: 'No shard listed yet.' }))))));
  }

  // --------------------------------------------------------- converters --

  const DEFAULT_UPLINK = '{"devName": "kitchen_thermostat", "devType": "thermostat", "temperature": 22}';
  const DEFAULT_DOWNLINK = '{"version": "v.0.11"}';

  function convertersPage() {
    markNav('converters');
    const content = h('div');
    showPage('Converter test', h('h1', { text: 'Converter test' }),
      h('p', { class: 'hint', text: 'Runs a converter on a payload you give, on the same converter pool and with the same checks as the running service. Nothing is stored or sent. Edits to the script are for this test only: the files stay the source of truth.' }),
      content);
    api('GET', '/api/shardflow/converters').then((answer) => {
      content.replaceChildren(converterForm(answer.converters));
    }).catch((e) => { if (e.status !== 401) content.replaceChildren(errorBox(e)); });
  }

  function converterForm(converters) {
    const integration = h('select', { id: 'conv-integration', name: 'integration' },
      ...converters.map((c) => h('option', { value: c.integration, text: c.integration })));
    const kindUp = h('input', { type: 'radio', name: 'kind', id: 'conv-kind-uplink', value: 'uplink', checked: true });
    const kindDown = h('input', { type: 'radio', name: 'kind', id: 'conv-kind-downlink', value: 'downlink' });
    const file = h('p', { class: 'hint', id: 'conv-file' });
    const script = h('textarea', { id: 'conv-script', name: 'script', rows: 14, spellcheck: 'false', class: 'code', 'aria-describedby': 'conv-file' });
    const reset = h('button', { type: 'button', text: 'Reset to the file' });
    const types = ['TEXT', 'JSON', 'BASE64'].map((t) => h('input', { type: 'radio', name: 'payloadType', id: 'conv-type-' + t, value: t, checked: t === 'JSON' }));
    const typeLabels = { TEXT: 'Text', JSON: 'JSON', BASE64: 'Base64' };
    const payloadLabel = h('label', { for: 'conv-payload', text: 'Payload' });
    const payload = h('textarea', { id: 'conv-payload', name: 'payload', rows: 5, spellcheck: 'false', class: 'code', value: DEFAULT_UPLINK });
    const metadata = h('textarea', { id: 'conv-metadata', name: 'metadata', rows: 5, spellcheck: 'false', class: 'code', 'aria-describedby': 'conv-metadata-hint' });
    const metadataHint = h('p', { class: 'hint', id: 'conv-metadata-hint' });
    const msgTypeRow = h('div', { class: 'field', hidden: true },
      h('label', { for: 'conv-msgtype', text: 'Message type' }),
      h('input', { id: 'conv-msgtype', name: 'msgType', type: 'text', value: 'ATTRIBUTES_UPDATED' }));
    const run = h('button', { type: 'submit', class: 'primary', text: 'Run test' });
    const result = h('section', { id: 'conv-result', 'aria-live': 'polite', 'aria-labelledby': 'conv-result-title' });

    const current = () => converters.find((c) => c.integration === integration.value) || converters[0];
    const kind = () => (kindDown.checked ? 'downlink' : 'uplink');
    function fill() {
      const c = current();
      const down = kind() === 'downlink';
      const s = down ? c.downlink : c.uplink;
      script.value = s ? s.body : '';
      script.disabled = !s;
      file.textContent = s ? 'File: ' + s.file : 'This integration has no downlink converter.';
      payload.value = down ? DEFAULT_DOWNLINK : DEFAULT_UPLINK;
      payloadLabel.textContent = down ? 'Message (msg)' : 'Payload';
      metadata.value = JSON.stringify(down
        ? { deviceName: 'kitchen_thermostat', deviceType: 'thermostat', scope: 'SHARED_SCOPE' }
        : { streamName: c.stream, shardId: 'shardId-000000000000', partitionKey: '123', sequenceNumber: '0' }, null, 2);
      metadataHint.textContent = down
        ? 'The message metadata, a JSON object of strings.'
        : 'A JSON object with any of streamName, shardId, partitionKey, sequenceNumber, approximateArrivalTimestamp, subSequenceNumber and explicitHashKey (the last two for a user record of a KPL aggregate; integrationName is the integration).';
      msgTypeRow.hidden = !down;
      types[1].checked = true;
    }
    integration.addEventListener('change', fill);
    kindUp.addEventListener('change', fill);
    kindDown.addEventListener('change', fill);
    reset.addEventListener('click', () => {
      const c = current();
      const s = kind() === 'downlink' ? c.downlink : c.uplink;
      script.value = s ? s.body : '';
    });

    const form = h('form', { class: 'converter card' },
      h('div', { class: 'field' }, h('label', { for: 'conv-integration', text: 'Integration' }), integration),
      h('fieldset', {}, h('legend', { text: 'Converter' }),
        h('span', { class: 'choice' }, kindUp, h('label', { for: 'conv-kind-uplink', text: 'Uplink (Decoder)' })),
        h('span', { class: 'choice' }, kindDown, h('label', { for: 'conv-kind-downlink', text: 'Downlink (Encoder)' }))),
      h('div', { class: 'field' }, h('label', { for: 'conv-script', text: 'Script' }), file, script, h('div', {}, reset)),
      h('fieldset', {}, h('legend', { text: 'Payload is' }),
        ...types.map((t) => h('span', { class: 'choice' }, t, h('label', { for: t.id, text: typeLabels[t.value] })))),
      h('div', { class: 'field' }, payloadLabel, payload),
      h('div', { class: 'field' }, h('label', { for: 'conv-metadata', text: 'Metadata' }), metadataHint, metadata),
      msgTypeRow,
      h('div', { class: 'actions' }, run));
    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      let meta;
      try {
        meta = metadata.value.trim() ? JSON.parse(metadata.value) : {};
      } catch (e) {
        result.replaceChildren(h('h2', { id: 'conv-result-title', text: 'Result' }),
          h('p', { class: 'error', role: 'alert', text: 'The metadata is not valid JSON: ' + e.message }));
        metadata.focus();
        return;
      }
      const payloadType = types.find((t) => t.checked).value;
      run.disabled = true;
      try {
        const answer = await api('POST', '/api/shardflow/converters/test', {
          integration: integration.value,
          kind: kind(),
          script: script.value,
          payload: payload.value,
          payloadType,
          metadata: meta,
          msgType: document.getElementById('conv-msgtype').value,
        });
        const parts = [h('h2', { id: 'conv-result-title', text: 'Result' })];
        if (answer.ok) {
          parts.push(h('p', { class: 'ok', text: 'The converter ran; this is its output as shardflow reads it.' }),
            h('pre', { class: 'code', id: 'conv-output', tabindex: 0, text: JSON.stringify(answer.output, null, 2) }));
        } else {
          parts.push(h('p', { class: 'error', role: 'alert', id: 'conv-error', text: answer.error }));
        }
        if (answer.returned !== null && answer.returned !== undefined) {
          parts.push(h('details', {}, h('summary', { text: 'What the script returned' }),
            h('pre', { class: 'code', tabindex: 0, text: JSON.stringify(answer.returned, null, 2) })));
        }
        result.replaceChildren(...parts);
      } catch (e) {
        if (e.status !== 401) {
          result.replaceChildren(h('h2', { id: 'conv-result-title', text: 'Result' }),
            h('p', { class: 'error', role: 'alert', id: 'conv-error', text: e.message }));
        }
      } finally {
        run.disabled = false;
      }
    });
    fill();
    return h('div', { class: 'converter-page' }, form, result);
  }

  // ------------------------------------------------------------- routing --

  function route() {
    if (!session.csrf && !session.user) return;
    const hash = location.hash.replace(/^#/, '') || '/devices';
    const [path, queryText] = hash.split('?');
    const params = new URLSearchParams(queryText || '');
    const parts = path.split('/').filter(Boolean);
    switch (parts[0]) {
      case 'device':
        return devicePage(parts[1], parts[2]);
      case 'chains':
        return chainsPage();
      case 'integrations':
        return integrationsPage();
      case 'converters':
        return convertersPage();
      default:
        return devicesPage(params);
    }
  }

  async function start() {
    document.getElementById('logout').addEventListener('click', logout);
    window.addEventListener('hashchange', route);
    try {
      const info = await api('GET', '/api/shardflow/session');
      startSession(info);
      route();
    } catch (e) {
      if (e.status !== 401) {
        showPage('Error', h('h1', { text: 'shardflow' }), errorBox(e));
      }
    }
  }

  start();
})();
