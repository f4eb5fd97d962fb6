//! Every session token a test is handed is remembered here, and every node log and
//! every Redis the harness started is scanned for them when it is dropped: the raw
//! token must never reach Redis, logs, pub/sub or error messages. Together this
//! makes the whole test suite a token-leak scan. The webhook secret the test nodes
//! sign with is scanned for too.

use std::sync::Mutex;

static SECRETS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Remembers the secret part of a token.
pub fn remember(token: &str) {
    if let Some((_, secret)) = token.split_once('.') {
        SECRETS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(secret.to_owned());
    }
}

/// Remembers a secret of another kind (the webhook secret), to be scanned for the
/// same way.
pub fn remember_secret(secret: &str) {
    SECRETS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(secret.to_owned());
}

/// The first remembered secret that `text` contains, if any.
pub fn leaked_in(text: &str) -> Option<String> {
    SECRETS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .find(|s| text.contains(s.as_str()))
        .cloned()
}

/// Every key and value of the Redis at `url`, as text. Retried a few times: this
/// runs in `Drop` on a thread where a child's exit can interrupt a blocking call
/// (EINTR).
pub fn dump_redis(url: &str) -> redis::RedisResult<String> {
    let mut last = None;
    for _ in 0..5 {
        match dump_once(url) {
            Ok(dump) => return Ok(dump),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| redis::RedisError::from((redis::ErrorKind::Io, "no attempt"))))
}

fn dump_once(url: &str) -> redis::RedisResult<String> {
    let client = redis::Client::open(url)?;
    let mut c = client.get_connection_with_timeout(std::time::Duration::from_secs(2))?;
    let mut out = String::new();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut c)?;
    for key in keys {
        let kind: String = redis::cmd("TYPE").arg(&key).query(&mut c)?;
        let values: Vec<String> = match kind.as_str() {
            "string" => vec![redis::cmd("GET").arg(&key).query(&mut c)?],
            "hash" => redis::cmd("HGETALL").arg(&key).query(&mut c)?,
            "set" => redis::cmd("SMEMBERS").arg(&key).query(&mut c)?,
            "zset" => redis::cmd("ZRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .query(&mut c)?,
            "list" => redis::cmd("LRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .query(&mut c)?,
            "stream" => {
                let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
                    .arg(&key)
                    .arg("-")
                    .arg("+")
                    .query(&mut c)?;
                entries
                    .into_iter()
                    .flat_map(|(id, fields)| std::iter::once(id).chain(fields))
                    .collect()
            }
            _ => Vec::new(),
        };
        out.push_str(&key);
        out.push('\n');
        for v in values {
            out.push_str(&v);
            out.push('\n');
        }
    }
    Ok(out)
}
