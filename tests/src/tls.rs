//! TLS for Redis in tests: a private CA, a server certificate and a client
//! certificate made by `openssl` in a temporary directory, and a redis-server that
//! speaks only TLS (`--port 0 --tls-port P`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::WAIT;
use crate::process::{free_port, require};

/// How to install the `openssl` command-line tool.
pub const OPENSSL_INSTALL: &str = "apt-get install -y openssl";

/// A private CA with a server certificate (for 127.0.0.1 and localhost) and a client
/// certificate, all PEM files in their own directory.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// Generates the CA and both certificates with `openssl`.
    pub fn generate() -> Self {
        let openssl = require("openssl", OPENSSL_INSTALL);
        let dir = tempfile::tempdir().unwrap();
        let run = |args: &[&str]| {
            let out = std::process::Command::new(&openssl)
                .args(args)
                .current_dir(dir.path())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "openssl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=sessionhub test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ]);
        // Extensions make both X.509 v3 certificates (rustls refuses v1). The server
        // certificate is a client one too: Redis Cluster nodes show it to each other
        // on the TLS cluster bus.
        std::fs::write(
            dir.path().join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("client.ext"),
            "extendedKeyUsage=clientAuth\n",
        )
        .unwrap();
        for name in ["server", "client"] {
            let (key, csr, crt, ext) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.crt"),
                format!("{name}.ext"),
            );
            let subj = format!("/CN={name}");
            run(&[
                "req", "-newkey", "rsa:2048", "-nodes", "-subj", &subj, "-keyout", &key, "-out",
                &csr,
            ]);
            run(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &crt,
            ]);
        }
        Self { dir }
    }

    /// A file of the PKI: `ca.crt`, `server.crt`, `server.key`, `client.crt`,
    /// `client.key`.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The environment that makes a node trust this CA.
    pub fn ca_env(&self) -> (String, String) {
        (
            "SESSIONHUB_REDIS_CA_FILE".into(),
            self.file("ca.crt").display().to_string(),
        )
    }

    /// The environment that gives a node this client certificate.
    pub fn client_env(&self) -> Vec<(String, String)> {
        vec![
            (
                "SESSIONHUB_REDIS_CLIENT_CERT_FILE".into(),
                self.file("client.crt").display().to_string(),
            ),
            (
                "SESSIONHUB_REDIS_CLIENT_KEY_FILE".into(),
                self.file("client.key").display().to_string(),
            ),
        ]
    }
}

/// A redis-server listening only on a TLS port, killed on drop.
pub struct TlsRedis {
    _child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl TlsRedis {
    /// Starts one with the PKI's server certificate; `mutual` requires client
    /// certificates (`--tls-auth-clients yes`); `extra` are more config arguments
    /// (e.g. `--requirepass`). Fails the test if this redis-server has no TLS.
    pub async fn start(pki: &Pki, mutual: bool, extra: &[&str]) -> Self {
        let bin = require("redis-server", "apt-get install -y redis-server");
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new(&bin)
                .args(["--port", "0", "--bind", "127.0.0.1", "--save", ""])
                .args(["--appendonly", "no", "--tls-port", &port.to_string()])
                .arg("--tls-cert-file")
                .arg(pki.file("server.crt"))
                .arg("--tls-key-file")
                .arg(pki.file("server.key"))
                .arg("--tls-ca-cert-file")
                .arg(pki.file("ca.crt"))
                .args(["--tls-auth-clients", if mutual { "yes" } else { "no" }])
                .args(extra)
                .arg("--dir")
                .arg(dir.path())
                .args(["--logfile", "redis.log"])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            if listening(&mut child, port, dir.path()).await {
                return Self {
                    _child: child,
                    port,
                    _dir: dir,
                };
            }
        }
        panic!("redis-server with TLS did not start");
    }

    /// Starts three TLS-only masters (`--tls-cluster yes`: the bus and the
    /// addresses the cluster announces are TLS too) and joins them with
    /// `redis-cli --tls --cluster create`.
    pub async fn start_cluster(pki: &Pki) -> Vec<Self> {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let bus = free_port().to_string();
            nodes.push(
                Self::start(
                    pki,
                    false,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-port",
                        &bus,
                        "--tls-cluster",
                        "yes",
                        "--tls-replication",
                        "yes",
                    ],
                )
                .await,
            );
        }
        let cli = require("redis-cli", "apt-get install -y redis-tools");
        let mut create = Command::new(cli);
        create
            .arg("--tls")
            .arg("--cacert")
            .arg(pki.file("ca.crt"))
            .args(["--cluster", "create"])
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(60), create.output())
            .await
            .expect("`redis-cli --cluster create` timed out")
            .unwrap();
        assert!(
            out.status.success(),
            "`redis-cli --tls --cluster create` failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        nodes
    }

    /// Its `rediss://` URL, with `userinfo` (`user:pass@`, or empty).
    pub fn url(&self, userinfo: &str) -> String {
        format!("rediss://{userinfo}127.0.0.1:{}", self.port)
    }
}

/// Waits until the server accepts TCP on `port`; false if it exited (port taken).
/// A redis-server built without TLS refuses `--tls-port`: the test fails with how to
/// get one that has it.
async fn listening(child: &mut Child, port: u16, dir: &Path) -> bool {
    let end = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < end {
        if child.try_wait().unwrap().is_some() {
            let log = ["stderr.log", "redis.log"]
                .map(|f| std::fs::read_to_string(dir.join(f)).unwrap_or_default())
                .join("\n");
            // The port was taken between free_port() and the bind: try another.
            assert!(
                log.contains("Address already in use"),
                "redis-server with --tls-port exited: if it was built without TLS support, \
                 install Debian's, which has it (apt-get install -y redis-server); its output:\n{log}"
            );
            return false;
        }
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}
