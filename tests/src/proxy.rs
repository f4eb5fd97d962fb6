//! A tiny TCP forwarding proxy, the tests' own load balancer: it listens on a free
//! `127.0.0.1` port and forwards each new connection to the first backend, in order,
//! that accepts a TCP connection. A backend that dies drops its forwarded
//! connections (the client sees them close) and new connections go to the next one.
//!
//! It works below HTTP, so a browser sees one origin (the proxy's) for the pages,
//! the API and `/ws`, whichever node answers.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// How long one backend may take to accept before the next one is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A running proxy; stops (and drops every forwarded connection) on drop.
pub struct Proxy {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy in front of `backends` (tried in this order).
    pub async fn start(backends: Vec<SocketAddr>) -> Self {
        assert!(!backends.is_empty(), "a proxy needs a backend");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            // Owned here: aborting the accept loop drops every connection task too.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((client, _)) = accepted else { continue };
                        conns.spawn(forward(client, backends.clone()));
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Self { addr, task }
    }

    /// Starts a proxy in front of nodes given by their base URLs
    /// (`http://127.0.0.1:port`).
    pub async fn for_bases<'a>(bases: impl IntoIterator<Item = &'a str>) -> Self {
        let backends = bases
            .into_iter()
            .map(|b| {
                b.trim_start_matches("http://")
                    .trim_end_matches('/')
                    .parse()
                    .unwrap_or_else(|e| panic!("not an http://ip:port base: {b}: {e}"))
            })
            .collect();
        Self::start(backends).await
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connects `client` to the first backend that accepts, and copies both ways until
/// either side closes or fails. No backend: the client is closed.
async fn forward(mut client: TcpStream, backends: Vec<SocketAddr>) {
    for backend in backends {
        let Ok(Ok(mut upstream)) =
            tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(backend)).await
        else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        return;
    }
}
