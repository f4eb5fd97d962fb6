//! `sessionhub`: run one node.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use clap::error::ErrorKind;
use sessionhub_server::{Application, Cli, Config};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            print!("{e}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One clear line, not clap's usage block.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("sessionhub: {first} (see sessionhub --help)");
            return ExitCode::from(2);
        }
    };
    let config = match Config::from_cli(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sessionhub: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(config.json_logs);
    match actix_web::rt::System::new().block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sessionhub: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    tracing::info!(?config, "starting");
    let node = config.node_id.clone();
    let app = Application::build(config).await.context("cannot start")?;
    let engine = app.state().engine.name();
    // The one line on stdout: scripts and tests read the bound address from it.
    println!(
        "sessionhub listening on http://{} (node {node}, engine {engine})",
        app.local_addr()
    );
    let _ = std::io::stdout().flush();
    app.run_until(shutdown_signal())
        .await
        .context("server failed")
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
