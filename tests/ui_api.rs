//! The endpoints behind the browser pages, against the real binary: the
//! pages and their security headers, cookie sessions with CSRF protection,
//! attribute delete through the rule chain, the live event stream, the
//! integration status and the converter test.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const COOKIE: &str = "shardflow_session";

/// The session cookie's value from a login answer's Set-Cookie header, and
/// the header itself.
fn session_cookie(response: &reqwest::Response) -> (String, String) {
    let header = response
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{COOKIE}=")))
        .expect("a session cookie is set")
        .to_string();
    let value = header
        .split(';')
        .next()
        .unwrap()
        .trim_start_matches(&format!("{COOKIE}="))
        .to_string();
    (value, header)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_sessions_and_csrf() {
    let emulator = Emulator::start();
    let kinesis = emulator.client().await;
    create_stream(&kinesis, "tb-test-uplink", 1).await;
    let mut service = Service::start(&Setup::walkthrough("tb-test-uplink"), &emulator).await;
    let base = service.base_url.clone();
    let http = reqwest::Client::new();

    // The pages are in the binary, with headers that keep other sites out.
    let page = http.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let headers = page.headers().clone();
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["x-frame-options"], "DENY");
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let html = page.text().await.unwrap();
    assert!(html.contains("/ui/app.js"), "{html}");
    assert!(!html.contains("<script>"), "no inline script: {html}");
    for (path, kind) in [
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
        ("/ui/icon.svg", "image/svg+xml"),
    ] {
        let asset = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(asset.status(), 200, "{path}");
        assert!(
            asset.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with(kind),
            "{path}"
        );
    }

    // No CORS: a preflight from another origin gets no permission.
    let preflight = http
        .request(
            reqwest::Method::OPTIONS,
            format!("{base}/api/tenant/devices"),
        )
        .header("origin", "http://evil.example")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert!(preflight
        .headers()
        .get("access-control-allow-origin")
        .is_none());

    // Logging in from another origin is refused; from the pages it sets an
    // HttpOnly, SameSite=Strict cookie and answers no token.
    let credentials = json!({"username": "tenant@thingsboard.org", "password": "tenant"});
    let foreign = http
        .post(format!("{base}/api/shardflow/login"))
        .header("origin", "http://evil.example")
        .json(&credentials)
        .send()
        .await
        .unwrap();
    assert_eq!(foreign.status(), 403);
    let login = http
        .post(format!("{base}/api/shardflow/login"))
        .header("origin", &base)
        .json(&credentials)
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200);
    let (cookie, set_cookie) = session_cookie(&login);
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age="] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    assert!(!set_cookie.contains("Secure"), "plain HTTP: {set_cookie}");
    let answer: Value = login.json().await.unwrap();
    let csrf = answer["csrfToken"].as_str().unwrap().to_string();
    assert_eq!(answer["username"], "tenant@thingsboard.org");
    assert!(
        !answer.to_string().contains(&cookie),
        "the token stays in the cookie"
    );

    // Behind a TLS proxy the cookie is Secure.
    let tls = http
        .post(format!("{base}/api/shardflow/login"))
        .header("origin", base.replace("http://", "https://"))
        .json(&credentials)
        .send()
        .await
        .unwrap();
    assert_eq!(tls.status(), 200);
    assert!(session_cookie(&tls).1.contains("; Secure"));

    // The cookie authenticates reads; the session gives its CSRF token.
    let with_cookie = |request: reqwest::RequestBuilder| {
        request.header("cookie", format!("other=1; {COOKIE}={cookie}"))
    };
    let session = with_cookie(http.get(format!("{base}/api/shardflow/session")))
        .send()
        .await
        .unwrap();
    assert_eq!(session.status(), 200);
    let session: Value = session.json().await.unwrap();
    assert_eq!(session["csrfToken"], csrf.as_str());
    let devices = with_cookie(http.get(format!("{base}/api/tenant/devices?pageSize=10&page=0")))
        .send()
        .await
        .unwrap();
    assert_eq!(devices.status(), 200);

    // A device to save attributes on.
    put(
        &kinesis,
        "tb-test-uplink",
        "123",
        WALKTHROUGH_RECORD.as_bytes(),
    )
    .await;
    let device = service.wait_device("kitchen_thermostat").await;
    let id = device["id"]["id"].as_str().unwrap().to_string();
    let save_url = format!("{base}/api/plugins/telemetry/DEVICE/{id}/attributes/SHARED_SCOPE");
    let save = |origin: Option<&str>, csrf: Option<&str>, key: &str| {
        let mut request = with_cookie(http.post(&save_url))
            .header("content-type", "application/json")
            .body(json!({ key: "x" }).to_string());
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        if let Some(csrf) = csrf {
            request = request.header("x-csrf-token", csrf);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };

    // Cookie-authenticated changes need the CSRF token and this origin.
    assert_eq!(save(Some(&base), None, "no_token").await, 403);
    assert_eq!(save(Some(&base), Some("forged"), "wrong_token").await, 403);
    assert_eq!(
        save(Some("http://evil.example"), Some(&csrf), "foreign").await,
        403
    );
    assert_eq!(save(None, Some(&csrf), "no_origin").await, 403);
    let referer = with_cookie(http.post(&save_url))
        .header("referer", format!("{base}/#/device/{id}"))
        .header("x-csrf-token", &csrf)
        .header("content-type", "application/json")
        .body(r#"{"by_referer":"x"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(referer.status(), 200);
    assert_eq!(save(Some(&base), Some(&csrf), "by_page").await, 200);
    // Bearer requests need no CSRF token (tb-rest-client sends none).
    let (status, _) = service
        .post(
            &format!("/api/plugins/telemetry/{id}/SHARED_SCOPE"),
            r#"{"by_bearer":"x"}"#,
        )
        .await;
    assert_eq!(status, 200);
    let (_, attributes) = service
        .get(&format!(
            "/api/plugins/telemetry/DEVICE/{id}/values/attributes/SHARED_SCOPE"
        ))
        .await;
    let mut keys: Vec<&str> = attributes
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["key"].as_str().unwrap())
        .collect();
    keys.sort();
    assert_eq!(keys, ["by_bearer", "by_page", "by_referer"]);

    // Logout needs the token too, clears the cookie and ends the session.
    let refused = with_cookie(http.post(format!("{base}/api/shardflow/logout")))
        .header("origin", &base)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    let logout = with_cookie(http.post(format!("{base}/api/shardflow/logout")))
        .header("origin", &base)
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(logout.status(), 200);
    let (cleared, header) = session_cookie(&logout);
    assert_eq!(cleared, "");
    assert!(header.contains("Max-Age=0"), "{header}");
    let after = with_cookie(http.get(format!("{base}/api/shardflow/session")))
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), 401);
}

/// The shipped root chain with `Attributes Deleted` also going to the
/// downlink node, and a downlink converter that shows what it was given.
fn chain_with_deletes() -> Setup {
    let mut setup = Setup::walkthrough("tb-test-uplink");
    setup.initial_position = "TRIM_HORIZON";
    let mut chain: Value = serde_json::from_str(&setup.root_chain).unwrap();
    chain["metadata"]["connections"]
        .as_array_mut()
        .unwrap()
        .push(json!({"fromIndex": 0, "toIndex": 5, "type": "Attributes Deleted"}));
    setup.root_chain = chain.to_string();
    setup.downlink_converter = r#"
return {
    contentType: "JSON",
    data: JSON.stringify({msgType: msgType, msg: msg, scope: metadata.scope}),
    metadata: {streamName: "tb-test-downlink", partitionKey: "1"}
};"#
    .into();
    setup
}

/// Reads SSE text until `wanted` appears in it (or panics after a minute).
async fn read_until(stream: &mut reqwest::Response, seen: &mut String, wanted: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !seen.contains(wanted) {
        assert!(
            std::time::Instant::now() < deadline,
            "no {wanted:?} in the event stream:\n{seen}"
        );
        let chunk = tokio::time::timeout(Duration::from_secs(60), stream.chunk())
            .await
            .expect("an event in time")
            .expect("the stream stays open")
            .expect("the stream is not over");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attribute_delete_events_and_integration_status() {
    let emulator = Emulator::start();
    let kinesis = emulator.client().await;
    create_stream(&kinesis, "tb-test-uplink", 1).await;
    create_stream(&kinesis, "tb-test-downlink", 1).await;
    let mut service = Service::start(&chain_with_deletes(), &emulator).await;
    let token = service.login().await;
    let base = service.base_url.clone();

    // The event stream starts with `ready`, before anything is put.
    let mut events = service
        .http
        .get(format!("{base}/api/shardflow/live"))
        .header("X-Authorization", format!("Bearer {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    assert!(events.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut seen = String::new();
    read_until(&mut events, &mut seen, "event: ready").await;

    // A new device and its telemetry are announced after their commit.
    put(
        &kinesis,
        "tb-test-uplink",
        "123",
        WALKTHROUGH_RECORD.as_bytes(),
    )
    .await;
    put(&kinesis, "tb-test-uplink", "123", b"not json").await;
    read_until(&mut events, &mut seen, r#""kind":"entityCreated""#).await;
    read_until(&mut events, &mut seen, r#""keys":["temperature"]"#).await;
    assert!(seen.contains(r#""name":"kitchen_thermostat""#), "{seen}");
    let device = service.wait_device("kitchen_thermostat").await;
    let id = device["id"]["id"].as_str().unwrap().to_string();
    assert!(seen.contains(&id), "{seen}");

    // Save two server attributes, delete one: ATTRIBUTES_DELETED reaches
    // the chain with the scope and the deleted keys.
    let (status, _) = service
        .post(
            &format!("/api/plugins/telemetry/DEVICE/{id}/attributes/SERVER_SCOPE"),
            r#"{"a": 1, "b": true}"#,
        )
        .await;
    assert_eq!(status, 200);
    read_until(&mut events, &mut seen, r#""scope":"SERVER_SCOPE""#).await;
    let http = service.http.clone();
    let delete = |path: String| {
        let http = http.clone();
        let url = format!("{base}{path}");
        let token = token.clone();
        async move {
            let response = http
                .delete(url)
                .header("X-Authorization", format!("Bearer {token}"))
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let (status, body) = delete(format!(
        "/api/plugins/telemetry/DEVICE/{id}/SERVER_SCOPE?keys=a"
    ))
    .await;
    assert_eq!(status, 200, "{body}");
    read_until(&mut events, &mut seen, r#""deleted":true"#).await;
    let (_, left) = service
        .get(&format!(
            "/api/plugins/telemetry/DEVICE/{id}/values/attributes/SERVER_SCOPE"
        ))
        .await;
    assert_eq!(left.as_array().unwrap().len(), 1, "{left}");
    assert_eq!(left[0]["key"], "b");

    // What the downlink node was given: the save and the delete (two
    // messages; their downlinks may be sent in either order).
    let data = wait_for("both downlink records", Duration::from_secs(60), || {
        let kinesis = kinesis.clone();
        async move {
            let records = read_all(&kinesis, "tb-test-downlink").await;
            let data: Vec<Value> = records
                .iter()
                .map(|r| serde_json::from_slice(r.data().as_ref()).unwrap())
                .collect();
            (data.len() >= 2).then_some(data)
        }
    })
    .await;
    assert_eq!(data.len(), 2, "{data:?}");
    assert!(
        data.iter().any(|d| d["msgType"] == "ATTRIBUTES_UPDATED"),
        "{data:?}"
    );
    assert!(
        data.contains(&json!({"msgType": "ATTRIBUTES_DELETED", "msg": {"attributes": ["a"]}, "scope": "SERVER_SCOPE"})),
        "{data:?}"
    );

    // ThingsBoard's device-id path deletes too; bad requests are refused.
    let (status, _) = delete(format!("/api/plugins/telemetry/{id}/SERVER_SCOPE?keys=b")).await;
    assert_eq!(status, 200);
    let (status, body) = delete(format!("/api/plugins/telemetry/{id}/CLIENT_SCOPE?keys=b")).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = delete(format!("/api/plugins/telemetry/{id}/SERVER_SCOPE")).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().unwrap().contains("keys"), "{body}");
    let (status, _) = service.get("/api/shardflow/live?entityId=not-a-uuid").await;
    assert_eq!(status, 400);

    // The integration's status: its shard, the records read, the
    // checkpoint once written, and the dead letter of the bad record.
    let status = wait_for(
        "a checkpoint in the status",
        Duration::from_secs(60),
        || {
            let http = service.http.clone();
            let url = format!("{base}/api/shardflow/integrations");
            let token = token.clone();
            async move {
                let body: Value = http
                    .get(url)
                    .header("X-Authorization", format!("Bearer {token}"))
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                let shard = &body["integrations"][0]["shards"][0];
                (shard["checkpoint"].is_string() && body["integrations"][0]["deadLetters"] == 1)
                    .then_some(body)
            }
        },
    )
    .await;
    let integration = &status["integrations"][0];
    assert_eq!(integration["name"], "kinesis_integration");
    assert_eq!(integration["stream"], "tb-test-uplink");
    assert_eq!(integration["pending"], Value::Null);
    let shard = &integration["shards"][0];
    assert_eq!(shard["shardId"], "shardId-000000000000");
    assert_eq!(shard["state"], "READING");
    assert_eq!(shard["recordsRead"], 2);
    assert_eq!(shard["recordsFailed"], 1);
    assert_eq!(shard["millisBehindLatest"], 0);
    assert!(shard["recordsPerSecond"].is_number(), "{shard}");
    drop(events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converter_test_runs_converters_without_side_effects() {
    let emulator = Emulator::start();
    let kinesis = emulator.client().await;
    create_stream(&kinesis, "tb-test-uplink", 1).await;
    let mut service = Service::start(&Setup::walkthrough("tb-test-uplink"), &emulator).await;
    let token = service.login().await;
    let (http, url) = (
        service.http.clone(),
        format!("{}/api/shardflow/converters/test", service.base_url),
    );
    let test = |body: Value| {
        let body = body.to_string();
        let (http, url, token) = (http.clone(), url.clone(), token.clone());
        async move {
            let response = http
                .post(url)
                .header("X-Authorization", format!("Bearer {token}"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };

    // The configured converters are listed with their text.
    let (status, list) = service.get("/api/shardflow/converters").await;
    assert_eq!(status, 200);
    let converters = &list["converters"][0];
    assert_eq!(converters["integration"], "kinesis_integration");
    assert!(converters["uplink"]["body"]
        .as_str()
        .unwrap()
        .contains("decodeToJson"));
    assert!(converters["downlink"]["file"]
        .as_str()
        .unwrap()
        .ends_with("downlink.js"));

    // The walkthrough record, as JSON, as text and as base64.
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(WALKTHROUGH_RECORD);
    for (payload, kind) in [
        (WALKTHROUGH_RECORD.to_string(), "JSON"),
        (WALKTHROUGH_RECORD.to_string(), "TEXT"),
        (encoded, "BASE64"),
    ] {
        let (status, answer) = test(json!({
            "integration": "kinesis_integration", "kind": "uplink",
            "payload": payload, "payloadType": kind,
            "metadata": {"partitionKey": "123", "approximateArrivalTimestamp": 1000},
        }))
        .await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["ok"], true, "{answer}");
        let output = &answer["output"][0];
        assert_eq!(output["name"], "kitchen_thermostat");
        assert_eq!(output["type"], "thermostat");
        assert_eq!(output["telemetry"][0]["values"]["temperature"], 22);
        assert_eq!(answer["returned"]["deviceName"], "kitchen_thermostat");
    }

    // An edited script sees the metadata; its errors come back as results.
    let (_, answer) = test(json!({
        "kind": "uplink", "payload": "x",
        "script": "return {deviceName: metadata.partitionKey + '/' + metadata.integrationName + '/' + metadata.subSequenceNumber, telemetry: {n: payload.length}};",
        "metadata": {"partitionKey": "pk", "subSequenceNumber": 3},
    }))
    .await;
    assert_eq!(
        answer["output"][0]["name"], "pk/kinesis_integration/3",
        "{answer}"
    );
    assert_eq!(answer["output"][0]["telemetry"][0]["values"]["n"], 1);
    let (_, answer) =
        test(json!({"kind": "uplink", "payload": "x", "script": "return {telemetry: {}};"})).await;
    assert_eq!(answer["ok"], false);
    assert!(
        answer["error"].as_str().unwrap().contains("deviceName"),
        "{answer}"
    );
    assert_eq!(answer["returned"], json!({"telemetry": {}}));
    let (_, answer) =
        test(json!({"kind": "uplink", "payload": "not json", "payloadType": "TEXT"})).await;
    assert_eq!(answer["ok"], false);
    assert!(
        answer["error"].as_str().unwrap().contains("script threw"),
        "{answer}"
    );
    let (_, answer) =
        test(json!({"kind": "uplink", "payload": "x", "script": "while (true) {}"})).await;
    assert!(
        answer["error"].as_str().unwrap().contains("longer than"),
        "{answer}"
    );
    let (_, answer) = test(json!({"kind": "uplink", "payload": "x", "script": "return {"})).await;
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("does not compile"),
        "{answer}"
    );

    // The downlink converter, on an ATTRIBUTES_UPDATED message.
    let (_, answer) = test(json!({
        "kind": "downlink", "payload": r#"{"version": "v.0.11"}"#,
        "metadata": {"deviceName": "kitchen_thermostat"}, "msgType": "ATTRIBUTES_UPDATED",
    }))
    .await;
    assert_eq!(answer["ok"], true, "{answer}");
    let record = &answer["output"][0];
    assert_eq!(record["streamName"], "tb-test-downlink");
    assert_eq!(record["partitionKey"], "123");
    assert_eq!(
        record["data"],
        r#"{"devName":"kitchen_thermostat","version":"v.0.11"}"#
    );

    // Bad requests are refused with the reason.
    for (body, reason) in [
        (json!({"payload": "%%%", "payloadType": "BASE64"}), "base64"),
        (json!({"payload": "{", "payloadType": "JSON"}), "JSON"),
        (json!({"payload": "x", "payloadType": "XML"}), "payloadType"),
        (json!({"payload": "x", "kind": "sideways"}), "kind"),
        (
            json!({"payload": "x", "integration": "nope"}),
            "integration",
        ),
        (
            json!({"payload": "x", "metadata": {"colour": "red"}}),
            "colour",
        ),
        (json!({"payload": "x", "metadata": [1]}), "metadata"),
        (json!({}), "payload"),
    ] {
        let (status, answer) = test(body.clone()).await;
        assert_eq!(status, 400, "{body} -> {answer}");
        assert!(
            answer["message"].as_str().unwrap().contains(reason),
            "{body} -> {answer}"
        );
    }

    // Nothing was stored, and the pipeline still converts real records.
    let (_, devices) = service.get("/api/tenant/devices?pageSize=10&page=0").await;
    assert_eq!(devices["totalElements"], 0, "{devices}");
    put(
        &kinesis,
        "tb-test-uplink",
        "123",
        WALKTHROUGH_RECORD.as_bytes(),
    )
    .await;
    let device = service.wait_device("kitchen_thermostat").await;
    let latest = service
        .wait_latest(device["id"]["id"].as_str().unwrap(), "temperature")
        .await;
    assert_eq!(latest["temperature"][0]["value"], 22);
}
