//! Where the Kinesis credentials come from, through aws-config: instance
//! metadata, assume-role through STS, environment variables, a shared
//! profile, container credentials and a web identity token. Stand-ins on
//! 127.0.0.1 play the instance metadata service, the container credentials
//! endpoint and STS, each handing out its own access key id; a proxy in
//! front of the emulator reads the access key id of every Kinesis call's
//! Authorization header, which shows that the credentials handed out are
//! the ones that sign. Nothing here reaches 169.254.169.254 or AWS: every
//! endpoint is set, and the service runs with a clean AWS environment.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Requests the stand-ins answered, as text lines.
type Seen = Arc<Mutex<Vec<String>>>;

const EXPIRES: &str = "2099-01-01T00:00:00Z";

fn credentials_json(key: &str) -> String {
    format!(
        r#"{{"Code": "Success", "LastUpdated": "2026-01-01T00:00:00Z", "Type": "AWS-HMAC",
            "AccessKeyId": "{key}", "SecretAccessKey": "stand-in-secret",
            "Token": "stand-in-token", "Expiration": "{EXPIRES}"}}"#
    )
}

async fn imds_token(State(seen): State<Seen>, headers: HeaderMap) -> impl IntoResponse {
    let ttl = headers
        .get("x-aws-ec2-metadata-token-ttl-seconds")
        .is_some();
    seen.lock().unwrap().push(format!("imds token ttl={ttl}"));
    (
        [("x-aws-ec2-metadata-token-ttl-seconds", "21600")],
        "imds-token",
    )
}

fn imds_authorized(headers: &HeaderMap) -> bool {
    headers
        .get("x-aws-ec2-metadata-token")
        .is_some_and(|t| t == "imds-token")
}

async fn imds_role(State(seen): State<Seen>, headers: HeaderMap) -> impl IntoResponse {
    seen.lock().unwrap().push("imds role".into());
    if !imds_authorized(&headers) {
        return (StatusCode::UNAUTHORIZED, String::new());
    }
    (StatusCode::OK, "shardflow-role".into())
}

async fn imds_credentials(State(seen): State<Seen>, headers: HeaderMap) -> impl IntoResponse {
    seen.lock().unwrap().push("imds credentials".into());
    if !imds_authorized(&headers) {
        return (StatusCode::UNAUTHORIZED, String::new());
    }
    (StatusCode::OK, credentials_json("ASIAIMDSSTANDIN"))
}

async fn container_credentials(State(seen): State<Seen>) -> impl IntoResponse {
    seen.lock().unwrap().push("container credentials".into());
    credentials_json("ASIACONTAINERSTANDIN")
}

/// STS: AssumeRole (signed with the base credentials) and
/// AssumeRoleWithWebIdentity (unsigned), form-encoded, XML answers.
async fn sts(State(seen): State<Seen>, headers: HeaderMap, body: String) -> impl IntoResponse {
    let form: std::collections::HashMap<String, String> = form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let signed_by = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(access_key_of)
        .unwrap_or_default();
    let field = |name: &str| form.get(name).cloned().unwrap_or_default();
    let action = field("Action");
    seen.lock().unwrap().push(format!(
        "sts {action} signed_by={signed_by} role={} external_id={} session={} token={}",
        field("RoleArn"),
        field("ExternalId"),
        field("RoleSessionName"),
        field("WebIdentityToken"),
    ));
    let key = match action.as_str() {
        "AssumeRole" => "ASIAASSUMEDSTANDIN",
        "AssumeRoleWithWebIdentity" => "ASIAWEBIDSTANDIN",
        _ => return (StatusCode::BAD_REQUEST, String::new()),
    };
    let xml = format!(
        r#"<{action}Response xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <{action}Result>
    <Credentials>
      <AccessKeyId>{key}</AccessKeyId>
      <SecretAccessKey>stand-in-secret</SecretAccessKey>
      <SessionToken>stand-in-token</SessionToken>
      <Expiration>{EXPIRES}</Expiration>
    </Credentials>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::123456789012:assumed-role/shardflow/{session}</Arn>
      <AssumedRoleId>AROASTANDIN:{session}</AssumedRoleId>
    </AssumedRoleUser>
  </{action}Result>
  <ResponseMetadata><RequestId>stand-in</RequestId></ResponseMetadata>
</{action}Response>"#,
        session = field("RoleSessionName"),
    );
    (StatusCode::OK, xml)
}

/// The access key id of a SigV4 Authorization header.
fn access_key_of(header: &str) -> Option<String> {
    let start = header.find("Credential=")? + "Credential=".len();
    let rest = &header[start..];
    Some(rest[..rest.find('/')?].to_string())
}

/// A server on 127.0.0.1 running on a thread of its own until dropped.
struct Background {
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Background {
    fn start<F, Fut>(serve: F) -> Background
    where
        F: FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + 'static,
    {
        let (ready, address) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                ready.send(listener.local_addr().unwrap()).unwrap();
                tokio::select! {
                    _ = serve(listener) => {}
                    _ = stopped => {}
                }
            });
        });
        let address = address.recv().unwrap();
        Background {
            url: format!("http://{address}"),
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The metadata, container credentials and STS stand-ins on one port.
struct StandIns {
    url: String,
    seen: Seen,
    _server: Background,
}

impl StandIns {
    fn start() -> StandIns {
        let seen: Seen = Arc::default();
        let app = axum::Router::new()
            .route("/latest/api/token", axum::routing::put(imds_token))
            .route(
                "/latest/meta-data/iam/security-credentials/",
                get(imds_role),
            )
            .route(
                "/latest/meta-data/iam/security-credentials/shardflow-role",
                get(imds_credentials),
            )
            .route("/container-credentials", get(container_credentials))
            .route("/", post(sts))
            .with_state(seen.clone());
        let server = Background::start(move |listener| async move {
            axum::serve(listener, app).await.unwrap();
        });
        StandIns {
            url: server.url.clone(),
            seen,
            _server: server,
        }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

/// A TCP proxy in front of the emulator that notes the access key id of
/// every request passing through.
struct SigningProxy {
    url: String,
    keys: Arc<Mutex<BTreeSet<String>>>,
    _server: Background,
}

impl SigningProxy {
    fn start(upstream: &str) -> SigningProxy {
        let upstream: SocketAddr = upstream.trim_start_matches("http://").parse().unwrap();
        let keys: Arc<Mutex<BTreeSet<String>>> = Arc::default();
        let noted = keys.clone();
        let server = Background::start(move |listener| async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                tokio::task::spawn_local(proxy(client, upstream, noted.clone()));
            }
        });
        SigningProxy {
            url: server.url.clone(),
            keys,
            _server: server,
        }
    }

    fn keys(&self) -> BTreeSet<String> {
        self.keys.lock().unwrap().clone()
    }
}

async fn proxy(
    client: tokio::net::TcpStream,
    upstream: SocketAddr,
    noted: Arc<Mutex<BTreeSet<String>>>,
) {
    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
        return;
    };
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let requests = async move {
        let mut buffer = [0u8; 16 * 1024];
        let mut tail = String::new();
        loop {
            let n = match from_client.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            // Headers may be split over reads: keep a tail.
            let text = format!("{tail}{}", String::from_utf8_lossy(&buffer[..n]));
            let mut rest = text.as_str();
            while let Some(key) = access_key_of(rest) {
                noted.lock().unwrap().insert(key);
                let at = rest.find("Credential=").unwrap() + "Credential=".len();
                rest = &rest[at..];
            }
            let keep = text.len().saturating_sub(200);
            let keep = (keep..=text.len())
                .find(|i| text.is_char_boundary(*i))
                .unwrap_or(text.len());
            tail = text[keep..].to_string();
            if to_server.write_all(&buffer[..n]).await.is_err() {
                break;
            }
        }
        let _ = to_server.shutdown().await;
    };
    let answers = async move {
        let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
        let _ = to_client.shutdown().await;
    };
    tokio::join!(requests, answers);
}

/// Runs the service with `credentials` and `env` through the proxy until
/// the walkthrough record is stored; returns the access key ids that
/// signed its Kinesis calls.
async fn signing_keys(
    stream: &str,
    credentials: &str,
    env: Vec<(String, String)>,
) -> (BTreeSet<String>, String) {
    let emulator = Emulator::start();
    let kinesis = emulator.client().await;
    create_stream(&kinesis, stream, 1).await;
    put(&kinesis, stream, "123", WALKTHROUGH_RECORD.as_bytes()).await;
    let proxy = SigningProxy::start(&emulator.endpoint);

    let mut setup = Setup::walkthrough(stream);
    setup.credentials = credentials.to_string();
    setup.endpoint = Some(proxy.url.clone());
    setup.env = env;
    let mut service = Service::start(&setup, &emulator).await;
    let device = service.wait_device("kitchen_thermostat").await;
    let id = device["id"]["id"].as_str().unwrap().to_string();
    service.wait_latest(&id, "temperature").await;
    let log = service.log();
    (proxy.keys(), log)
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn only(key: &str) -> BTreeSet<String> {
    [key.to_string()].into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_metadata_credentials_sign_the_kinesis_calls() {
    let stand_ins = StandIns::start();
    let (keys, log) = signing_keys(
        "imds",
        "use_instance_metadata = true",
        env(&[
            ("AWS_EC2_METADATA_DISABLED", "false"),
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT", &stand_ins.url),
        ]),
    )
    .await;
    assert_eq!(keys, only("ASIAIMDSSTANDIN"), "{log}");
    let seen = stand_ins.seen();
    assert!(
        seen.contains(&"imds token ttl=true".to_string()),
        "IMDSv2 token first: {seen:?}"
    );
    assert!(seen.contains(&"imds credentials".to_string()), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assumed_role_signs_the_kinesis_calls() {
    let stand_ins = StandIns::start();
    let credentials = format!(
        r#"access_key_id = "AKIABASESTANDIN"
secret_access_key = "base-secret"
role_arn = "arn:aws:iam::123456789012:role/shardflow"
external_id = "ext-42"
role_session_name = "sf-test"
sts_endpoint_url = "{}""#,
        stand_ins.url
    );
    let (keys, log) = signing_keys("assume", &credentials, Vec::new()).await;
    assert_eq!(keys, only("ASIAASSUMEDSTANDIN"), "{log}");
    let seen = stand_ins.seen();
    assert!(
        seen.iter().any(|s| s
            == "sts AssumeRole signed_by=AKIABASESTANDIN role=arn:aws:iam::123456789012:role/shardflow external_id=ext-42 session=sf-test token="),
        "{seen:?}"
    );
    assert!(!log.contains("base-secret"), "secret in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_variables_sign_the_kinesis_calls() {
    let (keys, log) = signing_keys(
        "env",
        "",
        env(&[
            ("AWS_ACCESS_KEY_ID", "AKIAENVSTANDIN"),
            ("AWS_SECRET_ACCESS_KEY", "env-secret"),
        ]),
    )
    .await;
    assert_eq!(keys, only("AKIAENVSTANDIN"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_profile_signs_the_kinesis_calls() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("credentials");
    std::fs::write(
        &file,
        "[default]\naws_access_key_id = AKIADEFAULTSTANDIN\naws_secret_access_key = d\n\n\
         [standin]\naws_access_key_id = AKIAPROFILESTANDIN\naws_secret_access_key = p\n",
    )
    .unwrap();
    let (keys, log) = signing_keys(
        "profile",
        "",
        env(&[
            ("AWS_SHARED_CREDENTIALS_FILE", file.to_str().unwrap()),
            ("AWS_PROFILE", "standin"),
        ]),
    )
    .await;
    assert_eq!(keys, only("AKIAPROFILESTANDIN"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_credentials_sign_the_kinesis_calls() {
    let stand_ins = StandIns::start();
    let uri = format!("{}/container-credentials", stand_ins.url);
    let (keys, log) = signing_keys(
        "container",
        "",
        env(&[("AWS_CONTAINER_CREDENTIALS_FULL_URI", &uri)]),
    )
    .await;
    assert_eq!(keys, only("ASIACONTAINERSTANDIN"), "{log}");
    assert!(stand_ins
        .seen()
        .contains(&"container credentials".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_identity_token_signs_the_kinesis_calls() {
    let stand_ins = StandIns::start();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "stand-in-web-identity").unwrap();
    let (keys, log) = signing_keys(
        "webid",
        "",
        env(&[
            ("AWS_WEB_IDENTITY_TOKEN_FILE", token.to_str().unwrap()),
            ("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/web"),
            ("AWS_ROLE_SESSION_NAME", "web-session"),
            ("AWS_ENDPOINT_URL_STS", &stand_ins.url),
        ]),
    )
    .await;
    assert_eq!(keys, only("ASIAWEBIDSTANDIN"), "{log}");
    let seen = stand_ins.seen();
    assert!(
        seen.iter()
            .any(|s| s.starts_with("sts AssumeRoleWithWebIdentity")
                && s.ends_with("token=stand-in-web-identity")),
        "{seen:?}"
    );
}
