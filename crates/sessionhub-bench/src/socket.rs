//! One task per open client socket: it keeps reading (so server pings are answered),
//! reports close codes, and records the benchmark messages it receives.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::cluster::Ws;
use crate::stats::now_us;

/// How long a socket the tool closes waits for the server's close frame.
pub const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// The close code a socket saw, and when.
#[derive(Debug, Clone, Copy)]
pub struct Closed {
    /// Which probe socket (index given at spawn).
    pub index: usize,
    /// The close code (1005 if the frame had none; `None` if the stream ended
    /// without a close frame).
    pub code: Option<u16>,
    /// When the close event came: the server closed the connection after the close
    /// frame (what a browser's `onclose` and every standard client wait for).
    pub at: Instant,
    /// When the close frame was read (the end, if there was none).
    pub frame_at: Instant,
    /// When the `session_ended` frame was read, which comes before the close frame
    /// and is what the web client acts on (the close frame, if there was none).
    pub notice_at: Instant,
    /// Whether a `session_ended` frame came before the close.
    pub noticed: bool,
}

/// What a socket task does with what it reads.
pub enum Role {
    /// Background socket: reads and ignores everything.
    Idle,
    /// Reports its close (code and time) on `tx`.
    Probe {
        /// Index reported back.
        index: usize,
        /// Where to report.
        tx: mpsc::UnboundedSender<Closed>,
    },
    /// Records `bench` messages (seq and latency) and counts them in `delivered`.
    Sink {
        /// Shared count of bench messages received by all sinks.
        delivered: Arc<AtomicU64>,
    },
}

/// What a socket task saw, returned when it ends.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Close code received from the server, if any.
    pub close_code: Option<u16>,
    /// True if the tool itself asked the socket to close.
    pub closed_by_us: bool,
    /// `seq` of each bench message, in arrival order.
    pub seqs: Vec<u64>,
    /// Latency of each bench message in microseconds (receive time minus the
    /// payload's send time).
    pub latencies_us: Vec<u64>,
    /// When the last bench message arrived.
    pub last_rx: Option<Instant>,
    /// Text frames that were not bench messages (hello excluded).
    pub other_frames: u64,
}

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    ty: &'a str,
    #[serde(default, borrow)]
    event: Option<&'a str>,
    #[serde(default)]
    data: Option<BenchData>,
}

#[derive(Deserialize)]
struct BenchData {
    t: u64,
    seq: u64,
}

/// Runs one socket until the server closes it, it fails, or `stop` turns true (then
/// the tool closes it with 1000 and waits up to [`CLOSE_WAIT`] for the server's
/// close frame).
pub async fn run(mut ws: Ws, role: Role, mut stop: watch::Receiver<bool>) -> Outcome {
    let mut out = Outcome::default();
    let mut stopping = false;
    let mut frame_at = None;
    let mut notice_at = None;
    loop {
        let msg = if stopping {
            match tokio::time::timeout(CLOSE_WAIT, ws.next()).await {
                Ok(m) => m,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                biased;
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        stopping = true;
                        out.closed_by_us = true;
                        if ws.close(None).await.is_err() {
                            break;
                        }
                    }
                    continue;
                }
                m = ws.next() => m,
            }
        };
        match msg {
            Some(Ok(Message::Text(t))) => {
                if notice_at.is_none() && is_session_ended(t.as_str()) {
                    notice_at = Some(Instant::now());
                }
                on_text(&role, t.as_str(), &mut out)
            }
            Some(Ok(Message::Close(f))) => {
                if out.close_code.is_none() {
                    out.close_code = Some(f.map_or(1005, |f| u16::from(f.code)));
                    frame_at = Some(Instant::now());
                }
                // The library answers the close; keep polling until the stream ends:
                // that is the close event.
                stopping = true;
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break,
        }
    }
    if let Role::Probe { index, tx } = &role {
        let at = Instant::now();
        let _ = tx.send(Closed {
            index: *index,
            code: out.close_code,
            at,
            frame_at: frame_at.unwrap_or(at),
            notice_at: notice_at.or(frame_at).unwrap_or(at),
            noticed: notice_at.is_some(),
        });
    }
    // Best effort: make sure the peer sees the end.
    let _ = ws.close(None).await;
    out
}

/// Whether a text frame is `session_ended`.
fn is_session_ended(text: &str) -> bool {
    serde_json::from_str::<Frame<'_>>(text).is_ok_and(|f| f.ty == "session_ended")
}

fn on_text(role: &Role, text: &str, out: &mut Outcome) {
    let Role::Sink { delivered } = role else {
        out.other_frames += 1;
        return;
    };
    let bench = serde_json::from_str::<Frame<'_>>(text)
        .ok()
        .filter(|f| f.ty == "message" && f.event == Some("bench"))
        .and_then(|f| f.data);
    match bench {
        Some(d) => {
            out.latencies_us.push(now_us().saturating_sub(d.t));
            out.seqs.push(d.seq);
            out.last_rx = Some(Instant::now());
            delivered.fetch_add(1, Ordering::Relaxed);
        }
        None => out.other_frames += 1,
    }
}

/// Reads `ws` until a close frame and returns its code and when it came (`None`
/// code: the stream ended without one). Gives up after `deadline`.
pub async fn read_until_close(ws: &mut Ws, deadline: Duration) -> (Option<u16>, Instant) {
    let end = Instant::now() + deadline;
    loop {
        match tokio::time::timeout_at(end, ws.next()).await {
            Err(_) => return (None, Instant::now()),
            Ok(Some(Ok(Message::Close(f)))) => {
                return (Some(f.map_or(1005, |f| u16::from(f.code))), Instant::now());
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) => return (None, Instant::now()),
        }
    }
}

/// Reads `ws` until a `bench` message with this `seq` arrives. False after
/// `deadline`, or if the socket ends.
pub async fn read_until_seq(ws: &mut Ws, seq: u64, deadline: Duration) -> bool {
    let end = Instant::now() + deadline;
    loop {
        match tokio::time::timeout_at(end, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let hit = serde_json::from_str::<Frame<'_>>(t.as_str())
                    .ok()
                    .and_then(|f| f.data)
                    .is_some_and(|d| d.seq == seq);
                if hit {
                    return true;
                }
            }
            Ok(Some(Ok(_))) => {}
            Err(_) | Ok(Some(Err(_)) | None) => return false,
        }
    }
}

/// Sends our close frame (the close handshake is finished by [`finish_close`]).
pub async fn send_close(ws: &mut Ws) {
    let _ = ws.close(None).await;
}

/// Waits (bounded) for the server's close frame or the end of the stream.
pub async fn finish_close(mut ws: Ws) {
    let _ = read_until_close(&mut ws, CLOSE_WAIT).await;
}

/// Closes `ws` from our side and waits (bounded) for the server's close frame.
pub async fn close(mut ws: Ws) {
    send_close(&mut ws).await;
    finish_close(ws).await;
}
