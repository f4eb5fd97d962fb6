//! The README's shell blocks, run verbatim and in order, as a newcomer runs them: as
//! root, with bash, from the repository root. Everything runs in a network namespace
//! of its own (`unshare -n`), so the README's fixed ports (8080, 6380, 7001-7006,
//! 8081-8093) are free whatever else runs on this machine. The quick-start node runs
//! throughout, as in a second terminal, and is stopped with Ctrl-C (SIGINT to its
//! process group) at the end. Blocks that start servers are followed by their stop
//! block in the same shell (on failure too), and after each stop the namespace must
//! hold no process the blocks started.
//!
//! Each `sh` block's info string names it (`sh try-api`); `sh no-run` blocks are
//! skipped (the README says why beside each) and `sh ops:*` blocks are run by
//! `tests/tests/ops.rs`. A block this plan does not know fails the test, so a new block
//! needs a decision here.
#![allow(clippy::unwrap_used, missing_docs)]

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sessionhub_tests::process::{repo_root, require};

/// What the test does with one block.
enum Role {
    /// A server in the foreground: run in the background until the end; `ready` polls
    /// until it serves.
    Foreground { ready: &'static str },
    /// Not run; the README says why. `marker` is a text of the block, to tell which.
    NoRun { marker: &'static str },
    /// Starts servers that outlive it: opens a shell session that its `Stop` block
    /// ends; `check` (bash) runs right after it, in the same shell.
    Start { check: &'static str },
    /// Run, then `check`: inside the open session, or else in a shell of its own.
    Run { check: &'static str },
    /// Ends the current shell session: run last in it (and on failure), then `check`.
    Stop { check: &'static str },
    /// Run by tests/tests/ops.rs.
    Ops,
}

/// The README's `sh` blocks, in order. A session (one bash process, like one
/// terminal) runs from a `Start` block to its `Stop` block.
const PLAN: &[(&str, Role)] = &[
    (
        "quick-start",
        Role::Foreground {
            ready: "curl -sf localhost:8080/healthz",
        },
    ),
    (
        "no-run",
        Role::NoRun {
            marker: "./scripts/test.sh",
        },
    ),
    (
        "try-api",
        Role::Run {
            check: r#"
[[ $SESSION == *'"user_id":"alice"'* ]]
[[ $(curl -sf localhost:8080/api/v1/me -H "Cookie: sh_session=$TOKEN") == *'"user_id":"alice"'* ]]
"#,
        },
    ),
    (
        "three-nodes",
        Role::Start {
            check: r#"
for i in 1 2 3; do curl -sf localhost:808$i/healthz >/dev/null; curl -sf localhost:808$i/readyz >/dev/null; done
[ "$(redis-cli -p 6380 ZCARD sh:nodes)" = 3 ]
[ "$(redis-cli -p 6380 CONFIG GET appendonly | tail -1)" = yes ]
[ "$(redis-cli -p 6380 CONFIG GET dir | tail -1)" = "$(cd "$RUN" && pwd -P)" ]
"#,
        },
    ),
    (
        "three-nodes-any",
        Role::Run {
            check: r#"
for i in 1 2 3; do
  [ "$(curl -s -o /dev/null -w '%{http_code}' localhost:808$i/api/v1/me -H "Cookie: sh_session=$TOKEN")" = 401 ]
done
"#,
        },
    ),
    (
        "three-nodes-stop",
        Role::Stop {
            check: r#"
for p in 6380 8081 8082 8083; do ! (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null; done
[ ! -e "$RUN" ]
"#,
        },
    ),
    (
        "redis-cluster",
        Role::Start {
            check: r#"
redis-cli -p 7001 CLUSTER INFO | grep -q '^cluster_state:ok'
redis-cli -p 7001 CLUSTER INFO | grep -q '^cluster_size:3'
KEY=dev-only-key-change-me
T=$(curl -sf -X POST localhost:8091/api/v1/sessions -H "Authorization: Bearer $KEY" \
  -H 'Content-Type: application/json' -d '{"user_id":"bob"}' | sed 's/.*"token":"\([^"]*\)".*/\1/')
for i in 1 2 3; do
  [[ $(curl -sf localhost:809$i/api/v1/me -H "Cookie: sh_session=$T") == *'"user_id":"bob"'* ]]
done
curl -sf -X DELETE "localhost:8092/api/v1/sessions/${T%%.*}" -H "Authorization: Bearer $KEY"
[ "$(curl -s -o /dev/null -w '%{http_code}' localhost:8093/api/v1/me -H "Cookie: sh_session=$T")" = 401 ]
"#,
        },
    ),
    (
        "redis-cluster-stop",
        Role::Stop {
            check: r#"
for p in 7001 7002 7003 7004 7005 7006 8091 8092 8093; do ! (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null; done
[ ! -e "$RC" ]
"#,
        },
    ),
    (
        "integrate-login",
        Role::Run {
            check: r#"
[ "$(curl -s -o /dev/null -w '%{http_code}' -X POST localhost:8080/api/v1/sessions -H "Authorization: Bearer $KEY" \
  -H 'Content-Type: application/json' -d '{"user_id":"alice","user_agent":"Firefox on Linux","ip":"192.0.2.7","ttl_secs":28800}')" = 201 ]
"#,
        },
    ),
    ("integrate-cookie", Role::Run { check: "" }),
    ("ops:events", Role::Ops),
    (
        "no-run",
        Role::NoRun {
            marker: "--test browser",
        },
    ),
    (
        "no-run",
        Role::NoRun {
            marker: "docker compose up",
        },
    ),
    (
        "cluster-sh",
        Role::Start {
            check: r#"
curl -sf "$NGINX_URL/healthz" >/dev/null
[ "$(curl -s -o /dev/null -w '%{http_code}' "$NGINX_URL/")" = 200 ]
[ "$(redis-cli -p "$REDIS_PORT" ZCARD sh:nodes)" = 3 ]
"#,
        },
    ),
    (
        "cluster-sh-stop",
        Role::Stop {
            check: r#"
for u in $NGINX_URL $NODE_URLS; do p=${u##*:}; ! (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null; done
! (exec 3<>/dev/tcp/127.0.0.1/$REDIS_PORT) 2>/dev/null
[ ! -e "$CLUSTER" ]
"#,
        },
    ),
    ("troubleshooting", Role::Run { check: "" }),
    (
        "no-run",
        Role::NoRun {
            marker: "scripts/bench.sh",
        },
    ),
    ("ops:list-sessions", Role::Ops),
    ("ops:list-connections", Role::Ops),
    ("ops:history", Role::Ops),
    ("ops:kill-session", Role::Ops),
    ("ops:kill-user", Role::Ops),
    ("ops:online", Role::Ops),
    ("ops:nodes", Role::Ops),
];

/// The README's ```` ```sh ```` blocks: (info string after `sh`, body).
fn sh_blocks(readme: &str) -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        let Some(info) = line.strip_prefix("```") else {
            continue;
        };
        let body: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
        if info == "sh" || info.starts_with("sh ") {
            blocks.push((info[2..].trim().to_owned(), body.join("\n") + "\n"));
        }
    }
    blocks
}

/// A network namespace with only loopback, held by a `cat` that ends when the test
/// drops it.
struct Netns {
    holder: Child,
}

impl Netns {
    fn new() -> Self {
        require("unshare", "apt-get install -y util-linux");
        require("ip", "apt-get install -y iproute2");
        let mut holder = Command::new("unshare")
            .args([
                "--net",
                "--",
                "sh",
                "-c",
                "ip link set lo up && echo up && exec cat",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut up = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(holder.stdout.take().unwrap())
            .read_line(&mut up)
            .unwrap();
        assert_eq!(
            up.trim(),
            "up",
            "unshare -n failed: the README test runs as root (as the README's blocks do)"
        );
        Self { holder }
    }

    fn ns(&self) -> String {
        format!("/proc/{}/ns/net", self.holder.id())
    }

    /// bash running `script` inside the namespace, from the repository root.
    fn bash(&self, script: &str, log: &Path) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.ns()))
            .args(["--", "bash", "-c", script])
            .current_dir(repo_root())
            .env(
                "PATH",
                format!("/usr/sbin:{}", std::env::var("PATH").unwrap_or_default()),
            )
            .stdin(Stdio::null())
            .stdout(File::create(log).unwrap())
            .stderr(File::create(log.with_extension("err")).unwrap());
        cmd
    }

    /// Runs a script to its end (at most `limit`); its stdout, or a panic with both.
    fn run(&self, name: &str, script: &str, dir: &Path, limit: Duration) -> String {
        let log = dir.join(format!("{name}.out"));
        let mut child = self.bash(script, &log).spawn().unwrap();
        let status = wait_deadline(&mut child, limit);
        let out = std::fs::read_to_string(&log).unwrap_or_default();
        let err = std::fs::read_to_string(log.with_extension("err")).unwrap_or_default();
        match status {
            Some(s) if s.success() => out,
            Some(s) => panic!("README session {name} failed ({s}):\n{out}\n--- stderr ---\n{err}"),
            None => {
                // TERM: the session's trap runs its stop block.
                let _ = Command::new("kill").arg(child.id().to_string()).status();
                let _ = wait_deadline(&mut child, Duration::from_secs(60));
                panic!("README session {name} took over {limit:?}:\n{out}\n--- stderr ---\n{err}")
            }
        }
    }

    /// Processes in the namespace other than the holder and the process group `keep`.
    fn processes(&self, keep: Option<u32>) -> Vec<(u32, String)> {
        let ours = std::fs::read_link(self.ns()).unwrap();
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if pid == self.holder.id() {
                continue;
            }
            if std::fs::read_link(entry.path().join("ns/net")).ok() != Some(ours.clone()) {
                continue;
            }
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            // pid (comm) state ppid pgrp ...
            let after = stat.rsplit_once(") ").map_or("", |(_, r)| r);
            let pgrp = after.split_whitespace().nth(2).and_then(|g| g.parse().ok());
            if keep.is_some() && pgrp == keep {
                continue;
            }
            let cmdline = std::fs::read(entry.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default();
            found.push((pid, cmdline));
        }
        found
    }

    /// Kills (by pid) what the blocks left behind; returns what it was.
    fn kill_leftovers(&self, keep: Option<u32>) -> Vec<(u32, String)> {
        let left = self.processes(keep);
        for (pid, _) in &left {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        left
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.kill_leftovers(None);
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// Waits for a child for at most `limit` (polling its status).
fn wait_deadline(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One bash script for a session: each block verbatim, then its check; the stop block
/// runs at the end, or on any failure before.
fn session_script(steps: &[(&str, &str, &str)], stop: Option<(&str, &str, &str)>) -> String {
    let mut s = String::from(
        "set -euo pipefail\n\
         trap 'echo \"readme.rs: failed at line $LINENO: $BASH_COMMAND\" >&2' ERR\n\
         trap 'exit 143' TERM\n",
    );
    if let Some((name, body, _)) = stop {
        s.push_str(&format!(
            "__stop() {{\n# ---- {name} (after a failure)\n{body}}}\n\
             trap 'rc=$?; trap - EXIT; if [ $rc != 0 ]; then echo \"readme.rs: running {name} after the failure\" >&2; __stop || true; fi; exit $rc' EXIT\n"
        ));
    }
    for (name, body, check) in steps {
        s.push_str(&format!(
            "echo '==== block {name}'\n{body}echo '==== check {name}'\n{check}\n"
        ));
    }
    if let Some((name, body, check)) = stop {
        s.push_str(&format!(
            "trap - EXIT\necho '==== block {name}'\n{body}echo '==== check {name}'\n{check}\n"
        ));
    }
    s
}

/// Stops the foreground server like Ctrl-C (SIGINT to its process group) and waits.
fn ctrl_c(child: &mut Child) -> Option<std::process::ExitStatus> {
    let _ = Command::new("kill")
        .args(["-INT", "--", &format!("-{}", child.id())])
        .status();
    wait_deadline(child, Duration::from_secs(20))
}

fn readme_text() -> String {
    std::fs::read_to_string(repo_root().join("README.md")).unwrap()
}

#[test]
fn every_readme_shell_block_runs_in_order() {
    for (program, install) in [
        ("bash", "apt-get install -y bash"),
        ("curl", "apt-get install -y curl"),
        ("nsenter", "apt-get install -y util-linux"),
        ("redis-server", "apt-get install -y redis-server"),
        ("redis-cli", "apt-get install -y redis-tools"),
        ("cargo", "curl https://sh.rustup.rs -sSf | sh"),
    ] {
        require(program, install);
    }
    if !Path::new("/usr/sbin/nginx").exists() {
        require("nginx", "apt-get install -y nginx");
    }
    let readme = readme_text();
    let blocks = sh_blocks(&readme);
    let names: Vec<&str> = blocks.iter().map(|(n, _)| n.as_str()).collect();
    let planned: Vec<&str> = PLAN.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names, planned,
        "the README's sh blocks changed: classify each in tests/tests/readme.rs's PLAN"
    );
    let no_runs = PLAN
        .iter()
        .filter(|(_, r)| matches!(r, Role::NoRun { .. }))
        .count();
    assert!(
        no_runs <= 4,
        "keep the list of blocks that cannot run short"
    );

    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::new();
    let started = Instant::now();
    let mut foreground: Option<Child> = None;
    let mut session: Vec<(&str, &str, &str)> = Vec::new();
    let mut open = false;
    let mut outputs = String::new();
    let mut timings = Vec::new();
    for ((name, body), (_, role)) in blocks.iter().zip(PLAN) {
        match role {
            Role::Foreground { ready } => {
                assert!(foreground.is_none(), "one foreground server at a time");
                let log = dir.path().join(format!("{name}.out"));
                let mut cmd = ns.bash(&format!("set -euo pipefail\n{body}"), &log);
                std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
                let mut child = cmd.spawn().unwrap();
                // It may build first: cargo is a no-op when the suite's build is fresh.
                let deadline = Instant::now() + Duration::from_secs(300);
                loop {
                    let ok = ns
                        .bash(ready, &dir.path().join("ready.out"))
                        .status()
                        .unwrap()
                        .success();
                    if ok {
                        break;
                    }
                    if let Some(s) = child.try_wait().unwrap() {
                        panic!(
                            "{name} exited ({s}) before serving:\n{}",
                            std::fs::read_to_string(log.with_extension("err")).unwrap_or_default()
                        );
                    }
                    assert!(Instant::now() < deadline, "{name} did not serve in 300 s");
                    std::thread::sleep(Duration::from_millis(200));
                }
                timings.push(format!("{name}: serving after {:?}", started.elapsed()));
                foreground = Some(child);
            }
            Role::NoRun { marker } => {
                assert!(
                    body.contains(marker),
                    "the no-run block here should be the one with {marker:?}:\n{body}"
                );
            }
            Role::Ops => {}
            Role::Start { check } => {
                assert!(!open, "{name} starts a session inside another");
                open = true;
                session.push((name, body, check));
            }
            Role::Run { check } => {
                session.push((name, body, check));
                if !open {
                    let t = Instant::now();
                    let script = session_script(&session, None);
                    outputs.push_str(&ns.run(name, &script, dir.path(), Duration::from_secs(120)));
                    timings.push(format!("{name}: {:?}", t.elapsed()));
                    session.clear();
                }
            }
            Role::Stop { check } => {
                assert!(open, "{name} stops nothing");
                let t = Instant::now();
                let script = session_script(&session, Some((name, body, check)));
                outputs.push_str(&ns.run(name, &script, dir.path(), Duration::from_secs(300)));
                timings.push(format!("session ending with {name}: {:?}", t.elapsed()));
                session.clear();
                open = false;
                let keep = foreground.as_ref().map(Child::id);
                let left = ns.kill_leftovers(keep);
                assert!(left.is_empty(), "{name} left processes running: {left:?}");
            }
        }
    }
    assert!(!open, "a started block has no stop block");

    // What the blocks printed is what the README says they print.
    let cookie = outputs
        .lines()
        .find(|l| {
            l.to_ascii_lowercase()
                .starts_with("set-cookie: sh_session=")
        })
        .unwrap_or_else(|| panic!("no Set-Cookie from the demo login:\n{outputs}"));
    let attributes = cookie.split_once("; ").unwrap().1.trim();
    assert_eq!(attributes, "HttpOnly; SameSite=Lax; Path=/");
    assert!(readme.contains(&format!("Set-Cookie: sh_session=<token>; {attributes}\n")));
    assert!(readme.contains(&format!(
        "Set-Cookie: __Host-sh_session=<token>; {attributes}; Secure\n"
    )));
    for body in [
        r#"{"error":"unauthorized","message":"no valid session: log in again"}"#,
        r#"{"error":"bad_api_key","message":"missing or invalid API key"}"#,
        r#"{"error":"forbidden","message":"origin not allowed"}"#,
    ] {
        assert!(outputs.contains(body), "{body} not printed:\n{outputs}");
        assert!(
            readme.contains(&format!("`{body}`")),
            "the troubleshooting table lacks {body}"
        );
    }
    assert!(
        outputs.contains("sessionhub cluster up: http://127.0.0.1:")
            && outputs.contains("the demo app at /"),
        "{outputs}"
    );
    assert!(outputs.contains(r#""user_id":"alice""#), "{outputs}");

    // Ctrl-C stops the quick-start node cleanly, and nothing is left.
    let mut fg = foreground.expect("the quick-start node");
    let status = ctrl_c(&mut fg).expect("the quick-start node did not stop on Ctrl-C");
    assert!(
        status.success(),
        "the quick-start node exited with {status}"
    );
    let left = ns.kill_leftovers(None);
    assert!(left.is_empty(), "processes left running: {left:?}");
    timings.push(format!("total: {:?}", started.elapsed()));
    eprintln!("{}", timings.join("\n"));
}
