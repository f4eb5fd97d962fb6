//! `sessionhub`: run one node.

use std::io::{IsTerminal, Write};
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
    // Before any other thread exists (the log's writer is the first): every thread
    // inherits the policy. Its outcome is logged once the log is set up.
    let sched = config.sched_batch.then(sched_batch);
    let log = init_tracing(config.json_logs);
    match sched {
        Some(SchedBatch::Set) | None => {}
        Some(SchedBatch::Niceness(nice)) => tracing::info!(
            ?nice,
            "niceness set by the operator kept; SCHED_BATCH not set"
        ),
        Some(SchedBatch::Refused(e)) => tracing::warn!(
            error = %e,
            "could not run under SCHED_BATCH; running under the default policy"
        ),
    }
    let result = actix_web::rt::System::new().block_on(run(config));
    // The queued log lines go out before the last word.
    drop(log);
    match result {
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

/// Puts this thread, and so every thread it starts, under SCHED_BATCH.
///
/// Why: on a machine the node shares with Redis (or with other nodes), Redis writes
/// one event to several nodes in a row. Under the default policy the first node it
/// wakes preempts it on the spot (a sleeper has the least runtime), and the event
/// reaches the other nodes only after that node's turn: a kill's last socket ended
/// ~0.6 ms after its HTTP answer. A SCHED_BATCH thread never preempts on wake-up;
/// it runs when the CPU is next given out, with its fair share as before
/// (BENCHMARKS.md, "SCHED_BATCH"). It needs no privilege. The call also sets the
/// thread's niceness (to 0), so a node started with another niceness keeps it and
/// the default policy (`chrt --batch` does both). A refusal is logged; the node
/// runs as it is.
fn sched_batch() -> SchedBatch {
    #[cfg(target_os = "linux")]
    {
        use thread_priority::unix::{
            NormalThreadSchedulePolicy, ThreadSchedulePolicy, set_thread_priority_and_policy,
            thread_native_id,
        };
        use thread_priority::{ThreadPriority, ThreadPriorityOsValue};
        match own_niceness() {
            Some(0) => {}
            nice => return SchedBatch::Niceness(nice),
        }
        let batch = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Batch);
        let nice_0 = ThreadPriority::Os(ThreadPriorityOsValue::default());
        if let Err(e) = set_thread_priority_and_policy(thread_native_id(), nice_0, batch) {
            return SchedBatch::Refused(format!("{e:?}"));
        }
    }
    SchedBatch::Set
}

/// What [`sched_batch`] did.
enum SchedBatch {
    /// Set (or not Linux, where there is nothing to set).
    Set,
    /// Not set: the node was started with this niceness (not 0), which it keeps.
    Niceness(Option<i32>),
    /// Refused by the system.
    Refused(String),
}

/// This thread's niceness (field 19 of /proc/thread-self/stat).
#[cfg(target_os = "linux")]
fn own_niceness() -> Option<i32> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(16)?.parse().ok()
}

/// Log lines that may wait for the log's writer thread. A node serves every socket
/// on one thread, so it must never wait for its log's reader (a stopped terminal, a
/// full pipe to a slow log collector): lines past this are dropped and counted
/// (`sessionhub_log_lines_dropped_total`) instead.
const LOG_QUEUE_LINES: usize = 16_384;

/// Logs to stderr through a writer thread; the guard flushes what is queued when the
/// node exits.
fn init_tracing(json: bool) -> tracing_appender::non_blocking::WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .lossy(true)
        .thread_name("sessionhub-log")
        .finish(std::io::stderr());
    let _ = sessionhub_server::metrics::LOG_LINES_DROPPED.set(writer.error_counter());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal: a log that goes to a file, a pipe or
    // journald is plain text for whatever parses it.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
    guard
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
