//! `redis-cli monitor` on a test Redis: the commands it ran, for tests that count or
//! scan them (a raw token must never be there; a batch takes so many calls).

use tokio::io::AsyncReadExt;
use tokio::process::{Child, ChildStdout};

use crate::WAIT;
use crate::process::RedisServer;

/// A monitor attached to one Redis.
pub struct Monitor {
    /// Killed when the monitor is dropped.
    _child: Child,
    out: ChildStdout,
    captured: Vec<u8>,
}

impl Monitor {
    /// Attaches to `redis`; returns once Redis has confirmed (every command from
    /// then on is seen).
    pub async fn attach(redis: &RedisServer) -> Self {
        let mut child = tokio::process::Command::new("redis-cli")
            .args(["-p", &redis.port().to_string(), "monitor"])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-cli monitor (apt-get install -y redis-tools)");
        let mut out = child.stdout.take().expect("monitor output");
        let mut ok = [0u8; 2];
        out.read_exact(&mut ok).await.expect("monitor attached"); // "OK"
        Self {
            _child: child,
            out,
            captured: Vec::new(),
        }
    }

    /// Everything Redis ran since the monitor attached, up to now: sends a marker
    /// through `redis` and reads until the marker shows. Functions show by their
    /// names (`"sh_publish"`), without the version a node calls them under (see
    /// [`unversioned_calls`]; [`Monitor::seen_raw`] keeps it).
    pub async fn seen(&mut self, redis: &RedisServer, marker: &str) -> String {
        unversioned_calls(&self.seen_raw(redis, marker).await)
    }

    /// As [`Monitor::seen`], the text as Redis printed it.
    pub async fn seen_raw(&mut self, redis: &RedisServer, marker: &str) -> String {
        let mut c = redis.conn().await;
        redis::cmd("ECHO")
            .arg(marker)
            .query_async::<String>(&mut c)
            .await
            .expect("marker");
        let mut buf = [0u8; 8192];
        tokio::time::timeout(WAIT, async {
            while !String::from_utf8_lossy(&self.captured).contains(marker) {
                let n = self.out.read(&mut buf).await.expect("monitor output");
                assert!(n > 0, "the monitor stopped");
                self.captured.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .expect("the marker reached the monitor in time");
        String::from_utf8_lossy(&self.captured).into_owned()
    }
}

/// `text` with every quoted function name a node called (`"sh_<name>_<version>"`)
/// as the name alone (`"sh_<name>"`), the name operators call.
pub fn unversioned_calls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("\"sh_") {
        out.push_str(&rest[..=i]);
        rest = &rest[i + 1..];
        let end = rest.find('"').unwrap_or(rest.len());
        out.push_str(sessionhub_redis::unversioned(&rest[..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_names_lose_their_version_only() {
        let text = r#"1.0 [0 127.0.0.1:1] "FCALL" "sh_publish_0123456789abcdef" "1" "sh:{ab}:x"
1.1 [0 lua] "PUBLISH" "sh_x" "{\"a\":1}""#;
        let want = r#"1.0 [0 127.0.0.1:1] "FCALL" "sh_publish" "1" "sh:{ab}:x"
1.1 [0 lua] "PUBLISH" "sh_x" "{\"a\":1}""#;
        assert_eq!(unversioned_calls(text), want);
    }
}
