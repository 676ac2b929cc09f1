"""The AWS Kinesis walkthrough, driven with ThingsBoard's official Python
client (`tb-rest-client`) and the real `aws` CLI.

The test starts the Kinesis emulator example and shardflow itself (real
binaries, real processes) on free loopback ports with a config of its own in
a temporary directory, then:

1. creates tb-test-uplink and tb-test-downlink and puts the walkthrough's
   record with the walkthrough's aws CLI commands (plus --endpoint-url);
2. with tb-rest-client: logs in, finds kitchen_thermostat, reads its latest
   temperature (22), saves the shared attribute version = v.0.11;
3. reads tb-test-downlink with aws kinesis get-shard-iterator / get-records
   and checks the one record the attribute save produced.

Binaries: $SHARDFLOW_BIN and $EMULATOR_BIN, by default target/debug/shardflow
and target/debug/examples/kinesis-emulator (`cargo build --bins --examples`).
The aws CLI is the `aws` on PATH (scripts/test puts .venv/bin first).

Every wait polls against a deadline; nothing asserts on speed.
"""

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from tb_rest_client.rest import ApiException
from tb_rest_client.rest_client import RestClient

ROOT = Path(__file__).resolve().parents[2]
SHARDFLOW_BIN = Path(os.environ.get("SHARDFLOW_BIN", ROOT / "target/debug/shardflow"))
EMULATOR_BIN = Path(os.environ.get("EMULATOR_BIN", ROOT / "target/debug/examples/kinesis-emulator"))

USERNAME = "tenant@thingsboard.org"
PASSWORD = "tenant"
UPLINK = "tb-test-uplink"
DOWNLINK = "tb-test-downlink"
SEED_DATA = '{"devName": "kitchen_thermostat", "devType": "thermostat", "temperature": 22}'
EXPECTED_DOWNLINK = b'{"devName":"kitchen_thermostat","version":"v.0.11"}'

# Upper bounds for waits; generous so a slow or loaded machine still passes.
START_TIMEOUT = 60
READY_TIMEOUT = 120
DATA_TIMEOUT = 60
AWS_TIMEOUT = 60


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, probe, timeout, processes=(), interval=0.2):
    """Calls probe() until it returns a truthy value or timeout seconds pass.
    Fails early if one of the processes exits."""
    deadline = time.monotonic() + timeout
    last_error = None
    while True:
        try:
            result = probe()
            if result:
                return result
        except Exception as e:  # noqa: BLE001 - reported if the wait times out
            last_error = e
        for proc in processes:
            if proc.poll() is not None:
                pytest.fail(f"{proc.name} exited with code {proc.returncode} while waiting for {what}\n"
                            f"{proc.log_tail()}")
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}; last error: {last_error!r}")
        time.sleep(interval)


class Process:
    """A started binary, its log file and its pid (for cleanup)."""

    def __init__(self, name, args, log_path, env):
        self.name = name
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.popen = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=env)

    @property
    def returncode(self):
        return self.popen.returncode

    def poll(self):
        return self.popen.poll()

    def log_tail(self, lines=40):
        try:
            text = Path(self.log_path).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return f"---- last lines of {self.log_path} ----\n" + "\n".join(text[-lines:])

    def stop(self):
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                # shardflow lets records in flight finish for up to 30 s.
                self.popen.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=15)
        self.log.close()


# Loopback traffic never goes through a proxy: urllib (below) uses no proxy
# at all, and requests (tb-rest-client's login) and the aws CLI honour
# NO_PROXY.
_LOCAL = "127.0.0.1,localhost"
for _var in ("NO_PROXY", "no_proxy"):
    os.environ[_var] = _LOCAL + ("," + os.environ[_var] if os.environ.get(_var) else "")
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_status(url):
    try:
        with _OPENER.open(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def local_env(tmp):
    """The environment for every process the test starts: dummy AWS
    credentials and region, no instance metadata, none of the user's AWS
    configuration (empty config and credentials files), plain-text logs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    (tmp / "aws-config").write_text("")
    (tmp / "aws-credentials").write_text("")
    env.update({
        "AWS_ACCESS_KEY_ID": "local",
        "AWS_SECRET_ACCESS_KEY": "local",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(tmp / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "aws-credentials"),
        "AWS_PAGER": "",
        "NO_COLOR": "1",
    })
    return env


class Aws:
    """The real aws CLI, only ever pointed at the emulator (--endpoint-url)."""

    def __init__(self, endpoint, env):
        exe = shutil.which("aws")
        if exe is None:
            pytest.fail("the aws CLI is not on PATH (scripts/test installs it into .venv)")
        self.exe = exe
        self.endpoint = endpoint
        self.env = env
        version = subprocess.run([exe, "--version"], env=env, capture_output=True, text=True,
                                 timeout=AWS_TIMEOUT)
        self.version = (version.stdout + version.stderr).strip()
        # v1 takes --data as text (as in the walkthrough); v2 needs this flag.
        self.data_format = (["--cli-binary-format", "raw-in-base64-out"]
                            if self.version.startswith("aws-cli/2.") else [])

    def __call__(self, *args):
        cmd = [self.exe, *args, "--endpoint-url", self.endpoint]
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=AWS_TIMEOUT)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return json.loads(done.stdout) if done.stdout.strip() else None


def write_config(path, data_dir, http_port, endpoint):
    """A config modeled on the shipped shardflow.toml, reading from the start
    of the stream (TRIM_HORIZON) so no record can be missed."""
    path.write_text(f"""\
data_dir = {json.dumps(str(data_dir))}
root_chain = {json.dumps(str(ROOT / "rulechains/root.json"))}

[http]
bind = "127.0.0.1:{http_port}"
username = "{USERNAME}"
password = "{PASSWORD}"

[[integration]]
name = "kinesis_integration"
uplink_converter = {json.dumps(str(ROOT / "converters/kinesis_converter.js"))}
downlink_converter = {json.dumps(str(ROOT / "converters/kinesis_downlink_version.js"))}
stream_name = "{UPLINK}"
region = "us-east-1"
access_key_id = "local"
secret_access_key = "local"
use_instance_metadata = false
use_enhanced_fan_out = false
application_name = "shardflow"
initial_position = "TRIM_HORIZON"
max_records = 1000
request_timeout_ms = 10000
endpoint_url = "{endpoint}"
""")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    for binary, var in ((SHARDFLOW_BIN, "SHARDFLOW_BIN"), (EMULATOR_BIN, "EMULATOR_BIN")):
        if not os.access(binary, os.X_OK):
            pytest.fail(f"{binary} is not an executable; build it with `cargo build --bins --examples` "
                        f"or set {var}")
    tmp = tmp_path_factory.mktemp("walkthrough")
    env = local_env(tmp)
    processes = []
    try:
        # The Kinesis emulator.
        kinesis_port = free_port()
        endpoint = f"http://127.0.0.1:{kinesis_port}"
        emulator = Process("kinesis-emulator", [str(EMULATOR_BIN), str(kinesis_port)],
                           tmp / "kinesis-emulator.log", env)
        processes.append(emulator)

        def emulator_up():
            with socket.create_connection(("127.0.0.1", kinesis_port), timeout=2):
                return True
        wait_for(f"the emulator on port {kinesis_port}", emulator_up, START_TIMEOUT, [emulator])

        # The walkthrough's streams, created with the walkthrough's commands.
        aws = Aws(endpoint, env)
        for stream in (UPLINK, DOWNLINK):
            aws("kinesis", "create-stream", "--stream-name", stream, "--shard-count", "1")
        for stream in (UPLINK, DOWNLINK):
            wait_for(f"stream {stream} to be ACTIVE",
                     lambda s=stream: aws("kinesis", "describe-stream", "--stream-name", s)
                     ["StreamDescription"]["StreamStatus"] == "ACTIVE",
                     AWS_TIMEOUT, [emulator])

        # shardflow, with a fresh data dir.
        http_port = free_port()
        api = f"http://127.0.0.1:{http_port}"
        config = tmp / "shardflow.toml"
        write_config(config, tmp / "data", http_port, endpoint)
        shardflow = Process("shardflow", [str(SHARDFLOW_BIN), "run", "--config", str(config)],
                            tmp / "shardflow.log", env)
        processes.append(shardflow)
        wait_for(f"shardflow {api}/ready", lambda: http_status(f"{api}/ready") == 200,
                 READY_TIMEOUT, [emulator, shardflow])

        yield {"api": api, "aws": aws, "processes": processes}
    finally:
        for proc in reversed(processes):
            proc.stop()
        # Shown by pytest only when a test fails.
        for proc in processes:
            print(proc.log_tail(60))


def test_walkthrough_with_tb_rest_client(stack):
    aws = stack["aws"]
    processes = stack["processes"]

    # Validate uplink: the walkthrough's put-record.
    put = aws("kinesis", "put-record", "--stream-name", UPLINK, "--partition-key", "123",
              "--data", SEED_DATA, *aws.data_format)
    assert put["ShardId"] == "shardId-000000000000"

    client = RestClient(base_url=stack["api"])
    client.login(username=USERNAME, password=PASSWORD)
    assert client.get_token()

    def find_device():
        try:
            return client.get_tenant_device("kitchen_thermostat")
        except ApiException as e:
            if e.status == 404:
                return None
            raise
    device = wait_for("device kitchen_thermostat", find_device, DATA_TIMEOUT, processes)
    assert device.name == "kitchen_thermostat"
    assert device.type == "thermostat"
    assert device.id.entity_type == "DEVICE"

    def latest_temperature():
        values = client.get_latest_timeseries(device.id, keys="temperature")
        return values if values.get("temperature") else None
    latest = wait_for("telemetry temperature of kitchen_thermostat", latest_temperature,
                      DATA_TIMEOUT, processes)
    # The client returns {key: [TsData(ts, value)]}. As ThingsBoard does,
    # values are strings unless useStrictDataTypes=true.
    assert len(latest["temperature"]) == 1, latest
    assert latest["temperature"][0].value == "22", latest
    assert latest["temperature"][0].ts > 0, latest
    strict = client.get_latest_timeseries(device.id, keys="temperature", use_strict_data_types=True)
    assert strict["temperature"][0].value == 22, strict

    # Validate downlink: the shared attribute triggers the Integration
    # Downlink node through the root chain's "Attributes Updated" relation.
    client.save_device_attributes(device.id, "SHARED_SCOPE", {"version": "v.0.11"})

    def downlink_records():
        iterator = aws("kinesis", "get-shard-iterator", "--shard-id", "shardId-000000000000",
                       "--shard-iterator-type", "TRIM_HORIZON", "--stream-name", DOWNLINK)
        return aws("kinesis", "get-records", "--shard-iterator", iterator["ShardIterator"])["Records"]
    records = wait_for(f"a record on {DOWNLINK}", downlink_records, DATA_TIMEOUT, processes)

    assert len(records) == 1, records
    record = records[0]
    assert base64.b64decode(record["Data"]) == EXPECTED_DOWNLINK, record
    assert record["PartitionKey"] == "123", record
