//! A real HTTP webhook receiver for the tests: a small HTTP/1.1 server on a free
//! loopback port that verifies every request's `X-Sessionhub-Signature` as the
//! README tells receivers to, and records what it got.
//!
//! It can answer 500 to the next N requests, or be "down" (close every connection
//! without an answer), to exercise retries.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// The secret the test nodes sign with.
pub const WEBHOOK_SECRET: &str = "test-webhook-secret-0123456789";

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    /// The events of the body.
    pub events: Vec<Value>,
    /// The body as sent.
    pub body: String,
    /// Whether the signature verified (and its time was within 5 minutes).
    pub signature_ok: bool,
    /// The status the receiver answered.
    pub status: u16,
    /// When it arrived.
    pub at: Instant,
}

struct State {
    received: Mutex<Vec<Received>>,
    fail_next: AtomicU32,
    down: AtomicBool,
    /// While true, requests are read and left unanswered (a receiver that hangs);
    /// when it turns false they are dropped without an answer.
    hang: tokio::sync::watch::Sender<bool>,
    /// Requests read while hanging.
    hung: AtomicU32,
    /// How long each answer waits (ms): a slow receiver.
    delay_ms: std::sync::atomic::AtomicU64,
}

impl Default for State {
    fn default() -> Self {
        Self {
            received: Mutex::default(),
            fail_next: AtomicU32::new(0),
            down: AtomicBool::new(false),
            hang: tokio::sync::watch::channel(false).0,
            hung: AtomicU32::new(0),
            delay_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

/// The receiver; stops when dropped.
pub struct Receiver {
    /// `http://127.0.0.1:<port>/hook`.
    pub url: String,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Checks `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`, with the
/// time within 5 minutes of now, exactly as the README's snippet does.
pub fn verify(secret: &str, header: &str, body: &[u8]) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = v.parse::<u64>().ok(),
            Some(("v1", v)) => v1 = Some(v.to_owned()),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    if now.abs_diff(t) > 300 {
        return false;
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    let Ok(given) = (0..v1.len() / 2)
        .map(|i| u8::from_str_radix(v1.get(2 * i..2 * i + 2).unwrap_or("zz"), 16))
        .collect::<Result<Vec<u8>, _>>()
    else {
        return false;
    };
    mac.verify_slice(&given).is_ok()
}

impl Receiver {
    /// Starts a receiver on a free port, answering 200.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let state = Arc::new(State::default());
        let s = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let _ = serve(sock, &s).await;
                });
            }
        });
        Self { url, state, task }
    }

    /// Answers 500 to the next `n` requests.
    pub fn fail_next(&self, n: u32) {
        self.state.fail_next.store(n, Ordering::SeqCst);
    }

    /// While down, every connection is closed without an answer.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    /// While hanging, requests are read but never answered (until it stops hanging:
    /// then their connections close without an answer).
    pub fn set_hang(&self, hang: bool) {
        self.state.hang.send_replace(hang);
    }

    /// Every answer from now on waits this long (a slow receiver).
    pub fn set_delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Requests left unanswered by hanging so far.
    pub fn hung(&self) -> u32 {
        self.state.hung.load(Ordering::SeqCst)
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// The events of the requests answered 2xx, in arrival order.
    pub fn accepted(&self) -> Vec<Value> {
        self.received()
            .into_iter()
            .filter(|r| r.status == 200)
            .flat_map(|r| r.events)
            .collect()
    }

    /// The accepted events of one user, in arrival order.
    pub fn accepted_of(&self, user: &str) -> Vec<Value> {
        self.accepted()
            .into_iter()
            .filter(|e| e["user_id"] == user)
            .collect()
    }

    /// Panics if any request's signature did not verify.
    pub fn assert_all_signed(&self) {
        let bad = self.received().iter().filter(|r| !r.signature_ok).count();
        assert_eq!(
            bad, 0,
            "{bad} webhook requests failed signature verification"
        );
    }
}

async fn serve(sock: tokio::net::TcpStream, state: &State) -> std::io::Result<()> {
    let (rd, mut wr) = sock.into_split();
    let mut rd = BufReader::new(rd);
    loop {
        let mut line = String::new();
        if rd.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let mut length = 0usize;
        let mut signature = String::new();
        loop {
            let mut h = String::new();
            if rd.read_line(&mut h).await? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((name, value)) = h.split_once(':') {
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.parse().unwrap_or(0);
                } else if name.eq_ignore_ascii_case("x-sessionhub-signature") {
                    signature = value.to_owned();
                }
            }
        }
        let mut body = vec![0; length];
        rd.read_exact(&mut body).await?;
        if state.down.load(Ordering::SeqCst) {
            return Ok(()); // closes without an answer
        }
        let mut hang = state.hang.subscribe();
        if *hang.borrow_and_update() {
            state.hung.fetch_add(1, Ordering::SeqCst);
            let _ = hang.wait_for(|h| !*h).await;
            return Ok(()); // closes without an answer
        }
        let fail = state
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let status = if fail { 500 } else { 200 };
        let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let events = parsed["events"].as_array().cloned().unwrap_or_default();
        state.received.lock().unwrap().push(Received {
            events,
            body: String::from_utf8_lossy(&body).into_owned(),
            signature_ok: verify(WEBHOOK_SECRET, &signature, &body),
            status,
            at: Instant::now(),
        });
        let delay = state.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let reason = if fail { "Internal Server Error" } else { "OK" };
        wr.write_all(format!("HTTP/1.1 {status} {reason}\r\ncontent-length: 0\r\n\r\n").as_bytes())
            .await?;
    }
}

/// The environment of a node that delivers to `receiver`, with short timings: a
/// dead node's batch is taken over after 3 s.
pub fn webhook_env(receiver: &Receiver) -> Vec<(String, String)> {
    crate::secrets::remember_secret(WEBHOOK_SECRET);
    vec![
        ("SESSIONHUB_WEBHOOK_URL".into(), receiver.url.clone()),
        ("SESSIONHUB_WEBHOOK_SECRET".into(), WEBHOOK_SECRET.into()),
        ("SESSIONHUB_WEBHOOK_TIMEOUT_MS".into(), "1000".into()),
        ("SESSIONHUB_WEBHOOK_CLAIM_MS".into(), CLAIM_MS.to_string()),
    ]
}

/// The claim bound of [`webhook_env`], in ms.
pub const CLAIM_MS: u64 = 3000;

/// How long a test waits for an event that should arrive: the claim bound, the
/// longest retry delay at that bound, and slack for a loaded machine.
pub const EVENT_WAIT: Duration = Duration::from_millis(CLAIM_MS + CLAIM_MS / 4 + 10_000);
