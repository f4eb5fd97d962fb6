//! The function library as a node loads it: twice (see the header of
//! `lua/sessionhub.lua`). As `sessionhub`, the function names operators call with
//! redis-cli; and as `sessionhub_<V>`, the node's own copy, with `_<V>` after every
//! function name, which is what the node calls. V is the start of the SHA-256 of the
//! library's text as loaded (this release's code and this node's settings), so in a
//! rolling upgrade the nodes of each release call their own functions whichever node
//! loaded last, and two nodes with different settings (the event stream cap) no
//! longer overwrite each other's.

use sha2::{Digest, Sha256};

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
        format!("{name}{}", self.suffix)
    }
}

/// A function's name without a node's version suffix: `sh_publish_0123456789abcdef`
/// → `sh_publish`; other names as they are. For tools that read `MONITOR`.
pub fn unversioned(name: &str) -> &str {
    match name.rsplit_once('_') {
        Some((base, v))
            if v.len() == VERSION_DIGITS
                && v.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
        {
            base
        }
        _ => name,
    }
}

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
