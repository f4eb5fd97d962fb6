//! Clients for the HTTP API and `/ws`.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use reqwest::{Method, Response, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::process::Node;
use crate::{API_KEY, WAIT};

/// The answer to `POST /api/v1/sessions`.
#[derive(Debug, Clone, Deserialize)]
pub struct Created {
    pub session_id: String,
    pub user_id: String,
    pub token: String,
    pub created_at: String,
    pub expires_at: String,
}

/// How long the test client keeps an idle keep-alive connection: well under the
/// node's keep-alive (actix-web's default, 5 s), as a client behind a server with
/// that timeout should. A connection kept longer can be closed by the node just as
/// the client sends on it, and that request then fails with a reset (seen once,
/// in a burst of logins whose pool held connections idle since an earlier burst).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(2);

/// HTTP calls against one node.
#[derive(Clone)]
pub struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(node: &Node) -> Self {
        Self::at(&node.base)
    }

    /// Calls against any base URL (a load balancer, say).
    pub fn at(base: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            http: reqwest::Client::builder()
                .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                .build()
                .unwrap(),
        }
    }
    /// `POST /api/v1/publish` of `data` as event `event` to `to`; asserts 202 and
    /// returns the answer.
    pub async fn publish(&self, to: Value, event: &str, data: Value) -> Value {
        let res = self
            .service(
                Method::POST,
                "/api/v1/publish",
                Some(serde_json::json!({ "to": to, "event": event, "data": data })),
            )
            .await;
        assert_eq!(res.status(), StatusCode::ACCEPTED, "publish to {to}");
        res.json().await.unwrap()
    }

    /// A service API call with the API key.
    pub async fn service(&self, method: Method, path: &str, body: Option<Value>) -> Response {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(API_KEY);
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send().await.unwrap()
    }

    /// A self-service call with a session cookie.
    pub async fn me(&self, method: Method, path: &str, token: &str) -> Response {
        self.http
            .request(method, format!("{}{path}", self.base))
            .header("Cookie", format!("sh_session={token}"))
            .send()
            .await
            .unwrap()
    }

    /// Any request, to check how bad input is answered.
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.base))
    }

    /// Creates a session for `user`.
    pub async fn create_session(&self, user: &str, user_agent: &str) -> Created {
        self.create_session_with(
            json!({ "user_id": user, "user_agent": user_agent, "ip": "192.0.2.7" }),
        )
        .await
    }

    /// Creates a session from a `POST /api/v1/sessions` body (lifetimes, ...).
    pub async fn create_session_with(&self, body: Value) -> Created {
        let res = self
            .service(Method::POST, "/api/v1/sessions", Some(body))
            .await;
        assert_eq!(res.status(), StatusCode::CREATED, "create session");
        let created: Created = res.json().await.unwrap();
        crate::secrets::remember(&created.token);
        created
    }

    /// The nodes holding the session's live connections (one entry per
    /// connection), or `None` if the session is unknown.
    pub async fn connection_nodes(&self, session_id: &str) -> Option<Vec<String>> {
        let path = format!("/api/v1/sessions/{session_id}");
        let res = self.service(Method::GET, &path, None).await;
        if res.status() == StatusCode::NOT_FOUND {
            return None;
        }
        let s: Value = res.json().await.unwrap();
        Some(
            s["connections"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["node_id"].as_str().unwrap().to_owned())
                .collect(),
        )
    }

    /// Waits until the session has no live connection left.
    pub async fn wait_no_connections(&self, session_id: &str, what: &str) {
        crate::wait_for(what, WAIT, || async {
            self.connection_nodes(session_id)
                .await
                .is_some_and(|n| n.is_empty())
                .then_some(())
        })
        .await
    }

    /// Status of `GET /api/v1/me` with `token`.
    pub async fn me_status(&self, token: &str) -> StatusCode {
        self.me(Method::GET, "/api/v1/me", token).await.status()
    }
}

/// Why a WebSocket could not be opened.
#[derive(Debug)]
pub enum WsError {
    /// The upgrade was answered with this HTTP status.
    Http(u16),
    /// Anything else.
    Other(String),
}

type Stream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A socket's end as a standard client sees it.
#[derive(Debug)]
pub struct CloseEvent {
    /// The close code.
    pub code: u16,
    /// The text frames read before the close frame.
    pub frames: Vec<Value>,
    /// From the last text frame (or from the call, if none) to the TCP close.
    pub after_last_frame: Duration,
    /// From the close frame to the TCP close.
    pub after_close_frame: Duration,
}

/// A `/ws` client.
pub struct WsClient {
    stream: Stream,
    /// The `hello` frame.
    pub hello: Value,
}

impl WsClient {
    /// Opens `/ws` on `node` with a session cookie and reads `hello`.
    pub async fn connect(node: &Node, token: &str) -> Result<Self, WsError> {
        Self::connect_with(node, &[("Cookie", format!("sh_session={token}"))]).await
    }

    /// Opens a `/ws` URL with a session cookie and reads `hello`.
    pub async fn connect_url(url: &str, token: &str) -> Result<Self, WsError> {
        Self::connect_url_with(url, &[("Cookie", format!("sh_session={token}"))]).await
    }

    /// Opens `/ws` with the given headers and reads `hello`.
    pub async fn connect_with(node: &Node, headers: &[(&str, String)]) -> Result<Self, WsError> {
        Self::connect_url_with(&node.ws_url(), headers).await
    }

    /// Opens a `/ws` URL with the given headers and reads `hello`.
    pub async fn connect_url_with(url: &str, headers: &[(&str, String)]) -> Result<Self, WsError> {
        let mut req = url.into_client_request().unwrap();
        for (k, v) in headers {
            req.headers_mut().insert(
                tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let stream = match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req)).await {
            Err(_) => return Err(WsError::Other("connect timed out".into())),
            Ok(Err(tungstenite::Error::Http(res))) => {
                return Err(WsError::Http(res.status().as_u16()));
            }
            Ok(Err(e)) => return Err(WsError::Other(e.to_string())),
            Ok(Ok((s, _))) => s,
        };
        let mut c = Self {
            stream,
            hello: Value::Null,
        };
        let hello = c.next_json().await;
        assert_eq!(hello["type"], "hello", "first frame must be hello: {hello}");
        c.hello = hello;
        Ok(c)
    }

    /// This socket's connection id.
    pub fn connection_id(&self) -> &str {
        self.hello["connection_id"].as_str().unwrap()
    }

    /// The next JSON text frame (control frames are skipped); panics on close or
    /// after the deadline.
    pub async fn next_json(&mut self) -> Value {
        loop {
            match self.next_message().await {
                Message::Text(t) => return serde_json::from_str(&t).unwrap(),
                Message::Close(f) => panic!("socket closed while a frame was expected: {f:?}"),
                Message::Binary(_) => panic!("unexpected binary frame"),
                _ => {}
            }
        }
    }

    async fn next_message(&mut self) -> Message {
        match tokio::time::timeout(WAIT, self.stream.next()).await {
            Err(_) => panic!("no frame within {WAIT:?}"),
            Ok(None) => panic!("socket ended without a close frame"),
            Ok(Some(Err(e))) => panic!("socket error: {e}"),
            Ok(Some(Ok(m))) => m,
        }
    }

    /// Reads frames until one of type `ty`, which it returns; panics on anything else.
    pub async fn expect(&mut self, ty: &str) -> Value {
        let v = self.next_json().await;
        assert_eq!(v["type"], ty, "expected a {ty} frame, got {v}");
        v
    }

    /// Reads until the close frame and returns its code and the text frames before it.
    pub async fn expect_close(&mut self) -> (u16, Vec<Value>) {
        let mut before = Vec::new();
        loop {
            match self.next_message().await {
                Message::Text(t) => before.push(serde_json::from_str(&t).unwrap()),
                Message::Close(Some(CloseFrame { code, .. })) => return (code.into(), before),
                Message::Close(None) => return (1005, before),
                _ => {}
            }
        }
    }

    /// Reads until the close frame, then until the server has closed the TCP
    /// connection: what a standard client reports as its close event.
    pub async fn expect_close_event(&mut self) -> CloseEvent {
        let mut frames = Vec::new();
        let mut last_text = Instant::now();
        let code = loop {
            match self.next_message().await {
                Message::Text(t) => {
                    last_text = Instant::now();
                    frames.push(serde_json::from_str(&t).unwrap());
                }
                Message::Close(Some(CloseFrame { code, .. })) => break code.into(),
                Message::Close(None) => break 1005,
                _ => {}
            }
        };
        let close_frame = Instant::now();
        self.wait_tcp_closed(close_frame).await;
        CloseEvent {
            code,
            frames,
            after_last_frame: last_text.elapsed(),
            after_close_frame: close_frame.elapsed(),
        }
    }

    /// Closes the socket (code 1000) the way a client does and returns the time
    /// until the server has answered and closed the TCP connection.
    pub async fn close_and_wait(&mut self) -> Duration {
        let since = Instant::now();
        self.stream.close(None).await.unwrap();
        self.wait_tcp_closed(since).await
    }

    /// Waits for the end of the stream (the server closed TCP); the elapsed time
    /// since `since`.
    async fn wait_tcp_closed(&mut self, since: Instant) -> Duration {
        loop {
            match tokio::time::timeout(WAIT, self.stream.next()).await {
                Err(_) => panic!("the server did not close the TCP connection within {WAIT:?}"),
                Ok(None | Some(Err(_))) => return since.elapsed(),
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// The next frame within the deadline; `None` on the end of the stream, an
    /// error or the deadline.
    pub async fn try_next(&mut self) -> Option<Message> {
        match tokio::time::timeout(WAIT, self.stream.next()).await {
            Ok(Some(Ok(m))) => Some(m),
            _ => None,
        }
    }

    /// A frame that has already arrived, if any, without waiting.
    pub fn try_next_now(&mut self) -> Option<Message> {
        use futures_util::FutureExt;
        match self.stream.next().now_or_never() {
            Some(Some(Ok(m))) => Some(m),
            _ => None,
        }
    }

    /// Sends any frame; an error once the connection is gone.
    pub async fn try_send_raw(&mut self, m: Message) -> Result<(), tungstenite::Error> {
        self.stream.send(m).await
    }

    /// Sends a JSON frame.
    pub async fn send(&mut self, v: Value) {
        self.send_raw(Message::text(v.to_string())).await;
    }

    /// Sends any frame.
    pub async fn send_raw(&mut self, m: Message) {
        self.stream.send(m).await.unwrap();
    }

    /// Proves the socket is open and served: `ping` must be answered by `pong`
    /// (and nothing else may be pending).
    pub async fn assert_alive(&mut self) {
        self.send(json!({ "type": "ping" })).await;
        self.expect("pong").await;
    }
}

/// Opens `/ws` by hand on a raw TCP connection (with this receive buffer, if given,
/// set before connecting) and reads the `101` head: for tests that write bytes no
/// WebSocket library would, or that must not read.
pub async fn raw_upgrade(node: &Node, token: &str, recv_buffer: Option<u32>) -> TcpStream {
    let addr = node.base.trim_start_matches("http://").to_owned();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).unwrap();
    }
    let mut tcp = socket.connect(addr.parse().unwrap()).await.unwrap();
    tcp.write_all(upgrade_head(&addr, token).as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        assert_eq!(
            tcp.read(&mut byte).await.unwrap(),
            1,
            "the upgrade's answer ended"
        );
        got.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&got);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    tcp
}

/// The request head of a `/ws` upgrade to `addr` (host:port) with a session cookie.
pub fn upgrade_head(addr: &str, token: &str) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Cookie: sh_session={token}\r\n\r\n"
    )
}
