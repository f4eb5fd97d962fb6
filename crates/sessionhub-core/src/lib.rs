//! Core of sessionhub: the types every other crate speaks.
//!
//! # Layout
//! - [`ids`]: newtypes for users, sessions, connections and nodes, with the
//!   validation rules that keep them safe inside Redis keys and channel names.
//! - [`token`]: session tokens (public session id + secret), their hashing and
//!   constant-time verification.
//! - [`model`]: sessions and connections as the engines store and return them.
//! - [`protocol`]: the JSON frames on `/ws`, and the close codes.
//! - [`engine`]: the [`Engine`] trait that both storage engines implement, and the
//!   [`NodeEvent`]s an engine delivers to the node that holds the affected sockets.
//! - [`memory`]: the embedded in-memory engine used when no Redis is configured.

pub mod engine;
pub mod history;
pub mod ids;
pub mod memory;
pub mod model;
pub mod protocol;
pub mod time;
pub mod token;

pub use engine::{Engine, EngineError, EngineStats, EventSender, HeldSockets, NodeEvent};
pub use history::{HistoryConfig, HistoryState, Recovered, Recovery, Registered};
pub use ids::{ConnectionId, GroupName, IdError, NodeId, SessionId, UserId};
pub use model::{
    ConnLimits, ConnectionInfo, CreatedSession, Delivery, EndReason, LocalRecord, Member,
    NewSession, NodeCounters, NodeStatus, NodeView, OnlineUser, PresenceCounts, Reasserted,
    Session, Target,
};
pub use token::{SecretHash, Token, TokenError};
