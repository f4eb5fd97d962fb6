//! The subscriber's own link to one Redis over plain TCP: `AUTH`, one `SUBSCRIBE`
//! of every channel, then pushes read straight from the socket and parsed in place
//! ([`crate::resp`]). redis-rs's `aio::PubSub` runs a task of its own that parses
//! each push into a `redis::Value` and hands it over an unbounded channel; here the
//! subscriber's task reads the socket itself, so a message costs one task and no
//! copy before the node decodes it, and a slow node slows its reads of Redis (whose
//! output buffer limit then drops the link: a lost subscription, resynced) instead
//! of queueing without bound. `rediss://` and Unix sockets keep redis-rs's link.

use std::io;
use std::ops::Range;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::resp::{self, Reply};

/// Bytes asked of the socket per read, at least.
const READ_CHUNK: usize = 16 * 1024;
/// A read buffer grown past this (one large message) is given back once it has
/// been read: an idle link keeps [`READ_CHUNK`].
const KEEP_BUFFER: usize = 256 * 1024;
/// `PING` as RESP2.
const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";

/// A push on the subscribed link.
pub(crate) enum Push {
    /// A message: ranges of [`Reader::bytes`] for its channel and payload.
    Message(Range<usize>, Range<usize>),
    /// The answer to our `PING`.
    Pong,
    /// Redis ended a subscription, or answered with an error.
    Lost(String),
    /// Anything else (ignored).
    Other,
}

/// The reading half: a buffer and the replies parsed from it.
pub(crate) struct Reader {
    read: OwnedReadHalf,
    buf: Vec<u8>,
    /// Where the next reply starts in `buf`.
    start: usize,
}

/// A subscribed link: read pushes with [`Reader::next`], ping with [`Link::ping`].
pub(crate) struct Link {
    pub(crate) reader: Reader,
    write: OwnedWriteHalf,
}

impl Link {
    /// Connects, authenticates (with `password`, and `username` if given) and
    /// subscribes to every channel, waiting for Redis to confirm each.
    pub(crate) async fn connect(
        host: &str,
        port: u16,
        username: Option<&str>,
        password: Option<&str>,
        channels: &[String],
    ) -> io::Result<Link> {
        let stream = TcpStream::connect((host, port)).await?;
        // As the command links (`tls::tcp_settings`): its pings go out at once.
        stream.set_nodelay(true)?;
        let (read, write) = stream.into_split();
        let mut link = Link {
            reader: Reader {
                read,
                buf: Vec::with_capacity(READ_CHUNK),
                start: 0,
            },
            write,
        };
        if let Some(password) = password {
            let mut auth: Vec<&[u8]> = vec![b"AUTH"];
            auth.extend(username.map(str::as_bytes));
            auth.push(password.as_bytes());
            link.write
                .write_all(&resp::command(auth.into_iter()))
                .await?;
            match link.reader.reply().await? {
                Reply::Simple(_) => {}
                Reply::Error(e) => return Err(refused("AUTH", link.reader.text(e))),
                _ => return Err(io::Error::other("unexpected answer to AUTH")),
            }
        }
        let subscribe = [&b"SUBSCRIBE"[..]]
            .into_iter()
            .chain(channels.iter().map(|c| c.as_bytes()));
        link.write
            .write_all(&resp::command(subscribe.collect::<Vec<_>>().into_iter()))
            .await?;
        for _ in channels {
            match link.reader.reply().await? {
                Reply::Array(Some(items)) if link.reader.is(&items, 0, b"subscribe") => {}
                Reply::Error(e) => return Err(refused("SUBSCRIBE", link.reader.text(e))),
                _ => return Err(io::Error::other("unexpected answer to SUBSCRIBE")),
            }
        }
        Ok(link)
    }

    /// Sends a `PING`; its answer comes as [`Push::Pong`].
    pub(crate) async fn ping(&mut self) -> io::Result<()> {
        self.write.write_all(PING).await
    }
}

fn refused(what: &str, why: String) -> io::Error {
    io::Error::other(format!("Redis refused {what}: {why}"))
}

impl Reader {
    /// The next push. Cancel-safe: dropped while waiting, it loses nothing (the
    /// only await is the socket read, and what it read is kept).
    pub(crate) async fn next(&mut self) -> io::Result<Push> {
        let reply = self.reply().await?;
        Ok(match reply {
            Reply::Array(Some(items)) => {
                if self.is(&items, 0, b"message") {
                    match (&items.get(1), &items.get(2)) {
                        (Some(Reply::Bulk(Some(ch))), Some(Reply::Bulk(Some(payload)))) => {
                            Push::Message(ch.clone(), payload.clone())
                        }
                        _ => Push::Other,
                    }
                } else if self.is(&items, 0, b"pong") {
                    Push::Pong
                } else if self.is(&items, 0, b"unsubscribe") {
                    Push::Lost("Redis ended a subscription".to_owned())
                } else {
                    Push::Other
                }
            }
            Reply::Error(e) => Push::Lost(format!("Redis answered {}", self.text(e))),
            _ => Push::Other,
        })
    }

    /// The bytes a [`Push`]'s ranges point into, until the next read.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Whether `items[i]` is the bulk string `word`.
    fn is(&self, items: &[Reply], i: usize, word: &[u8]) -> bool {
        matches!(items.get(i), Some(Reply::Bulk(Some(r))) if self.buf[r.clone()] == *word)
    }

    fn text(&self, r: Range<usize>) -> String {
        String::from_utf8_lossy(&self.buf[r]).into_owned()
    }

    /// The next reply, read from the socket as needed.
    async fn reply(&mut self) -> io::Result<Reply> {
        loop {
            if let Some((reply, end)) = resp::parse(&self.buf, self.start)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
            {
                self.start = end;
                return Ok(reply);
            }
            // Keep only the incomplete reply, at the front, then read more.
            self.buf.drain(..self.start);
            self.start = 0;
            if self.buf.is_empty() && self.buf.capacity() > KEEP_BUFFER {
                self.buf = Vec::with_capacity(READ_CHUNK);
            }
            self.buf.reserve(READ_CHUNK);
            if self.read.read_buf(&mut self.buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}
