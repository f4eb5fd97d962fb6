//! The function library as a node loads it: twice (see the header of
//! `lua/sessionhub.lua`). As `sessionhub`, the function names operators call with
//! redis-cli; and as `sessionhub_<V>`, the node's own copy, with `_<V>` after every
//! function name, which is what the node calls. V is the start of the SHA-256 of the
//! library's text as loaded (this release's code and this node's settings), so in a
//! rolling upgrade the nodes of each release call their own functions whichever node
//! loaded last, and two nodes with different settings (the event stream cap) no
//! longer overwrite each other's.

use std::collections::HashSet;

use sessionhub_core::EngineError;
use sessionhub_core::time::now_ms;
use sha2::{Digest, Sha256};

use crate::client::Inner;

/// The library's first line, naming it.
const NAME_LINE: &str = "#!lua name=sessionhub\n";

/// The line of the library that sets the function names' suffix.
const SUFFIX_LINE: &str = "local FUNCTION_SUFFIX = ''\n";

/// Hex digits of the SHA-256 in a version.
const VERSION_DIGITS: usize = 16;

/// Both texts of the library a node loads, and the names it calls.
#[derive(Debug, Clone)]
pub(crate) struct Library {
    /// `sessionhub`: the functions operators call.
    shared: String,
    /// `sessionhub_<V>`: the node's own copy.
    own: String,
    /// `_<V>`, after every function name in the own copy.
    suffix: String,
}

impl Library {
    /// The library with `events_maxlen` as each event stream's cap.
    pub(crate) fn new(events_maxlen: u32) -> Self {
        let shared = crate::events::library(events_maxlen);
        let digest = Sha256::digest(shared.as_bytes());
        let version: String = digest
            .iter()
            .take(VERSION_DIGITS / 2)
            .map(|b| format!("{b:02x}"))
            .collect();
        let suffix = format!("_{version}");
        let own = shared
            .replacen(NAME_LINE, &format!("#!lua name=sessionhub{suffix}\n"), 1)
            .replacen(
                SUFFIX_LINE,
                &format!("local FUNCTION_SUFFIX = '{suffix}'\n"),
                1,
            );
        Self {
            shared,
            own,
            suffix,
        }
    }

    /// The node's own copy's library name, `sessionhub_<V>`.
    pub(crate) fn own_name(&self) -> String {
        format!("sessionhub{}", self.suffix)
    }

    /// The texts to load, the node's own copy first (what its calls need).
    pub(crate) fn texts(&self) -> [&str; 2] {
        [&self.own, &self.shared]
    }

    /// The name under which the node calls function `name` (`sh_publish`, ...).
    pub(crate) fn function(&self, name: &str) -> String {
        // Every Redis call makes one: two copies, not the formatting machinery.
        let mut full = String::with_capacity(name.len() + self.suffix.len());
        full.push_str(name);
        full.push_str(&self.suffix);
        full
    }
}

/// Whether `name` is a node's own copy of the library, `sessionhub_<V>`.
fn is_copy(name: &str) -> bool {
    name.strip_prefix("sessionhub_").is_some_and(is_version)
}

/// Whether `v` is a version: [`VERSION_DIGITS`] lowercase hex digits.
fn is_version(v: &str) -> bool {
    v.len() == VERSION_DIGITS && v.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The `library_name` of one library of a `FUNCTION LIST` answer (RESP2 pairs or a
/// RESP3 map).
fn name_in_list(lib: &redis::Value) -> Option<String> {
    let pairs: Vec<(&redis::Value, &redis::Value)> = match lib {
        redis::Value::Map(m) => m.iter().map(|(k, v)| (k, v)).collect(),
        redis::Value::Array(a) => a.chunks_exact(2).map(|p| (&p[0], &p[1])).collect(),
        _ => return None,
    };
    pairs.into_iter().find_map(|(k, v)| {
        let k: String = redis::from_redis_value_ref(k).ok()?;
        (k == "library_name").then(|| redis::from_redis_value_ref(v).ok())?
    })
}

impl Inner {
    /// Deletes the copies of the library that no live node calls, the leftovers of
    /// releases (or settings) no longer run. Each node names its copy in its status
    /// (`RedisEngine::announce`), which lives as long as its lease. A copy deleted
    /// under a node that had not announced yet is loaded again by that node's next
    /// call (`Inner::try_fcall`). Returns how many were deleted.
    pub(crate) async fn forget_unused_libraries(&self) -> Result<usize, EngineError> {
        let own = self.library.own_name();
        let listed: Vec<redis::Value> = self
            .run(|mut c| async move {
                redis::cmd("FUNCTION")
                    .arg("LIST")
                    .arg("LIBRARYNAME")
                    .arg("sessionhub_*")
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let copies: Vec<String> = listed
            .iter()
            .filter_map(name_in_list)
            .filter(|n| is_copy(n) && *n != own)
            .collect();
        if copies.is_empty() {
            return Ok(0);
        }
        let in_use = self.libraries_in_use().await?;
        let mut deleted = 0;
        for name in copies.iter().filter(|n| !in_use.contains(*n)) {
            let res = self
                .run(|mut c| async move {
                    redis::cmd("FUNCTION")
                        .arg("DELETE")
                        .arg(name)
                        .query_async::<()>(&mut c)
                        .await
                })
                .await;
            match res {
                Ok(()) => {
                    deleted += 1;
                    tracing::info!(library = %name, "deleted a function library no live node calls");
                }
                // Deleted meanwhile by another node, say.
                Err(e) => tracing::debug!(library = %name, error = %e, "library not deleted"),
            }
        }
        Ok(deleted)
    }

    /// The node's own copy's name, as it announces it.
    pub(crate) fn library_name(&self) -> String {
        self.library.own_name()
    }

    /// The library copies the nodes with a current lease say they call.
    async fn libraries_in_use(&self) -> Result<HashSet<String>, EngineError> {
        let key = self.keys.nodes();
        let now = now_ms();
        let live: Vec<String> = self
            .run(|mut c| async move {
                redis::cmd("ZRANGE")
                    .arg(key)
                    .arg(now)
                    .arg("+inf")
                    .arg("BYSCORE")
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let mut in_use = HashSet::new();
        for id in live {
            let Ok(node) = sessionhub_core::NodeId::parse(&id) else {
                continue;
            };
            let key = self.keys.node_status(&node);
            let status: Option<String> = self
                .run(|mut c| async move { redis::cmd("GET").arg(key).query_async(&mut c).await })
                .await?;
            let library = status
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                .and_then(|v| v.get("library")?.as_str().map(str::to_owned));
            if let Some(l) = library {
                in_use.insert(l);
            }
        }
        Ok(in_use)
    }
}

/// A function's name without a node's version suffix: `sh_publish_0123456789abcdef`
/// → `sh_publish`; other names as they are. For tools that read `MONITOR`.
pub fn unversioned(name: &str) -> &str {
    match name.rsplit_once('_') {
        Some((base, v)) if is_version(v) => base,
        _ => name,
    }
}

/// Some heartbeats after the node joined (so that nodes starting with it have
/// announced their copies), then every [`FORGET_INTERVAL`]: deletes the copies no
/// live node calls. The later rounds catch the copy of a node that died without
/// giving up its lease while the others started (its lease ran out after).
pub(crate) async fn forget_unused_later(inner: std::sync::Arc<Inner>) {
    let mut wait = inner.lease.heartbeat * FORGET_AFTER_HEARTBEATS;
    loop {
        tokio::select! {
            _ = inner.stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        if let Err(e) = inner.forget_unused_libraries().await {
            tracing::debug!(error = %e, "old function libraries not looked at");
        }
        wait = FORGET_INTERVAL;
    }
}

/// Heartbeats after joining before the node deletes unused library copies.
const FORGET_AFTER_HEARTBEATS: u32 = 3;

/// How often a node looks for unused library copies after its first look (a
/// `FUNCTION LIST`; a `ZRANGE` and a `GET` per live node only when there are copies
/// other than its own).
const FORGET_INTERVAL: std::time::Duration = std::time::Duration::from_secs(600);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_own_copy_suffixes_every_function_and_names_itself_by_its_text() {
        let lib = Library::new(1000);
        assert!(crate::LIBRARY.starts_with(NAME_LINE));
        assert!(crate::LIBRARY.contains(SUFFIX_LINE));
        let [own, shared] = lib.texts();
        assert_eq!(shared, crate::events::library(1000));
        assert!(own.starts_with(&format!("#!lua name={}\n", lib.own_name())));
        assert!(own.contains(&format!("local FUNCTION_SUFFIX = '{}'\n", lib.suffix)));
        assert!(!own.contains(SUFFIX_LINE));
        assert_eq!(lib.suffix.len(), 1 + VERSION_DIGITS);
        let f = lib.function("sh_publish");
        assert_eq!(unversioned(&f), "sh_publish");
        // Same text, same version; other settings, another.
        assert_eq!(Library::new(1000).own_name(), lib.own_name());
        assert_ne!(Library::new(0).own_name(), lib.own_name());
    }

    #[test]
    fn copies_are_told_by_name_in_either_protocol() {
        assert!(is_copy("sessionhub_0123456789abcdef"));
        assert!(!is_copy("sessionhub"));
        assert!(!is_copy("sessionhub_0123456789abcde"));
        assert!(!is_copy("other_0123456789abcdef"));
        let bulk = |s: &str| redis::Value::BulkString(s.as_bytes().to_vec());
        let resp2 = redis::Value::Array(vec![
            bulk("library_name"),
            bulk("sessionhub_0123456789abcdef"),
            bulk("engine"),
            bulk("LUA"),
        ]);
        let resp3 = redis::Value::Map(vec![(bulk("library_name"), bulk("sessionhub"))]);
        assert_eq!(
            name_in_list(&resp2).as_deref(),
            Some("sessionhub_0123456789abcdef")
        );
        assert_eq!(name_in_list(&resp3).as_deref(), Some("sessionhub"));
        assert_eq!(name_in_list(&redis::Value::Nil), None);
    }

    #[test]
    fn only_a_version_suffix_is_taken_off() {
        assert_eq!(unversioned("sh_publish"), "sh_publish");
        assert_eq!(unversioned("sh_publish_batch"), "sh_publish_batch");
        assert_eq!(
            unversioned("sh_kill_session_0123456789abcdef"),
            "sh_kill_session"
        );
        assert_eq!(
            unversioned("sh_kill_session_0123456789ABCDEF"),
            "sh_kill_session_0123456789ABCDEF"
        );
        assert_eq!(unversioned("sh_x_0123456789abcde"), "sh_x_0123456789abcde");
    }
}
