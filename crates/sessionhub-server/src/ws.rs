//! `GET /ws`: one task per socket, one `select!`.

use std::sync::Arc;
use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, web};
use actix_ws::{AggregatedMessage, CloseCode, CloseReason, ProtocolError};
use bytestring::ByteString;
use futures_util::StreamExt;
use sessionhub_core::protocol::{ClientFrame, ServerFrame, close_code};
use sessionhub_core::{ConnectionId, EndReason, Session};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::auth::{cookie_token, origin_allowed};
use crate::config::WsLimits;
use crate::error::ApiError;
use crate::hub::{CloseCmd, LocalConn};
use crate::metrics::Metrics;
use crate::state::AppState;

/// How long a closing socket waits for the client to take its last frames.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

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
    let (response, ws, stream) = actix_ws::handle(&req, body)
        .map_err(|e| ApiError::BadRequest(format!("not a WebSocket handshake: {e}")))?;

    // Known to the hub first, so a kill racing the registration finds the socket.
    let (conn, rx) = LocalConn::new(
        ConnectionId::generate(token.session_id()),
        token.session_id().clone(),
    );
    state.hub.insert(conn.clone());
    let session = match state.engine.register_connection(&token, &conn.id).await {
        Ok(Some(session)) => session,
        Ok(None) => {
            state.hub.remove(&conn);
            return Err(ApiError::Unauthorized);
        }
        Err(e) => {
            state.hub.remove(&conn);
            return Err(e.into());
        }
    };
    state
        .hub
        .bind_user(&conn, &session.user_id, session.expires_at);

    let max = state.config.ws.max_frame;
    let stream = stream
        .max_frame_size(max)
        .aggregate_continuations()
        .max_continuation_size(max);
    let span = tracing::info_span!(
        "ws",
        connection_id = %conn.id,
        session_id = %session.session_id,
        user_id = %session.user_id,
    );
    actix_web::rt::spawn(
        Socket {
            state: state.into_inner(),
            conn,
            session,
            ws,
        }
        .run(rx, stream)
        .instrument(span),
    );
    Ok(response)
}

/// One socket's task state.
struct Socket {
    state: Arc<AppState>,
    conn: Arc<LocalConn>,
    session: Session,
    ws: actix_ws::Session,
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

fn exit_for(cmd: CloseCmd) -> Exit {
    match cmd {
        CloseCmd::SessionEnded(frame) => {
            Exit::Close(close_code::SESSION_ENDED, "session ended", Some(frame))
        }
        CloseCmd::TooSlow => Exit::Close(close_code::TRY_AGAIN_LATER, "too slow", None),
    }
}

impl Socket {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<ByteString>,
        mut stream: actix_ws::AggregatedMessageStream,
    ) {
        tracing::debug!("connected");
        let hello = ServerFrame::Hello {
            connection_id: &self.conn.id,
            session_id: &self.session.session_id,
            user_id: &self.session.user_id,
            node_id: self.state.engine.node_id(),
        }
        .to_json();
        let exit = if self.send(hello).await.is_err() {
            Exit::Gone
        } else {
            self.serve(&mut rx, &mut stream).await
        };

        // Bookkeeping first: a client that does not read must not hold it up.
        self.state.hub.remove(&self.conn);
        // An ended session's records went with it, and a node shutting down removes
        // all of its records in one step.
        let keep_record = matches!(
            exit,
            Exit::Close(close_code::SESSION_ENDED | close_code::GOING_AWAY, ..)
        );
        if !keep_record && let Err(e) = self.state.engine.unregister_connection(&self.conn.id).await
        {
            tracing::warn!(error = %e, "could not remove the connection record");
        }
        let (frame, reason) = match exit {
            Exit::Gone => (None, None),
            Exit::ClientClosed(reason) => (None, Some(reason)),
            Exit::Close(code, why, frame) => {
                tracing::debug!(code, why, "closing");
                let reason = CloseReason {
                    code: CloseCode::from(code),
                    description: Some(why.to_owned()),
                };
                (frame, Some(Some(reason)))
            }
        };
        if let Some(reason) = reason {
            let mut ws = self.ws;
            let metrics = self.state.metrics.clone();
            let close = async move {
                if let Some(frame) = frame {
                    ws.text(frame).await?;
                    Metrics::inc(&metrics.messages_out);
                }
                ws.close(reason).await
            };
            if tokio::time::timeout(CLOSE_TIMEOUT, close).await.is_err() {
                tracing::debug!("the client did not take the close frame in time");
            }
        }
        tracing::debug!("disconnected");
    }

    async fn serve(
        &mut self,
        rx: &mut mpsc::Receiver<ByteString>,
        stream: &mut actix_ws::AggregatedMessageStream,
    ) -> Exit {
        let limits = self.state.config.ws;
        let mut ping = tokio::time::interval(limits.ping_interval);
        ping.tick().await;
        let mut last_pong = tokio::time::Instant::now();
        let mut rate = RateLimit::new(&limits);
        let conn = self.conn.clone();
        let shutdown = self.state.shutdown.clone();
        loop {
            tokio::select! {
                // Closing wins over anything still queued.
                biased;
                cmd = conn.closed() => return exit_for(cmd),
                _ = shutdown.cancelled() => {
                    return Exit::Close(close_code::GOING_AWAY, "node shutting down", None);
                }
                frame = rx.recv() => {
                    let Some(frame) = frame else { return Exit::Gone };
                    // A client that stops reading blocks this send; a close request
                    // (too slow, session ended) must still get through.
                    tokio::select! {
                        biased;
                        cmd = conn.closed() => return exit_for(cmd),
                        sent = self.send(frame) => if sent.is_err() { return Exit::Gone },
                    }
                }
                msg = stream.next() => match msg {
                    None => return Exit::Gone,
                    Some(Ok(AggregatedMessage::Close(reason))) => return Exit::ClientClosed(reason),
                    Some(Ok(AggregatedMessage::Text(text))) => {
                        Metrics::inc(&self.state.metrics.messages_in);
                        if !rate.allow() {
                            return Exit::Close(close_code::POLICY, "message rate limit exceeded", None);
                        }
                        self.activity().await;
                        if let Some(exit) = self.on_text(&text).await {
                            return exit;
                        }
                    }
                    Some(Ok(AggregatedMessage::Binary(_))) => {
                        Metrics::inc(&self.state.metrics.messages_in);
                        if !rate.allow() {
                            return Exit::Close(close_code::POLICY, "message rate limit exceeded", None);
                        }
                        self.error("binary_unsupported", "only JSON text frames are accepted").await;
                    }
                    Some(Ok(AggregatedMessage::Ping(data))) => {
                        // Pings are answered, so they count against the rate too.
                        if !rate.allow() {
                            return Exit::Close(close_code::POLICY, "message rate limit exceeded", None);
                        }
                        if self.ws.pong(&data).await.is_err() {
                            return Exit::Gone;
                        }
                    }
                    Some(Ok(AggregatedMessage::Pong(_))) => last_pong = tokio::time::Instant::now(),
                    Some(Err(ProtocolError::Overflow)) => {
                        return Exit::Close(close_code::TOO_LARGE, "message too large", None);
                    }
                    Some(Err(ProtocolError::Io(e))) if e.kind() == std::io::ErrorKind::InvalidData => {
                        return Exit::Close(close_code::INVALID_DATA, "text frame is not valid UTF-8", None);
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "protocol error");
                        return Exit::Close(close_code::POLICY, "protocol error", None);
                    }
                },
                _ = ping.tick() => {
                    if last_pong.elapsed() > limits.pong_timeout {
                        return Exit::Close(close_code::POLICY, "ping timeout", None);
                    }
                    if self.ws.ping(b"").await.is_err() {
                        return Exit::Gone;
                    }
                }
            }
        }
    }

    /// Handles one client text frame. Bad frames get an `error` frame; the socket
    /// stays usable.
    async fn on_text(&mut self, text: &str) -> Option<Exit> {
        match ClientFrame::decode(text) {
            Ok(ClientFrame::Ping) => {
                if self.send(ServerFrame::Pong.to_json()).await.is_err() {
                    return Some(Exit::Gone);
                }
            }
            Ok(ClientFrame::KillSession { session_id }) => {
                let owner = Some(&self.session.user_id);
                let res =
                    crate::api::kill(&self.state, &session_id, owner, EndReason::Killed).await;
                match res {
                    Ok(true) => tracing::info!(killed = %session_id, "session killed by its user"),
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
        None
    }

    /// A client message is activity: it keeps the session from idling out (written
    /// to the store at most once per refresh interval).
    async fn activity(&mut self) {
        let refresh = self.state.config.sessions.idle_refresh.as_millis() as i64;
        let now = sessionhub_core::time::now_ms();
        if now - self.session.last_seen_at >= refresh {
            crate::auth::touch_if_due(&self.state, &self.session).await;
            self.session.last_seen_at = now;
        }
    }

    async fn error(&mut self, code: &str, message: &str) {
        let _ = self
            .send(ServerFrame::Error { code, message }.to_json())
            .await;
    }

    /// Sends one text frame, counted.
    async fn send(&mut self, frame: impl Into<ByteString>) -> Result<(), actix_ws::Closed> {
        self.ws.text(frame).await?;
        Metrics::inc(&self.state.metrics.messages_out);
        Ok(())
    }
}
