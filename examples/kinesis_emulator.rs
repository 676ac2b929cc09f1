//! A local Kinesis emulator (the `ferrokinesis` crate) for the walkthrough:
//! `cargo run --example kinesis-emulator -- [PORT]` (default 4567). It
//! speaks the AWS wire protocol on 127.0.0.1 until stopped.

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(4567);
    let options = ferrokinesis::store::StoreOptions {
        create_stream_ms: 50,
        delete_stream_ms: 50,
        update_stream_ms: 50,
        shard_limit: 64,
        ..Default::default()
    };
    let (app, _store) = ferrokinesis::create_app(options);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!(
        "kinesis emulator listening on http://{}",
        listener.local_addr()?
    );
    ferrokinesis::serve_plain_http(listener, app, async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    })
    .await
}
