//! Building and running a node: the one code path that `main` and the tests' node
//! processes share.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use actix_web::dev::Service;
use actix_web::http::Method;
use actix_web::{App, HttpResponse, HttpServer, ResponseError, web};
use futures_util::FutureExt;
use sessionhub_core::Engine;
use sessionhub_core::engine::EVENT_QUEUE_CAPACITY;
use sessionhub_core::memory::{MemoryEngine, MemoryStore};
use sessionhub_redis::{RedisConfig, RedisEngine};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::error::ApiError;
use crate::hub::Hub;
use crate::state::AppState;

/// Largest request head (request line and headers, in bytes): a larger one is
/// answered 431 before any handler runs.
pub const MAX_REQUEST_HEAD_BYTES: usize = 16 * 1024;
/// Reconciliation of this node's records with its sockets runs once every this many
/// revalidation intervals (10 s by default).
pub const RECONCILE_EVERY_REVALIDATIONS: u32 = 2;
/// Largest JSON request body.
pub const MAX_JSON_BODY: usize = 64 * 1024;
/// How long shutdown waits for sockets to close before leaving anyway.
///
/// Shutdown's steps each have a bound, and together they stay under the 10 s the
/// README promises (and the 30 s of a Kubernetes pod's default grace period):
/// drain 5 s + leave 1.5 s + server stop 1 s + tasks 1 s = 8.5 s.
pub const SOCKET_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long leaving the cluster (dropping the node's records, lease and id claim
/// from Redis) may take: with Redis unreachable it fails, and the other nodes reap
/// the records once the lease runs out.
pub const LEAVE_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long the background loops get to return once the server has stopped.
pub const TASKS_STOP_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the HTTP server then gives in-flight requests (whole seconds: actix's
/// unit). Every socket has been closed (or given up on) by then.
pub const SERVER_STOP_TIMEOUT: Duration = Duration::from_secs(1);
/// Connections the kernel queues for the listener before the node accepts them
/// (actix-web's default, which `HttpServer::bind` used).
pub const LISTEN_BACKLOG: i32 = 1024;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Redis could not be reached or the URL is unusable.
    #[error(transparent)]
    Redis(#[from] sessionhub_redis::ConnectError),
    /// The webhook client could not be built.
    #[error(transparent)]
    Webhook(#[from] crate::webhook::StartError),
    /// The HTTP workers did not start.
    #[error("the HTTP workers did not start: {0}")]
    Workers(std::io::Error),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A node, bound and ready to run.
pub struct Application {
    /// Started (polled once); served by `run_until`.
    server: std::pin::Pin<Box<actix_web::dev::Server>>,
    handle: actix_web::dev::ServerHandle,
    addr: SocketAddr,
    state: AppState,
}

impl Application {
    /// Binds the listener, starts the HTTP worker(s), and on the first worker
    /// connects the engine and starts the event dispatcher and background loops.
    ///
    /// The node's Redis links (command connection, subscriber) and its dispatcher
    /// are built on an HTTP worker's thread rather than on the main thread, so that
    /// with one worker (the default on two cores) an event travels from Redis to a
    /// socket, and a request to Redis and back, without waking another thread:
    /// under load each hand-over between threads waits for a CPU. The workers serve
    /// only once it is done (a worker's start-up awaits its app data), so the node
    /// is subscribed before its first socket, as before.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let listen = config.listen;
        let request_timeout = config.request_timeout;
        let workers = config.workers;
        let demo = config.demo;
        let admin = config.admin;
        // Bound now (so the address is known, and a port another program listens on
        // is refused at once), but listening only once the node has reached its
        // store and built its state: until then a connection is refused, and a load
        // balancer tries another node at once instead of waiting on one that cannot
        // answer (up to the Redis connect timeout, and the wait for a crashed run's
        // node id claim to lapse). Two nodes starting on one port both bind (neither
        // listens yet); the second finds out at `listen` and leaves the cluster.
        let socket = bound_socket(listen).map_err(|source| StartError::Bind {
            addr: listen,
            source,
        })?;
        let addr = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .unwrap_or(listen);
        let to_listen = socket
            .try_clone()
            .map_err(|source| StartError::Bind { addr, source })?;
        let boot = Arc::new(Boot::new(config, to_listen, addr));
        let factory_boot = boot.clone();
        let server = HttpServer::new(move || {
            let boot = factory_boot.clone();
            App::new()
                .wrap_fn(|mut req, srv| {
                    if head_size(req.request().head()) > MAX_REQUEST_HEAD_BYTES {
                        let res =
                            ApiError::HeadersTooLarge(MAX_REQUEST_HEAD_BYTES).error_response();
                        return futures_util::future::Either::Left(std::future::ready(Ok(req
                            .into_response(res)
                            .map_into_right_body())));
                    }
                    // HEAD is GET without the body (actix-http leaves the body out
                    // of a HEAD request's response), so every GET route answers it.
                    if req.method() == Method::HEAD {
                        req.head_mut().method = Method::GET;
                    }
                    futures_util::future::Either::Right(
                        srv.call(req).map(|res| res.map(|r| r.map_into_left_body())),
                    )
                })
                // Runs on this worker's thread before it serves: the first worker
                // builds the node's state, the others wait for it.
                .data_factory(move || {
                    let boot = boot.clone();
                    async move { boot.state().await }
                })
                .app_data(
                    web::JsonConfig::default()
                        .limit(MAX_JSON_BODY)
                        .error_handler(|err, _| json_body_error(err).into()),
                )
                .app_data(web::QueryConfig::default().error_handler(|err, _| {
                    ApiError::BadRequest(format!("invalid query string: {err}")).into()
                }))
                .app_data(
                    web::PathConfig::default().error_handler(|_, _| ApiError::NotFound.into()),
                )
                .configure(crate::api::routes)
                .configure(crate::web::client_routes)
                .configure(|c| {
                    if demo {
                        crate::demo::routes(c);
                        crate::web::demo_routes(c);
                    }
                    if admin {
                        crate::web::admin_routes(c);
                    }
                })
                .route("/ws", web::get().to(crate::ws::upgrade))
                .route("/healthz", web::get().to(healthz))
                .route("/readyz", web::get().to(readyz))
                .route("/metrics", web::get().to(metrics))
                .default_service(web::to(|| async {
                    Err::<HttpResponse, _>(ApiError::NotFound)
                }))
        })
        .client_request_timeout(request_timeout)
        // No lingering after a response: a WebSocket's TCP connection must close as
        // soon as its closing handshake is done (the server closes first, RFC 6455
        // §7.1.1), not a second later. The socket task holds its response open until
        // the client's close frame is read (ws::HoldOpen), so nothing is left unread.
        .client_disconnect_timeout(Duration::ZERO)
        // Every frame and answer goes out as soon as it is written: with Nagle's
        // algorithm on (actix-web leaves it on), a frame written while the
        // client's ACK of the previous one is delayed (up to 40 ms on Linux)
        // waits for that ACK.
        .tcp_nodelay(true)
        .workers(workers)
        .disable_signals()
        .shutdown_timeout(SERVER_STOP_TIMEOUT.as_secs())
        .listen(std::net::TcpListener::from(socket))
        .map_err(|source| StartError::Bind { addr, source })?;
        let mut server = Box::pin(server.run());
        let handle = server.handle();
        // The first poll starts the workers and returns once each has started (or
        // one failed), which includes building the state.
        let started = futures_util::poll!(server.as_mut());
        let built = boot.built.borrow().clone();
        match (started, built) {
            (std::task::Poll::Pending, Built::Ready(state)) => Ok(Self {
                server,
                handle,
                addr,
                state,
            }),
            (started, _) => {
                let cause = match started {
                    std::task::Poll::Ready(Err(e)) => e,
                    _ => std::io::Error::other("the HTTP workers stopped at start-up"),
                };
                Err(boot.take_error().unwrap_or(StartError::Workers(cause)))
            }
        }
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The node's shared state.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `stop` resolves, then shuts down in order: every socket closes
    /// with 1001 and removes its record, then the HTTP server stops.
    pub async fn run_until(self, stop: impl Future<Output = ()>) -> std::io::Result<()> {
        let Self {
            mut server,
            handle,
            state,
            ..
        } = self;
        let halted = tokio::select! {
            res = &mut server => return res,
            () = stop => false,
            () = state.halt.cancelled() => true,
        };
        tracing::info!(sockets = state.hub.len(), "shutting down");
        // In order: the sockets close (1001) and end their tasks; then the node's
        // records and lease go in one step; then the HTTP server stops; then the
        // background loops, which returned when shutdown was cancelled, are joined.
        state.shutdown.cancel();
        state.sockets.close();
        if tokio::time::timeout(SOCKET_DRAIN_TIMEOUT, state.sockets.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = state.hub.len(),
                "sockets still closing; leaving anyway"
            );
        }
        match tokio::time::timeout(LEAVE_TIMEOUT, state.engine.leave()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not remove this node's records"),
            Err(_) => tracing::warn!(
                "could not remove this node's records in time; the other nodes reap them \
                 once its lease runs out"
            ),
        }
        let stopping = handle.stop(true);
        let (res, ()) = tokio::join!(server, stopping);
        state.tasks.close();
        if tokio::time::timeout(TASKS_STOP_TIMEOUT, state.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("background tasks did not stop in time");
        }
        tracing::info!("stopped");
        if halted {
            return Err(std::io::Error::other(
                "another process took this node's id while it was paused",
            ));
        }
        res
    }
}

/// What the first HTTP worker built at start-up, for the others and for `build`.
#[derive(Clone)]
enum Built {
    /// Not yet.
    Pending,
    /// The node's state.
    Ready(AppState),
    /// Building failed; the error waits in [`Boot::error`].
    Failed,
}

/// Hands the configuration to the first worker and its result to everyone else.
struct Boot {
    /// Taken by the worker that builds the state.
    config: std::sync::Mutex<Option<Config>>,
    /// The bound address.
    addr: SocketAddr,
    built: tokio::sync::watch::Sender<Built>,
    error: std::sync::Mutex<Option<StartError>>,
    /// The server's socket, bound but not listening: made to listen once the state
    /// is built, before any worker reports it has started (the acceptor registers
    /// the socket only then).
    listener: std::sync::Mutex<Option<socket2::Socket>>,
}

impl Boot {
    fn new(config: Config, listener: socket2::Socket, addr: SocketAddr) -> Self {
        Self {
            config: std::sync::Mutex::new(Some(config)),
            addr,
            built: tokio::sync::watch::Sender::new(Built::Pending),
            error: std::sync::Mutex::new(None),
            listener: std::sync::Mutex::new(Some(listener)),
        }
    }

    /// Makes the server's socket listen: the node takes connections from now on.
    fn start_listening(&self) -> Result<(), StartError> {
        let socket = self.listener.lock().ok().and_then(|mut l| l.take());
        match socket {
            Some(socket) => socket
                .listen(LISTEN_BACKLOG)
                .map_err(|source| StartError::Bind {
                    addr: self.addr,
                    source,
                }),
            None => Ok(()),
        }
    }

    /// The node's state: built by the first caller (on its thread), awaited by the
    /// others. `Err(())` when building failed (the error is kept for `build`).
    async fn state(&self) -> Result<AppState, ()> {
        let config = self.config.lock().ok().and_then(|mut c| c.take());
        if let Some(config) = config {
            let addr = self.addr;
            let built = match build_state(config, addr).await {
                Ok(state) => match self.start_listening() {
                    Ok(()) => Ok(state),
                    Err(e) => {
                        // It joined the cluster: leave it (records, lease, id claim).
                        state.shutdown.cancel();
                        if let Err(e) = state.engine.leave().await {
                            tracing::warn!(error = %e, "could not leave the cluster");
                        }
                        Err(e)
                    }
                },
                Err(e) => Err(e),
            };
            return match built {
                Ok(state) => {
                    self.built.send_replace(Built::Ready(state.clone()));
                    Ok(state)
                }
                Err(e) => {
                    if let Ok(mut slot) = self.error.lock() {
                        *slot = Some(e);
                    }
                    self.built.send_replace(Built::Failed);
                    Err(())
                }
            };
        }
        let mut rx = self.built.subscribe();
        let built = rx
            .wait_for(|b| !matches!(b, Built::Pending))
            .await
            .map_err(drop)?
            .clone();
        match built {
            Built::Ready(state) => Ok(state),
            Built::Pending | Built::Failed => Err(()),
        }
    }

    fn take_error(&self) -> Option<StartError> {
        self.error.lock().ok().and_then(|mut e| e.take())
    }
}

/// Connects the engine and starts what runs beside the sockets: the event
/// dispatcher, the webhook deliverer and the periodic loops. Called on the thread of
/// the first HTTP worker, so their tasks (and the Redis links' own) run there.
async fn build_state(config: Config, addr: SocketAddr) -> Result<AppState, StartError> {
    let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE_CAPACITY);
    let node_id = config.node_id.clone();
    let mut streams = None;
    let engine: Arc<dyn Engine> = match &config.redis {
        Some(topology) => {
            let rc = RedisConfig {
                key_prefix: config.key_prefix.clone(),
                tls: config.redis_tls.clone(),
                connect_timeout: config.redis_connect_timeout,
                lease: config.lease,
                limits: config.conn_limits,
                history: config.history,
                events_maxlen: config.events_maxlen,
                deliver_events: config.webhook.is_some(),
                ..RedisConfig::with_topology(topology.clone())
            };
            let redis = RedisEngine::connect(rc, node_id, events_tx).await?;
            streams = redis.event_streams();
            Arc::new(redis)
        }
        None => Arc::new(
            MemoryEngine::with_limits(MemoryStore::new(), node_id, events_tx, config.conn_limits)
                .with_history(config.history),
        ),
    };
    let state = AppState {
        engine,
        hub: Arc::new(Hub::default()),
        config: Arc::new(config),
        shutdown: CancellationToken::new(),
        sockets: TaskTracker::new(),
        tasks: TaskTracker::new(),
        metrics: Arc::default(),
        synced: Arc::new(AtomicU64::new(0)),
        halt: CancellationToken::new(),
    };
    let tasks = &state.tasks;
    if let (Some(streams), Some(webhook)) = (streams, state.config.webhook.clone()) {
        crate::webhook::start(
            streams,
            webhook,
            state.metrics.webhook.clone(),
            state.shutdown.clone(),
            tasks,
        )
        .await?;
    }
    actix_web::rt::spawn(tasks.track_future(crate::sync::dispatch(events_rx, state.clone())));
    actix_web::rt::spawn(tasks.track_future(crate::sync::revalidate_forever(
        state.clone(),
        state.config.revalidate_interval,
    )));
    actix_web::rt::spawn(tasks.track_future(crate::sync::expire_forever(state.clone())));
    actix_web::rt::spawn(tasks.track_future(crate::sync::reconcile_forever(
        state.clone(),
        state.config.revalidate_interval * RECONCILE_EVERY_REVALIDATIONS,
    )));
    actix_web::rt::spawn(tasks.track_future(crate::sync::announce_forever(
        state.clone(),
        addr.to_string(),
    )));
    Ok(state)
}

/// The size of a request's target and headers as sent (`name: value\r\n` each).
fn head_size(head: &actix_web::dev::RequestHead) -> usize {
    head.uri.path_and_query().map_or(0, |p| p.as_str().len())
        + head
            .headers()
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>()
}

async fn healthz(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({
        "status": "ok",
        "node_id": state.engine.node_id(),
        "engine": state.engine.name(),
        "hub": state.hub.stats(),
    }))
}

/// The node's metrics, Prometheus text.
pub(crate) async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render(
            &state.config.node_id,
            state.hub.stats(),
            state.engine.stats(),
        ))
}

async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    state.check_ready().await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "status": "ready" })))
}

/// The API's answer to a JSON body actix could not take: too large is 413, like
/// every other size limit; a body not declared as JSON says which header to set.
fn json_body_error(err: actix_web::error::JsonPayloadError) -> ApiError {
    use actix_web::error::JsonPayloadError;
    match err {
        JsonPayloadError::OverflowKnownLength { length, limit } => ApiError::TooLarge(format!(
            "the JSON body is {length} bytes; the limit is {limit}"
        )),
        JsonPayloadError::Overflow { limit } => {
            ApiError::TooLarge(format!("the JSON body is over the limit of {limit} bytes"))
        }
        JsonPayloadError::ContentType => ApiError::BadRequest(
            "the body must be JSON, sent with Content-Type: application/json".to_owned(),
        ),
        other => ApiError::BadRequest(format!("invalid JSON body: {other}")),
    }
}

/// A TCP socket bound to `addr` (with `SO_REUSEADDR`, as actix-web binds), not yet
/// listening.
fn bound_socket(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}
