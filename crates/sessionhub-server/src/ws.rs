//! `GET /ws`: one task per socket, one `select!`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse, web};
use actix_ws::{CloseCode, CloseReason, Item, Message, ProtocolError};
use bytestring::ByteString;
use futures_util::StreamExt;
use sessionhub_core::protocol::{ClientFrame, ServerFrame, close_code};
use sessionhub_core::{ConnectionId, EndReason, HistoryState, Recovery, Session};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::auth::{cookie_token, origin_allowed};
use crate::config::WsLimits;
use crate::error::ApiError;
use crate::hub::{CloseCmd, Hub, LocalConn, Next, Outbound};
use crate::metrics::Metrics;
use crate::state::AppState;

/// How long a closing socket waits for the client to take its last frames.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long, after our close frame went out, the socket waits for the client's
/// close frame before closing the TCP connection anyway.
pub const CLOSE_REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long after a `session_ended` frame the server sends its close frame (4001),
/// unless the client closed first; see `close_socket`.
pub const SESSION_ENDED_CLOSE_DELAY: Duration = Duration::from_millis(5);

/// The WebSocket response body, held open until the closing handshake is done.
///
/// actix-ws ends the body right after our close frame. actix-http would then
/// linger, reading and discarding the client's bytes until the client closes TCP
/// or `client_disconnect_timeout` runs out (1 s by default). But a WebSocket client
/// waits for the *server* to close TCP first (RFC 6455 §7.1.1), so every client
/// saw its close event a second late. The node therefore runs with no disconnect
/// timeout (TCP is closed as soon as a body ends), and this wrapper ends the body
/// only when the socket task lets go of `release`: once the client's close frame
/// has been read, so that nothing unread is left to turn our FIN into a reset.
struct HoldOpen {
    body: BoxBody,
    body_done: bool,
    release: oneshot::Receiver<()>,
}

impl MessageBody for HoldOpen {
    type Error = Box<dyn std::error::Error>;

    fn size(&self) -> BodySize {
        BodySize::Stream
    }

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let this = &mut *self;
        if !this.body_done {
            match Pin::new(&mut this.body).poll_next(cx) {
                Poll::Ready(None) => this.body_done = true,
                other => return other,
            }
        }
        // Released (or the socket task is gone): end the body, closing TCP.
        Pin::new(&mut this.release).poll(cx).map(|_| None)
    }
}

/// The query of `GET /ws`: where a reconnecting client left off.
#[derive(Debug, Default, serde::Deserialize)]
struct WsQuery {
    since: Option<String>,
    epoch: Option<String>,
}

/// What the socket asked to recover, or why its request could not be read.
fn recovery_request(req: &HttpRequest) -> Result<Option<Recovery>, String> {
    let q = web::Query::<WsQuery>::from_query(req.query_string())
        .map_err(|e| format!("the query string cannot be read: {e}"))?;
    Recovery::from_query(q.since.as_deref(), q.epoch.as_deref())
}

/// A token bucket: `burst` messages at once, refilled at `rate` per second.
struct RateLimit {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: tokio::time::Instant,
}

impl RateLimit {
    fn new(limits: &WsLimits) -> Self {
        Self {
            tokens: f64::from(limits.burst),
            rate: f64::from(limits.rate),
            burst: f64::from(limits.burst),
            last: tokio::time::Instant::now(),
        }
    }

    /// Takes one token; false when the client is over its rate.
    fn allow(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Upgrades an authenticated request to a WebSocket.
pub async fn upgrade(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let metrics = state.metrics.clone();
    let res = accept(req, body, state).await;
    if res.is_err() {
        Metrics::inc(&metrics.upgrades_refused);
    }
    res
}

async fn accept(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    if state.shutdown.is_cancelled() {
        return Err(ApiError::Unavailable);
    }
    let token = cookie_token(&req)?;
    if !origin_allowed(&req, &state.config) {
        return Err(ApiError::Forbidden("origin not allowed"));
    }
    // A malformed request is answered on the socket (recovered: false and an error
    // frame), not by refusing it: the client still gets a working socket.
    let (recovery, bad_recovery) = match recovery_request(&req) {
        Ok(r) => (r, None),
        Err(e) => (None, Some(e)),
    };
    let (response, ws, stream) = actix_ws::handle(&req, body)
        .map_err(|e| ApiError::BadRequest(format!("not a WebSocket handshake: {e}")))?;
    let (release, released) = oneshot::channel();
    let response = response
        .map_body(|_, body| HoldOpen {
            body,
            body_done: false,
            release: released,
        })
        .map_into_boxed_body();

    // Known to the hub first, so a kill racing the registration finds the socket.
    let conn = LocalConn::new(
        ConnectionId::generate(token.session_id()),
        token.session_id().clone(),
    );
    state.hub.insert(conn.clone());
    let listed = Listed {
        hub: &state.hub,
        conn: Some(conn.clone()),
    };
    let registered = state
        .engine
        .register_recovering(&token, &conn.id, recovery.as_ref())
        .await;
    let (session, history) = match registered {
        Ok(Some(r)) => (r.session, r.history),
        Ok(None) => return Err(ApiError::Unauthorized),
        Err(e) => return Err(e.into()),
    };
    listed.keep();
    // Where the socket starts in its user's history, before its record is listed
    // for a resync (see `Hub::note_history_points`).
    if let Some(h) = &history {
        conn.start_history(&h.epoch, h.offset);
    }
    state
        .hub
        .bind_user(&conn, &session.user_id, session.expires_at);

    // Fragments are put together here, not by actix-ws, so that every frame,
    // empty continuations included, counts against the rate limit.
    let stream = stream.max_frame_size(state.config.ws.max_frame);
    // The socket keeps its session for its ids and activity time only: the device
    // details and the session's connection list would be held by every socket.
    let mut session = session;
    session.user_agent = None;
    session.ip = None;
    session.connections = Vec::new();
    let tracker = state.sockets.clone();
    let sock = Socket {
        state: state.into_inner(),
        conn,
        session,
        ws,
        release,
        history,
        asked: recovery.is_some() || bad_recovery.is_some(),
        bad_recovery,
    };
    actix_web::rt::spawn(tracker.track_future(sock.run(stream)));
    Ok(response)
}

/// A socket in the hub whose task has not started: taken out again when dropped,
/// unless kept. The upgrade's handler holds it while the socket registers: a
/// refused or failed registration returns early, and a client that resets the
/// connection meanwhile makes actix drop the handler's future mid-call. Either way
/// nothing else would remove the socket from the hub, which would go on counting it
/// and queueing frames for it. (A record the dropped call may still write in Redis
/// is the engine's to remove: it queues the removal when its call is dropped.)
struct Listed<'a> {
    hub: &'a Hub,
    conn: Option<Arc<LocalConn>>,
}

impl Listed<'_> {
    /// The socket's task takes over.
    fn keep(mut self) {
        self.conn = None;
    }
}

impl Drop for Listed<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.hub.remove(&conn);
        }
    }
}

/// A fragmented message being put together (RFC 6455 §5.4).
#[derive(Default)]
struct Fragments {
    /// Whether it is text; `None` when no fragmented message is open.
    text: Option<bool>,
    buf: web::BytesMut,
}

impl Fragments {
    /// Takes one frame: a whole message comes back as it is, a final fragment as the
    /// message it completes, other fragments as `None`. Data frames interleaved with
    /// a fragmented message are a protocol error; a message past `max` bytes in all
    /// is too large.
    fn push(&mut self, msg: Message, max: usize) -> Result<Option<Message>, ProtocolError> {
        let (chunk, last) = match msg {
            Message::Continuation(Item::FirstText(_) | Item::FirstBinary(_))
                if self.text.is_some() =>
            {
                return Err(ProtocolError::ContinuationStarted);
            }
            Message::Continuation(Item::FirstText(b)) => {
                self.text = Some(true);
                (b, false)
            }
            Message::Continuation(Item::FirstBinary(b)) => {
                self.text = Some(false);
                (b, false)
            }
            Message::Continuation(Item::Continue(b)) => (b, false),
            Message::Continuation(Item::Last(b)) => (b, true),
            Message::Text(_) | Message::Binary(_) if self.text.is_some() => {
                return Err(ProtocolError::ContinuationStarted);
            }
            other => return Ok(Some(other)),
        };
        let Some(text) = self.text else {
            return Err(ProtocolError::ContinuationNotStarted);
        };
        if self.buf.len() + chunk.len() > max {
            return Err(ProtocolError::Overflow);
        }
        self.buf.extend_from_slice(&chunk);
        if !last {
            return Ok(None);
        }
        self.text = None;
        let whole = std::mem::take(&mut self.buf).freeze();
        if !text {
            return Ok(Some(Message::Binary(whole)));
        }
        ByteString::try_from(whole)
            .map(|t| Some(Message::Text(t)))
            .map_err(|e| ProtocolError::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
    }
}

/// The close for a frame that breaks the protocol or the limits.
fn protocol_exit(e: ProtocolError) -> Exit {
    match e {
        ProtocolError::Overflow => Exit::Close(close_code::TOO_LARGE, "message too large", None),
        // Text that is not UTF-8 (actix-ws and Fragments wrap the Utf8Error); other
        // InvalidData errors are the codec's (reserved bits set, ...).
        ProtocolError::Io(e)
            if e.get_ref()
                .is_some_and(|inner| inner.is::<std::str::Utf8Error>()) =>
        {
            Exit::Close(
                close_code::INVALID_DATA,
                "text frame is not valid UTF-8",
                None,
            )
        }
        e => {
            tracing::debug!(error = %e, "protocol error");
            Exit::Close(close_code::PROTOCOL_ERROR, "protocol error", None)
        }
    }
}

/// Sends the close frame for `exit` (after its last text frame, if any) and, when
/// the server closes first, waits for the client's close frame, each bounded.
///
/// A `session_ended` frame goes out at once, the close frame
/// [`SESSION_ENDED_CLOSE_DELAY`] later (its close frame is answered at once if the
/// client closes first). A kill or an expiry usually ends several sockets
/// at once, on this node and others: the closing handshake of the first (the
/// client's close frame, reading it, closing TCP, on both ends) took the CPU that
/// the notices to the others were waiting for. Measured in the peers' harness, the
/// last socket of a killed session learnt of it ~0.45 ms sooner (BENCHMARKS.md).
async fn close_socket(
    mut ws: actix_ws::Session,
    exit: Exit,
    metrics: &Metrics,
    stream: &mut actix_ws::MessageStream,
) {
    let (frame, mut reason, mut await_reply) = match exit {
        Exit::Gone => return,
        // The client's close frame is read: ours answers it, then TCP closes.
        Exit::ClientClosed(reason) => (None, reason, false),
        Exit::Close(code, why, frame) => {
            tracing::debug!(code, why, "closing");
            let reason = CloseReason {
                code: CloseCode::from(code),
                description: Some(why.to_owned()),
            };
            (frame, Some(reason), true)
        }
    };
    if let Some(frame) = frame {
        match tokio::time::timeout(CLOSE_TIMEOUT, ws.text(frame)).await {
            Ok(Ok(())) => Metrics::inc(&metrics.messages_out),
            Ok(Err(actix_ws::Closed)) => return,
            Err(_) => {
                tracing::debug!("the client did not take the last frame in time");
                return;
            }
        }
        match tokio::time::timeout(SESSION_ENDED_CLOSE_DELAY, client_close(stream)).await {
            // Not closed yet: ours goes now, as planned.
            Err(_) => {}
            // The client closed first: answer its close frame, then TCP closes.
            Ok(Some(theirs)) => {
                reason = theirs;
                await_reply = false;
            }
            Ok(None) => return,
        }
    }
    match tokio::time::timeout(CLOSE_TIMEOUT, ws.close(reason)).await {
        Ok(Ok(())) if await_reply => {
            // We closed first: the client answers with its close frame, and then
            // waits for us to close TCP.
            if tokio::time::timeout(CLOSE_REPLY_TIMEOUT, client_close(stream))
                .await
                .is_err()
            {
                tracing::debug!("the client did not answer the close frame in time");
            }
        }
        Ok(_) => {}
        Err(_) => tracing::debug!("the client did not take the close frame in time"),
    }
}

/// Reads (and drops) what the client sends until its close frame: `Some` with its
/// reason, or `None` if the connection ended or broke first.
async fn client_close(stream: &mut actix_ws::MessageStream) -> Option<Option<CloseReason>> {
    while let Some(msg) = stream.next().await {
        match msg {
            Ok(Message::Close(reason)) => return Some(reason),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    None
}

/// One socket's task state.
struct Socket {
    state: Arc<AppState>,
    conn: Arc<LocalConn>,
    session: Session,
    ws: actix_ws::Session,
    /// Dropped when the closing handshake is done: ends the response, closing TCP.
    release: oneshot::Sender<()>,
    /// The user's history as the registration saw it (with the recovered frames
    /// until they are sent).
    history: Option<HistoryState>,
    /// Whether the client asked to recover.
    asked: bool,
    /// Why its recovery request could not be read.
    bad_recovery: Option<String>,
}

/// How the loop ended.
enum Exit {
    /// The client vanished.
    Gone,
    /// The client sent a close frame: answer it, as RFC 6455 asks, so the
    /// connection ends cleanly at once.
    ClientClosed(Option<CloseReason>),
    /// We close with this code (and send this frame first).
    Close(u16, &'static str, Option<ByteString>),
}

/// Waits for `send`, a write that waits while actix-ws's queue is full (as it is
/// once a client stops reading), but no longer than a close request for the socket
/// (a kill, a 1013), the node's shutdown, or `limit` (the pong timeout: a client
/// that takes nothing for that long is as good as one that stopped answering
/// pings). Unbounded, one send held such a client's task deaf to all three.
async fn bounded(
    hub: &Hub,
    conn: &LocalConn,
    shutdown: &CancellationToken,
    limit: Duration,
    send: impl Future<Output = Result<(), actix_ws::Closed>>,
) -> Result<(), Exit> {
    let mut send = std::pin::pin!(send);
    // Usually there is room: the send is done on its first poll, with nothing else
    // to watch, no close request to look up and no timer made. (A close requested
    // meanwhile is the next thing the socket's loop sees.)
    let first = std::future::poll_fn(|cx| Poll::Ready(send.as_mut().poll(cx))).await;
    if let Poll::Ready(sent) = first {
        return sent.map_err(|actix_ws::Closed| Exit::Gone);
    }
    tokio::select! {
        // Closing wins over the send, as in the socket's loop.
        biased;
        cmd = conn.closed() => Err(exit_for(cmd)),
        sent = &mut send => sent.map_err(|actix_ws::Closed| Exit::Gone),
        () = shutdown.cancelled() => Err(going_away()),
        () = tokio::time::sleep(limit) => {
            // Closed as a socket whose queue overflowed is, and counted with them.
            hub.count_slow_close();
            Err(too_slow())
        }
    }
}

fn too_slow() -> Exit {
    Exit::Close(close_code::TRY_AGAIN_LATER, "too slow", None)
}

fn going_away() -> Exit {
    Exit::Close(close_code::GOING_AWAY, "node shutting down", None)
}

fn exit_for(cmd: CloseCmd) -> Exit {
    match cmd {
        CloseCmd::SessionEnded(frame) => {
            Exit::Close(close_code::SESSION_ENDED, "session ended", Some(frame))
        }
        CloseCmd::TooSlow => too_slow(),
        CloseCmd::Missed => Exit::Close(
            close_code::SERVICE_RESTART,
            "missed messages while the node was not subscribed; reconnect with since",
            None,
        ),
    }
}

impl Socket {
    /// The socket's task. Not an `async fn`: an async fn's arguments are kept twice
    /// in its future (as arguments and as moved-in locals), and this future is what
    /// every idle socket keeps (400 bytes less per socket, measured).
    #[allow(clippy::manual_async_fn)]
    fn run(mut self, mut stream: actix_ws::MessageStream) -> impl Future<Output = ()> {
        async move {
            // The cold steps (greeting, a client's text frame, closing) are boxed: their
            // futures are then not part of the task's own.
            let span = self.span();
            let greeting = Box::pin(async {
                tracing::debug!("connected");
                self.greet().await
            });
            let exit = match greeting.instrument(span).await {
                Ok(top) => self.serve(&mut stream, top).await,
                Err(exit) => exit,
            };
            let span = self.span();
            Box::pin(self.finish(exit, stream)).instrument(span).await;
        }
    }

    /// The socket's span: its connection, session and user. Made for each step that
    /// may log (greeting, a client's text frame, closing), not held for the socket's
    /// life: the subscriber formats a span's fields when it is made and keeps them
    /// with it, ~0.7 KiB that every idle socket would hold.
    fn span(&self) -> tracing::Span {
        tracing::info_span!(
            "ws",
            connection_id = %self.conn.id,
            session_id = %self.session.session_id,
            user_id = %self.session.user_id,
        )
    }

    /// Closes the socket as `exit` says and removes its record.
    async fn finish(self, exit: Exit, mut stream: actix_ws::MessageStream) {
        // The hub forgets the socket at once, so nothing more is queued for it.
        self.state.hub.remove(&self.conn);
        self.conn.close_outbox();
        // An ended session's records went with it, and a node shutting down removes
        // all of its records in one step.
        let keep_record = matches!(
            exit,
            Exit::Close(close_code::SESSION_ENDED | close_code::GOING_AWAY, ..)
        );
        let Self {
            ws,
            release,
            state,
            conn,
            ..
        } = self;
        // The record goes while the socket closes: neither a slow Redis nor a client
        // that does not read holds up the other.
        let unregister = async {
            if !keep_record && let Err(e) = state.engine.unregister_connection(&conn.id).await {
                tracing::warn!(error = %e, "could not remove the connection record; retrying");
            }
        };
        let closing = async {
            close_socket(ws, exit, &state.metrics, &mut stream).await;
            // The closing handshake is done: the response ends and TCP closes.
            drop(release);
        };
        tokio::join!(unregister, closing);
        tracing::debug!("disconnected");
    }

    /// Sends `hello`, then the recovered frames (and an `error` frame for a recovery
    /// request that could not be read). Returns the offset up to which recoverable
    /// frames have been accounted for: live ones up to it are not sent again.
    async fn greet(&mut self) -> Result<u64, Exit> {
        let mut history = self.history.take();
        let recovery = history.as_mut().and_then(|h| h.recovery.take());
        let recovered = match &recovery {
            Some(r) => Some(r.recovered),
            None => self.asked.then_some(false),
        };
        let hello = ServerFrame::Hello {
            connection_id: &self.conn.id,
            session_id: &self.session.session_id,
            user_id: &self.session.user_id,
            node_id: self.state.engine.node_id(),
            epoch: history.as_ref().map(|h| h.epoch.as_str()),
            offset: history.as_ref().map(|h| h.offset),
            recovered,
            missed: recovery
                .as_ref()
                .filter(|r| r.recovered)
                .map(|r| r.frames.len()),
        }
        .to_json();
        self.send(hello).await?;
        if let Some(r) = recovery {
            Metrics::add(
                &self.state.metrics.recovered_messages,
                r.frames.len() as u64,
            );
            Metrics::inc(if r.recovered {
                &self.state.metrics.recoveries
            } else {
                &self.state.metrics.recoveries_failed
            });
            for f in r.frames {
                self.send(f.frame).await?;
            }
        } else if self.asked {
            Metrics::inc(&self.state.metrics.recoveries_failed);
        }
        if let Some(why) = self.bad_recovery.take()
            && let Some(exit) = self.error("bad_recovery", &why).await
        {
            return Err(exit);
        }
        Ok(history.map_or(0, |h| h.offset))
    }

    async fn serve(&mut self, stream: &mut actix_ws::MessageStream, recovered_upto: u64) -> Exit {
        let limits = self.state.config.ws;
        let mut ping = sessionhub_core::time::interval_from_now(limits.ping_interval);
        let mut last_pong = tokio::time::Instant::now();
        let mut rate = RateLimit::new(&limits);
        let mut fragments = Fragments::default();
        let conn = self.conn.clone();
        let shutdown = self.state.shutdown.clone();
        // Only frames queued before the greeting was done can be ones it sent from
        // history (queued while the socket registered): later ones are newer, even
        // when their offset is lower (the user's numbering restarted: its history
        // key expired or was lost while the socket stayed open).
        let mut early = conn.queued();
        loop {
            tokio::select! {
                // Closing wins over anything still queued, then a shutdown.
                biased;
                next = conn.next() => {
                    let Outbound { frame, offset } = match next {
                        Next::Close(cmd) => return exit_for(cmd),
                        Next::Frame(_) if shutdown.is_cancelled() => return going_away(),
                        Next::Frame(f) => f,
                    };
                    // Queued while the socket registered, and already sent from history.
                    let was_early = early > 0;
                    early = early.saturating_sub(1);
                    if was_early && offset != 0 && offset <= recovered_upto {
                        continue;
                    }
                    // A client that stops reading blocks this send; a close request
                    // (too slow, session ended) must still get through (`bounded`).
                    // Boxed, like the other sends: kept inline, the largest of them
                    // would size the task of every idle socket.
                    if let Err(exit) = Box::pin(self.send(frame)).await {
                        return exit;
                    }
                    if offset != 0 {
                        conn.saw(offset);
                    }
                }
                _ = shutdown.cancelled() => return going_away(),
                msg = stream.next() => {
                    let Some(msg) = msg else { return Exit::Gone };
                    // Every frame counts, control frames and empty fragments too: each
                    // costs this task work, and some are answered.
                    if !matches!(msg, Ok(Message::Close(_)) | Ok(Message::Nop)) && !rate.allow() {
                        return Exit::Close(close_code::POLICY, "message rate limit exceeded", None);
                    }
                    let msg = match msg.map(|m| fragments.push(m, limits.max_frame)) {
                        Ok(Ok(Some(m))) => m,
                        Ok(Ok(None)) => continue,
                        Ok(Err(e)) | Err(e) => return self.span().in_scope(|| protocol_exit(e)),
                    };
                    match msg {
                        Message::Close(reason) => return Exit::ClientClosed(reason),
                        Message::Text(text) => {
                            Metrics::inc(&self.state.metrics.messages_in);
                            let span = self.span();
                            let handled = Box::pin(async {
                                self.activity().await;
                                self.on_text(&text).await
                            });
                            if let Some(exit) = handled.instrument(span).await {
                                return exit;
                            }
                        }
                        Message::Binary(_) => {
                            Metrics::inc(&self.state.metrics.messages_in);
                            let refused = self.error("binary_unsupported", "only JSON text frames are accepted");
                            if let Some(exit) = Box::pin(refused).await {
                                return exit;
                            }
                        }
                        Message::Ping(data) => {
                            let pong = bounded(&self.state.hub, &conn, &shutdown, limits.pong_timeout, self.ws.pong(&data));
                            if let Err(exit) = Box::pin(pong).await {
                                return exit;
                            }
                        }
                        Message::Pong(_) => last_pong = tokio::time::Instant::now(),
                        Message::Continuation(_) | Message::Nop => {}
                    }
                }
                _ = ping.tick() => {
                    if last_pong.elapsed() > limits.pong_timeout {
                        return Exit::Close(close_code::POLICY, "ping timeout", None);
                    }
                    let ping = bounded(&self.state.hub, &conn, &shutdown, limits.pong_timeout, self.ws.ping(b""));
                    if let Err(exit) = Box::pin(ping).await {
                        return exit;
                    }
                }
            }
        }
    }

    /// Handles one client text frame. Bad frames get an `error` frame; the socket
    /// stays usable.
    async fn on_text(&mut self, text: &str) -> Option<Exit> {
        match ClientFrame::decode(text) {
            Ok(ClientFrame::Ping) => return self.send(ServerFrame::Pong.to_json()).await.err(),
            Ok(ClientFrame::KillSession { session_id }) => {
                let owner = Some(&self.session.user_id);
                let res =
                    crate::lifecycle::kill(&self.state, &session_id, owner, EndReason::Killed)
                        .await;
                match res {
                    Ok(true) => {
                        tracing::info!(killed = %session_id, "session killed by its user");
                        None
                    }
                    Ok(false) => self.error("not_found", "no such session").await,
                    Err(e) => {
                        tracing::warn!(error = %e, "kill_session failed");
                        self.error("unavailable", "session store unavailable, retry later")
                            .await
                    }
                }
            }
            Err(e) => self.error(e.code, &e.message).await,
        }
    }

    /// A client message is activity: it keeps the session from idling out (written
    /// to the store at most once per refresh interval).
    async fn activity(&mut self) {
        let now = sessionhub_core::time::now_ms();
        if now - self.session.last_seen_at >= crate::auth::refresh_ms(&self.state, &self.session) {
            // Only once recorded: after a failed write the next activity tries
            // again, rather than half an idle timeout later, when it may be late.
            if crate::auth::touch_if_due(&self.state, &self.session).await {
                // Its idle timeout stays what it was.
                let idle = self.session.idle_ms();
                self.session.last_seen_at = now;
                self.session.idle_expires_at = now + idle;
            }
        }
    }

    /// Sends an `error` frame; `Some` if the socket must end instead.
    async fn error(&mut self, code: &str, message: &str) -> Option<Exit> {
        self.send(ServerFrame::Error { code, message }.to_json())
            .await
            .err()
    }

    /// Sends one text frame, counted; bounded as [`bounded`] says.
    async fn send(&mut self, frame: impl Into<ByteString>) -> Result<(), Exit> {
        let limit = self.state.config.ws.pong_timeout;
        let text = self.ws.text(frame);
        let state = &self.state;
        bounded(&state.hub, &self.conn, &state.shutdown, limit, text).await?;
        Metrics::inc(&self.state.metrics.messages_out);
        Ok(())
    }
}
