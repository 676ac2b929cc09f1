// The AWS Kinesis walkthrough done through shardflow's pages, in a real
// headless Chromium (Debian's /usr/bin/chromium, driven by playwright-core).
//
// The test starts the Kinesis emulator example and shardflow itself (real
// binaries, real processes) on free loopback ports with a config of its own
// in a temporary directory, creates the walkthrough's streams with the aws
// CLI, then in the browser: logs in, sees kitchen_thermostat appear in the
// device list without a reload after the seed record is put, opens it,
// reads temperature 22, adds the shared attribute version = v.0.11 on the
// Attributes tab, and checks with the aws CLI that the downlink record
// arrives on tb-test-downlink. It visits every page, keeps a screenshot of
// each in target/browser-artifacts/, and checks the session cookie and
// CSRF rules (a cross-origin form POST is refused).
//
// Binaries: $SHARDFLOW_BIN and $EMULATOR_BIN (default target/debug/...),
// the browser: $CHROMIUM (default /usr/bin/chromium), the aws CLI: the
// `aws` on PATH (scripts/test puts .venv/bin first). Every wait polls
// against a generous deadline; nothing asserts on speed.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFile } from 'node:child_process';
import { promisify } from 'node:util';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const run = promisify(execFile);
const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const SHARDFLOW_BIN = process.env.SHARDFLOW_BIN || path.join(ROOT, 'target/debug/shardflow');
const EMULATOR_BIN = process.env.EMULATOR_BIN || path.join(ROOT, 'target/debug/examples/kinesis-emulator');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const ARTIFACTS = path.join(ROOT, 'target/browser-artifacts');

const USERNAME = 'tenant@thingsboard.org';
const PASSWORD = 'tenant';
const SEED = '{"devName": "kitchen_thermostat", "devType": "thermostat", "temperature": 22}';
const EXPECTED_DOWNLINK = '{"devName":"kitchen_thermostat","version":"v.0.11"}';
const TIMEOUT = 60_000;

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'shardflow-browser-'));
const processes = [];
let browser = null;
let env = null;
let endpoint = null;
let api = null;

function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
    server.on('error', reject);
  });
}

async function waitFor(what, probe, timeout = TIMEOUT) {
  const deadline = Date.now() + timeout;
  let lastError = null;
  for (;;) {
    try {
      const value = await probe();
      if (value) return value;
    } catch (e) {
      lastError = e;
    }
    for (const p of processes) {
      if (p.child.exitCode !== null) throw new Error(`${p.name} exited (${p.child.exitCode}) while waiting for ${what}\n${p.tail()}`);
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}; last error: ${lastError}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

function start(name, args) {
  const logPath = path.join(tmp, name + '.log');
  const log = fs.openSync(logPath, 'w');
  const child = spawn(args[0], args.slice(1), { env, stdio: ['ignore', log, log] });
  const entry = {
    name,
    child,
    tail: () => `---- last lines of ${logPath} ----\n` + fs.readFileSync(logPath, 'utf8').split('\n').slice(-40).join('\n'),
  };
  processes.push(entry);
  return entry;
}

async function stop(entry) {
  if (entry.child.exitCode !== null || entry.child.signalCode !== null) return;
  const exited = new Promise((resolve) => entry.child.once('exit', resolve));
  entry.child.kill('SIGTERM');
  // shardflow lets records in flight finish for up to 30 s.
  const timer = setTimeout(() => entry.child.kill('SIGKILL'), 40_000);
  await exited;
  clearTimeout(timer);
}

async function aws(...args) {
  const { stdout } = await run('aws', [...args, '--endpoint-url', endpoint], { env, timeout: TIMEOUT });
  return stdout.trim() ? JSON.parse(stdout) : null;
}

function httpStatus(url) {
  return new Promise((resolve) => {
    const req = http.get(url, (res) => { res.resume(); resolve(res.statusCode); });
    req.on('error', () => resolve(0));
    req.setTimeout(5000, () => { req.destroy(); resolve(0); });
  });
}

async function downlinkRecords() {
  const iterator = await aws('kinesis', 'get-shard-iterator', '--shard-id', 'shardId-000000000000',
    '--shard-iterator-type', 'TRIM_HORIZON', '--stream-name', 'tb-test-downlink');
  return (await aws('kinesis', 'get-records', '--shard-iterator', iterator.ShardIterator)).Records;
}

async function screenshot(page, name) {
  await page.screenshot({ path: path.join(ARTIFACTS, name + '.png'), fullPage: true });
}

before(async () => {
  for (const [file, variable] of [[SHARDFLOW_BIN, 'SHARDFLOW_BIN'], [EMULATOR_BIN, 'EMULATOR_BIN'], [CHROMIUM, 'CHROMIUM']]) {
    try {
      fs.accessSync(file, fs.constants.X_OK);
    } catch (e) {
      throw new Error(`${file} is not an executable; build it (cargo build --bins --examples) / install it, or set ${variable}`);
    }
  }
  fs.rmSync(ARTIFACTS, { recursive: true, force: true });
  fs.mkdirSync(ARTIFACTS, { recursive: true });

  // Dummy AWS credentials, no instance metadata, none of the user's AWS
  // configuration; loopback never through a proxy.
  env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('AWS_')));
  fs.writeFileSync(path.join(tmp, 'aws-config'), '');
  fs.writeFileSync(path.join(tmp, 'aws-credentials'), '');
  Object.assign(env, {
    AWS_ACCESS_KEY_ID: 'local',
    AWS_SECRET_ACCESS_KEY: 'local',
    AWS_DEFAULT_REGION: 'us-east-1',
    AWS_REGION: 'us-east-1',
    AWS_EC2_METADATA_DISABLED: 'true',
    AWS_CONFIG_FILE: path.join(tmp, 'aws-config'),
    AWS_SHARED_CREDENTIALS_FILE: path.join(tmp, 'aws-credentials'),
    AWS_PAGER: '',
    NO_COLOR: '1',
    NO_PROXY: '127.0.0.1,localhost',
    no_proxy: '127.0.0.1,localhost',
  });

  const kinesisPort = await freePort();
  endpoint = `http://127.0.0.1:${kinesisPort}`;
  start('kinesis-emulator', [EMULATOR_BIN, String(kinesisPort)]);
  await waitFor('the emulator', () => new Promise((resolve) => {
    const socket = net.connect(kinesisPort, '127.0.0.1', () => { socket.end(); resolve(true); });
    socket.on('error', () => resolve(false));
  }));
  for (const stream of ['tb-test-uplink', 'tb-test-downlink']) {
    await aws('kinesis', 'create-stream', '--stream-name', stream, '--shard-count', '1');
  }
  for (const stream of ['tb-test-uplink', 'tb-test-downlink']) {
    await waitFor(`stream ${stream} ACTIVE`, async () =>
      (await aws('kinesis', 'describe-stream', '--stream-name', stream)).StreamDescription.StreamStatus === 'ACTIVE');
  }

  // The walkthrough's default position: LATEST. Ready means every shard
  // has its iterator, so a record put after that is read.
  const httpPort = await freePort();
  api = `http://127.0.0.1:${httpPort}`;
  const config = path.join(tmp, 'shardflow.toml');
  fs.writeFileSync(config, `
data_dir = ${JSON.stringify(path.join(tmp, 'data'))}
root_chain = ${JSON.stringify(path.join(ROOT, 'rulechains/root.json'))}

[http]
bind = "127.0.0.1:${httpPort}"
username = "${USERNAME}"
password = "${PASSWORD}"

[[integration]]
name = "kinesis_integration"
uplink_converter = ${JSON.stringify(path.join(ROOT, 'converters/kinesis_converter.js'))}
downlink_converter = ${JSON.stringify(path.join(ROOT, 'converters/kinesis_downlink_version.js'))}
stream_name = "tb-test-uplink"
region = "us-east-1"
access_key_id = "local"
secret_access_key = "local"
application_name = "shardflow"
initial_position = "LATEST"
endpoint_url = "${endpoint}"
`);
  start('shardflow', [SHARDFLOW_BIN, 'run', '--config', config]);
  await waitFor(`${api}/ready`, async () => (await httpStatus(`${api}/ready`)) === 200);

  // A fresh user-data dir (a persistent context in a new directory).
  browser = await chromium.launchPersistentContext(path.join(tmp, 'chromium-profile'), {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1280, height: 860 },
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--no-first-run'],
  });
});

after(async () => {
  if (browser) await browser.close();
  for (const p of processes.slice().reverse()) await stop(p);
  if (process.exitCode) {
    for (const p of processes) console.log(p.tail());
  }
  fs.rmSync(tmp, { recursive: true, force: true });
});

test('the walkthrough through the pages, every page, and the session rules', async (t) => {
  const context = browser;
  const page = context.pages()[0] || await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  // Any script error or CSP violation on a page fails the test.
  const problems = [];
  page.on('pageerror', (e) => problems.push('page error: ' + e.message));
  page.on('console', (m) => { if (m.type() === 'error' && !/status of 40[13]/.test(m.text())) problems.push('console: ' + m.text()); });

  // The page and its headers.
  const response = await page.goto(api + '/');
  const headers = response.headers();
  assert.match(headers['content-security-policy'], /frame-ancestors 'none'/);
  assert.match(headers['content-security-policy'], /script-src 'self'/);
  assert.doesNotMatch(headers['content-security-policy'], /unsafe-inline/);
  assert.equal(headers['x-content-type-options'], 'nosniff');
  assert.equal(headers['access-control-allow-origin'], undefined);

  // Log in.
  await page.getByRole('heading', { name: 'Log in to shardflow' }).waitFor();
  await screenshot(page, '01-login');
  await page.getByLabel('Username').fill(USERNAME);
  await page.getByLabel('Password').fill('wrong');
  await page.getByRole('button', { name: 'Log in' }).click();
  await page.getByText('Wrong username or password.').waitFor();
  await page.getByLabel('Password').fill(PASSWORD);
  await page.getByRole('button', { name: 'Log in' }).click();
  await page.getByRole('heading', { name: 'Devices', level: 1 }).waitFor();
  await page.getByText('No devices yet').waitFor();

  await t.test('the session cookie is HttpOnly, SameSite=Strict, Path=/, and not readable by scripts', async () => {
    const cookies = await context.cookies(api);
    const session = cookies.find((c) => c.name === 'shardflow_session');
    assert.ok(session, JSON.stringify(cookies));
    assert.equal(session.httpOnly, true);
    assert.equal(session.sameSite, 'Strict');
    assert.equal(session.path, '/');
    assert.equal(await page.evaluate(() => document.cookie), '');
  });

  // The seed record: the device shows up in the open list, no reload.
  await page.evaluate(() => { window.__noReload = 'still the same page'; });
  await aws('kinesis', 'put-record', '--stream-name', 'tb-test-uplink', '--partition-key', '123', '--data', SEED);
  const deviceLink = page.getByRole('link', { name: 'kitchen_thermostat' });
  await deviceLink.waitFor();
  assert.equal(await page.evaluate(() => window.__noReload), 'still the same page');
  const row = page.locator('#devices tbody tr', { has: deviceLink });
  assert.equal(await row.locator('td').first().textContent(), 'thermostat');
  await screenshot(page, '02-devices');

  // Search narrows the list.
  await page.getByLabel('Search by name').fill('nothing-like-this');
  await page.getByText('No device name contains').waitFor();
  await page.getByLabel('Search by name').fill('kitchen');
  await deviceLink.waitFor();

  // The device: latest telemetry.
  await deviceLink.click();
  await page.getByRole('heading', { name: 'kitchen_thermostat', level: 1 }).waitFor();
  const temperature = page.locator('#latest tr[data-key="temperature"] td.value');
  await temperature.waitFor();
  assert.equal(await temperature.textContent(), '22');
  await screenshot(page, '03-device-latest');

  // Its chart.
  await page.getByRole('tab', { name: 'Chart' }).click();
  await page.locator('svg.plot circle.dot').first().waitFor();
  assert.equal(await page.getByLabel('Telemetry key').inputValue(), 'temperature');
  await screenshot(page, '04-device-chart');

  // Attributes tab, reached with the keyboard from the Chart tab.
  await page.getByRole('tab', { name: 'Chart' }).press('ArrowRight');
  assert.equal(await page.getByRole('tab', { name: 'Attributes' }).getAttribute('aria-selected'), 'true');
  const shared = page.locator('section[data-scope="SHARED_SCOPE"]');
  await shared.getByText('None.').waitFor();
  await shared.getByLabel('Key').fill('version');
  await shared.getByLabel('Type').selectOption('string');
  await shared.getByLabel('Value').fill('v.0.11');
  await shared.getByRole('button', { name: 'Save attribute' }).click();
  await shared.getByText('Saved version.').waitFor();
  const version = shared.locator('tr[data-key="version"] td.value');
  await version.waitFor();
  assert.equal(await version.textContent(), 'v.0.11');
  await screenshot(page, '05-device-attributes');

  // The downlink the save produced, read from the downlink stream.
  const records = await waitFor('a record on tb-test-downlink', async () => {
    const found = await downlinkRecords();
    return found.length ? found : null;
  });
  assert.equal(records.length, 1, JSON.stringify(records));
  assert.equal(Buffer.from(records[0].Data, 'base64').toString('utf8'), EXPECTED_DOWNLINK);
  assert.equal(records[0].PartitionKey, '123');

  await t.test('edit and delete a server attribute', async () => {
    const server = page.locator('section[data-scope="SERVER_SCOPE"]');
    await server.getByLabel('Key').fill('limit');
    await server.getByLabel('Type').selectOption('number');
    await server.getByLabel('Value').fill('5');
    await server.getByRole('button', { name: 'Save attribute' }).click();
    await server.locator('tr[data-key="limit"] td.value', { hasText: '5' }).waitFor();
    await server.getByRole('button', { name: 'Edit limit' }).click();
    await server.getByLabel('Value').fill('7');
    await server.getByRole('button', { name: 'Save attribute' }).click();
    await server.locator('tr[data-key="limit"] td.value', { hasText: '7' }).waitFor();
    await server.getByRole('button', { name: 'Delete limit' }).click();
    await server.getByRole('button', { name: 'Yes, delete limit' }).click();
    await server.getByText('Deleted limit.').waitFor();
    await server.getByText('None.').waitFor();
  });

  const deviceUrl = page.url();
  const deviceId = deviceUrl.split('/device/')[1].split('/')[0];

  // The other pages.
  await page.getByRole('link', { name: 'Integrations' }).click();
  const shard = page.locator('tr', { hasText: 'shardId-000000000000' });
  await shard.getByText('READING').waitFor();
  await waitFor('records read on the Integrations page', async () =>
    Number(await shard.locator('td').nth(3).textContent()) >= 1);
  await page.locator('.dead-letters', { hasText: '0' }).waitFor();
  await screenshot(page, '06-integrations');

  await page.getByRole('link', { name: 'Converters' }).click();
  await page.getByRole('heading', { name: 'Converter test' }).waitFor();
  await page.getByRole('button', { name: 'Run test' }).click();
  const output = page.locator('#conv-output');
  await output.waitFor();
  const converted = JSON.parse(await output.textContent());
  assert.equal(converted[0].name, 'kitchen_thermostat');
  assert.equal(converted[0].type, 'thermostat');
  assert.deepEqual(converted[0].telemetry[0].values, { temperature: 22 });
  await screenshot(page, '07-converters');
  // Base64 of a payload that is not JSON: the converter's error is shown.
  await page.getByLabel('Base64').check();
  await page.getByLabel('Payload').fill(Buffer.from('not json').toString('base64'));
  await page.getByRole('button', { name: 'Run test' }).click();
  await page.locator('#conv-error', { hasText: 'script threw' }).waitFor();
  // The downlink converter.
  await page.getByLabel('Downlink (Encoder)').check();
  await page.getByRole('button', { name: 'Run test' }).click();
  await page.locator('#conv-output', { hasText: 'tb-test-downlink' }).waitFor();
  assert.match(await page.locator('#conv-output').textContent(), /v\.0\.11/);
  await screenshot(page, '08-converters-downlink');

  await page.getByRole('link', { name: 'Rule chains' }).click();
  await page.getByRole('heading', { name: 'Rule chains', level: 1 }).waitFor();
  await page.locator('#reload-result', { hasText: 'Last reload succeeded' }).waitFor();
  // The root chain (the rule chain directory has example chains too).
  const root = page.getByRole('region', { name: 'Root Rule Chain (root)' });
  await root.locator('svg.graph g.node', { hasText: 'Integration Downlink' }).waitFor();
  await root.locator('svg.graph .edge-label', { hasText: 'Attributes Updated' }).waitFor();
  // Per-node counts: the seed record's one telemetry message was saved.
  await root.getByText('Nodes and connections as a table').click();
  const saveTimeseries = root.locator('details.nodes tr', { has: page.locator('th', { hasText: 'Save Timeseries' }) });
  await saveTimeseries.locator('td').nth(2).filter({ hasText: /^1$/ }).waitFor();
  await screenshot(page, '09-rule-chains');

  // Phone width: the device page still reads.
  await page.setViewportSize({ width: 390, height: 844 });
  await page.goto(api + '/#/device/' + deviceId + '/attributes');
  await page.getByRole('heading', { name: 'kitchen_thermostat', level: 1 }).waitFor();
  await page.locator('section[data-scope="SHARED_SCOPE"] tr[data-key="version"]').waitFor();
  await screenshot(page, '10-device-phone');
  await page.goto(api + '/#/devices');
  await page.getByRole('link', { name: 'kitchen_thermostat' }).waitFor();
  await screenshot(page, '11-devices-phone');
  await page.setViewportSize({ width: 1280, height: 860 });

  await t.test('state-changing requests with the cookie need the CSRF token and this origin', async () => {
    const base = `/api/plugins/telemetry/DEVICE/${deviceId}/attributes/SHARED_SCOPE`;
    // From the page itself, but without the CSRF token.
    const withoutToken = await page.evaluate(async (url) => (await fetch(url, {
      method: 'POST', headers: { 'Content-Type': 'application/json' }, body: '{"sneaky":1}',
    })).status, base);
    assert.equal(withoutToken, 403);

    // From another origin (another port of 127.0.0.1: the same site, so
    // the SameSite cookie is sent): a form that posts JSON as text/plain.
    const evilPort = await freePort();
    const evil = http.createServer((req, res) => {
      res.setHeader('content-type', 'text/html');
      res.end(`<!doctype html><form method="POST" enctype="text/plain" action="${api}${base}">` +
        '<input name=\'{"evil":"1","x":"\' value=\'"}\'></form>' +
        '<script>document.forms[0].submit()</script>');
    });
    await new Promise((resolve) => evil.listen(evilPort, '127.0.0.1', resolve));
    try {
      const attack = await context.newPage();
      const [answer] = await Promise.all([
        attack.waitForResponse((r) => r.url().startsWith(api) && r.request().method() === 'POST'),
        attack.goto(`http://127.0.0.1:${evilPort}/`),
      ]);
      assert.equal(answer.status(), 403);
      await attack.close();
    } finally {
      evil.close();
    }
    const stored = await page.evaluate(async (id) =>
      (await fetch(`/api/plugins/telemetry/DEVICE/${id}/values/attributes/SHARED_SCOPE`)).json(), deviceId);
    assert.deepEqual(stored.map((a) => a.key), ['version']);
    // The pages' own saves carry the token and pass (done above).
  });

  // Log out: the cookie is gone and the API refuses the old session.
  await page.getByRole('button', { name: 'Log out' }).click();
  await page.getByText('You are logged out.').waitFor();
  const left = (await context.cookies(api)).filter((c) => c.name === 'shardflow_session');
  assert.deepEqual(left, []);
  assert.equal(await page.evaluate(async () => (await fetch('/api/shardflow/session')).status), 401);
  await screenshot(page, '12-logged-out');

  assert.deepEqual(problems, []);
});
