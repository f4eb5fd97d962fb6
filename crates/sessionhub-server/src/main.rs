//! `sessionhub`: run one node.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::CommandFactory;
use clap::Parser;
use clap::error::{ContextKind, ContextValue, ErrorKind};
use sessionhub_server::{Application, Cli, Config};

fn main() -> ExitCode {
    if let Err(e) = sessionhub_server::config::check_environment(std::env::vars_os()) {
        eprintln!("sessionhub: {e}");
        return ExitCode::from(2);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            print!("{e}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One clear line, not clap's usage block, naming the variable too: most
            // nodes are configured through the environment.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            let first = match e.get(ContextKind::InvalidArg) {
                Some(ContextValue::String(arg)) => name_env(first, arg),
                _ => first.to_owned(),
            };
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

/// Rewrites clap's `'--demo [<DEMO>]'` in `line` as `SESSIONHUB_DEMO (--demo)`.
fn name_env(line: &str, arg: &str) -> String {
    let cmd = Cli::command();
    let found = cmd.get_arguments().find_map(|a| {
        let long = a.get_long()?;
        let env = a.get_env()?;
        let flag = format!("--{long}");
        (arg == flag
            || arg.starts_with(&format!("{flag} "))
            || arg.starts_with(&format!("{flag}=")))
        .then(|| format!("{} ({flag})", env.to_string_lossy()))
    });
    match found {
        Some(named) => line.replace(&format!("'{arg}'"), &named),
        None => line.to_owned(),
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
