//! The sessionhub node: an actix-web server with the HTTP API and the WebSocket hub.
//!
//! - [`config`]: settings from flags and environment, validated at start-up.
//! - [`app`]: building and running a node ([`app::Application`]), shared by `main`.
//! - [`api`]: service and self-service HTTP calls.
//! - [`ws`]: the `/ws` upgrade and the per-socket task.
//! - [`hub`]: the sockets this node holds and the dispatch of engine events to them.
//! - [`webhook`]: delivery of the session lifecycle events to `SESSIONHUB_WEBHOOK_URL`.

pub mod api;
pub mod app;
pub mod auth;
pub mod config;
pub mod demo;
pub mod error;
pub mod hub;
pub mod lifecycle;
pub mod messaging;
pub mod metrics;
pub mod state;
pub mod sync;
pub mod web;
pub mod webhook;
pub mod ws;

pub use app::Application;
pub use config::{Cli, Config};
