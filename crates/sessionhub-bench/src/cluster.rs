//! The cluster under test: its nodes (loopback only), the service API, and opening
//! `/ws` from many 127.x.y.z source addresses.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::http::header::COOKIE;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

/// A client WebSocket over a plain TCP stream.
pub type Ws = WebSocketStream<TcpStream>;

/// How long one socket may take from TCP connect to its `hello` frame.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long one HTTP request may take.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(15);

/// Parses `scheme://a.b.c.d:port[/]` and refuses anything but a 127.0.0.0/8 address.
pub fn loopback_addr(url: &str, scheme: &str) -> Result<SocketAddr> {
    let rest = url
        .strip_prefix(scheme)
        .and_then(|r| r.strip_prefix("://"))
        .with_context(|| format!("{url:?} does not start with {scheme}://"))?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let addr: SocketAddr = hostport.parse().with_context(|| {
        format!("{url:?}: expected {scheme}://127.x.y.z:port (an IPv4 loopback address and a port)")
    })?;
    if !is_loopback_v4(addr.ip()) {
        bail!("{url:?} is not a 127.0.0.0/8 address: this tool only drives loopback clusters");
    }
    Ok(addr)
}

fn is_loopback_v4(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v4) if v4.octets()[0] == 127)
}

/// One node of the cluster.
#[derive(Debug, Clone)]
pub struct Node {
    /// `http://127.0.0.1:port`.
    pub base: String,
    /// Its socket address.
    pub addr: SocketAddr,
}

/// The answer to `POST /api/v1/sessions` (the parts the tool uses).
#[derive(Debug, Clone, Deserialize)]
pub struct Created {
    /// The session id.
    pub session_id: String,
    /// The cookie value.
    pub token: String,
}

/// The `hello` frame (the parts the tool uses).
#[derive(Debug, Clone, Deserialize)]
pub struct Hello {
    /// The frame type; must be `hello`.
    #[serde(rename = "type")]
    pub ty: String,
    /// The node that holds the socket.
    #[serde(default)]
    pub node_id: String,
    /// The socket's connection id (its first two characters are its bucket).
    #[serde(default)]
    pub connection_id: String,
}

/// Client source addresses `127.<octet>.<x>.<y>`, handed out round robin, so that
/// ephemeral ports never run out (each source address has its own port range).
#[derive(Debug)]
pub struct Sources {
    octet: u8,
    count: usize,
    next: AtomicUsize,
}

impl Sources {
    /// `count` addresses under `127.<octet>.0.0/16`.
    pub fn new(octet: u8, count: usize) -> Result<Self> {
        if count == 0 || count > 250 * 250 {
            bail!("--source-addrs must be between 1 and 62500");
        }
        Ok(Self {
            octet,
            count,
            next: AtomicUsize::new(0),
        })
    }

    /// The next source address.
    pub fn next(&self) -> Ipv4Addr {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.count;
        Ipv4Addr::new(127, self.octet, (1 + i / 250) as u8, (1 + i % 250) as u8)
    }
}

/// The nodes, the service API key, and an HTTP client.
#[derive(Clone)]
pub struct Cluster {
    /// The nodes, in the order given.
    pub nodes: Vec<Node>,
    api_key: String,
    http: reqwest::Client,
}

impl Cluster {
    /// Checks every URL (loopback only) and builds the HTTP client.
    pub fn new(urls: &[String], api_key: String) -> Result<Self> {
        if urls.is_empty() {
            bail!("give at least one --node http://127.0.0.1:PORT");
        }
        let nodes = urls
            .iter()
            .map(|u| {
                let addr = loopback_addr(u, "http")?;
                Ok(Node {
                    base: format!("http://{addr}"),
                    addr,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(512)
            .tcp_nodelay(true)
            .timeout(HTTP_TIMEOUT)
            .no_proxy()
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Self {
            nodes,
            api_key,
            http,
        })
    }

    /// Creates a session for `user` through node `node`.
    pub async fn create_session(&self, node: usize, user: &str) -> Result<Created> {
        let url = format!("{}/api/v1/sessions", self.nodes[node].base);
        let res = self
            .http
            .post(&url)
            .bearer_auth(&self.api_key)
            .json(&serde_json::json!({ "user_id": user, "user_agent": "sessionhub-bench" }))
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = res.status();
        if status != reqwest::StatusCode::CREATED {
            let body = res.text().await.unwrap_or_default();
            bail!("POST {url} for {user:?} answered {status}: {body}");
        }
        res.json()
            .await
            .with_context(|| format!("POST {url}: bad body"))
    }

    /// `DELETE /api/v1/sessions/{id}` through node `node`; returns the status.
    pub async fn kill_session(&self, node: usize, session_id: &str) -> Result<u16> {
        let url = format!("{}/api/v1/sessions/{session_id}", self.nodes[node].base);
        let res = self
            .http
            .delete(&url)
            .bearer_auth(&self.api_key)
            .send()
            .await
            .with_context(|| format!("DELETE {url}"))?;
        Ok(res.status().as_u16())
    }

    /// `POST /api/v1/publish` with a ready JSON body through node `node`; returns the
    /// status.
    pub async fn publish(&self, node: usize, body: String) -> Result<u16> {
        let url = format!("{}/api/v1/publish", self.nodes[node].base);
        let res = self
            .http
            .post(&url)
            .bearer_auth(&self.api_key)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = res.status().as_u16();
        // Read the (small) body so the connection goes back to the pool.
        let _ = res.bytes().await;
        Ok(status)
    }

    /// Opens `/ws` on node `node` from `source` with the session cookie, and reads
    /// the `hello` frame. The socket is bound to `source` before it connects.
    pub async fn open_ws(&self, node: usize, source: Ipv4Addr, token: &str) -> Result<(Ws, Hello)> {
        let addr = self.nodes[node].addr;
        let fut =
            async {
                let socket = TcpSocket::new_v4().context("socket()")?;
                socket
                    .bind(SocketAddr::new(IpAddr::V4(source), 0))
                    .with_context(|| format!("bind {source}:0"))?;
                let stream = socket
                    .connect(addr)
                    .await
                    .with_context(|| format!("connect {source} -> {addr}"))?;
                stream.set_nodelay(true).context("TCP_NODELAY")?;
                let mut req = format!("ws://{addr}/ws")
                    .into_client_request()
                    .context("ws request")?;
                req.headers_mut().insert(
                    COOKIE,
                    HeaderValue::from_str(&format!("sh_session={token}"))
                        .context("cookie header")?,
                );
                // Small buffers: thousands of idle client sockets must stay cheap.
                let config = WebSocketConfig::default()
                    .read_buffer_size(4096)
                    .write_buffer_size(0);
                let (mut ws, _) =
                    match tokio_tungstenite::client_async_with_config(req, stream, Some(config))
                        .await
                    {
                        Ok(ok) => ok,
                        Err(tungstenite::Error::Http(res)) => {
                            let hint = if res.status().as_u16() == 429 {
                                " (nodes cap sockets per session and per user: \
                             SESSIONHUB_MAX_SOCKETS_PER_SESSION / _PER_USER)"
                            } else {
                                ""
                            };
                            bail!("/ws upgrade on {addr} answered HTTP {}{hint}", res.status())
                        }
                        Err(e) => return Err(e).with_context(|| format!("/ws upgrade on {addr}")),
                    };
                let hello = loop {
                    match ws.next().await {
                        Some(Ok(Message::Text(t))) => {
                            let hello: Hello = serde_json::from_str(&t)
                                .with_context(|| format!("bad first frame {t}"))?;
                            if hello.ty != "hello" {
                                bail!("first frame is not hello: {t}");
                            }
                            break hello;
                        }
                        Some(Ok(Message::Close(f))) => bail!("closed before hello: {f:?}"),
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Err(e).context("reading hello"),
                        None => bail!("socket ended before hello"),
                    }
                };
                Ok((ws, hello))
            };
        tokio::time::timeout(CONNECT_TIMEOUT, fut)
            .await
            .with_context(|| format!("no hello from {addr} within {CONNECT_TIMEOUT:?}"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_urls_are_accepted() {
        assert!(loopback_addr("http://127.0.0.1:8080", "http").is_ok());
        assert!(loopback_addr("http://127.3.2.1:8080/", "http").is_ok());
        assert!(loopback_addr("redis://127.0.0.1:6379/0", "redis").is_ok());
        assert!(loopback_addr("http://10.0.0.1:8080", "http").is_err());
        assert!(loopback_addr("http://localhost:8080", "http").is_err());
        assert!(loopback_addr("http://[::1]:8080", "http").is_err());
        assert!(loopback_addr("https://127.0.0.1:8080", "http").is_err());
    }

    #[test]
    fn sources_stay_in_their_range() {
        let s = Sources::new(9, 300).unwrap();
        let all: Vec<Ipv4Addr> = (0..600).map(|_| s.next()).collect();
        assert_eq!(all[0], Ipv4Addr::new(127, 9, 1, 1));
        assert_eq!(all[250], Ipv4Addr::new(127, 9, 2, 1));
        assert_eq!(all[300], all[0]);
        assert!(
            all.iter()
                .all(|a| a.octets()[0] == 127 && a.octets()[1] == 9)
        );
    }
}
