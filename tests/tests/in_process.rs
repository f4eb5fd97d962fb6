//! The fast tier: a node built in this test process through the same code path as
//! `main` (`Config::from_cli`, `Application::build`, `run_until`), on the embedded
//! engine, so HTTP and socket behaviour can be tested without a built binary or
//! Redis. Everything else in `tests/` runs real processes.
#![allow(clippy::unwrap_used, missing_docs)]

use clap::Parser;
use reqwest::Method;
use sessionhub_server::{Application, Cli, Config};
use sessionhub_tests::{API_KEY, Api, WsClient};
use tokio::sync::oneshot;

/// A node in this process, stopped (in order, as on SIGTERM) when the sender drops.
async fn spawn_app() -> (
    String,
    oneshot::Sender<()>,
    actix_web::rt::task::JoinHandle<std::io::Result<()>>,
) {
    let cli = Cli::try_parse_from([
        "sessionhub",
        "--listen",
        "127.0.0.1:0",
        "--api-key",
        API_KEY,
    ])
    .unwrap();
    let app = Application::build(Config::from_cli(cli).unwrap())
        .await
        .unwrap();
    let base = format!("http://{}", app.local_addr());
    let (stop, stopped) = oneshot::channel::<()>();
    let running = actix_web::rt::spawn(app.run_until(async {
        let _ = stopped.await;
    }));
    (base, stop, running)
}

#[actix_web::test]
async fn an_in_process_node_creates_kills_and_closes() {
    let (base, stop, running) = spawn_app().await;
    let api = Api::at(&base);
    let s = api.create_session("alice", "laptop").await;
    let ws_url = format!("{}/ws", base.replacen("http", "ws", 1));
    let mut ws = WsClient::connect_url(&ws_url, &s.token).await.unwrap();
    let res = api
        .service(
            Method::DELETE,
            &format!("/api/v1/sessions/{}", s.session_id),
            None,
        )
        .await;
    assert_eq!(res.status(), 204);
    let ev = ws.expect_close_event().await;
    assert_eq!(ev.code, 4001);
    assert_eq!(ev.frames.last().unwrap()["reason"], "killed");

    // Shutdown closes the remaining sockets with 1001 and returns.
    let s2 = api.create_session("bob", "phone").await;
    let mut ws2 = WsClient::connect_url(&ws_url, &s2.token).await.unwrap();
    drop(stop);
    assert_eq!(ws2.expect_close_event().await.code, 1001);
    running.await.unwrap().unwrap();
}
