//! The expiry sweep, driven by the sweep index `<prefix>sweep`, so that an idle
//! node costs Redis a command a second instead of a call per bucket.
//!
//! `<prefix>sweep` is a zset: bucket → the earliest time the bucket may need an
//! `sh_expire` call (a session may end; a lease field or an emptied group may be
//! ready to forget). It is a lower bound, kept so by whoever makes such work:
//!
//! - a login (after `sh_create_session`): the new session's deadline;
//! - dropping a node's records (joining, leaving, reaping): every bucket, when the
//!   fences it wrote can be forgotten, and at once the buckets where records went
//!   (a group may have emptied);
//! - this node's registrations (their lease fields), flushed every
//!   [`MARKS_EVERY`] in one command;
//! - groups this node added members to, checked every [`MARKS_EVERY`]: once a
//!   group's members in a bucket are gone, the bucket is due;
//! - and, as a backstop for whatever the above missed (a node that died between a
//!   login's two commands, a session made by an operator's `FCALL`, data written by
//!   an older version), every node marks every bucket due when it takes its lease
//!   and every [`FULL_SWEEP_EVERY`] after.
//!
//! Each sweep round ([`Inner::sweep`], every second) reads whether any bucket is due (one
//! `ZRANGE`), claims the due ones for [`CLAIM_FOR`] (`sh_sweep_claim`, so that one
//! node sweeps a bucket, not all), runs `sh_expire` in each, and writes the
//! bucket's next time back. Writing back is raise-then-re-read: the score is set to
//! what `sh_sweep_next` said, then `sh_sweep_next` is asked again and the lower
//! answer kept, so a login that lands in the bucket meanwhile (its `ZADD LT` comes
//! after its function call) is never lost: either the re-read sees its session, or
//! its `ZADD LT` comes after the raise. Two nodes may still visit one bucket at
//! once (a node's start marks every bucket due again while another has claimed
//! them): wasted work only, as `sh_expire` is idempotent and each visitor's own
//! re-read keeps the index a lower bound.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::try_join_all;
use sessionhub_core::time::now_ms;
use sessionhub_core::{EngineError, GroupName};

use crate::client::Inner;
use crate::keys::Bucket;
use crate::reply::expire_reply;

/// Sessions `sh_expire` ends per call, to keep each call short.
const EXPIRE_BATCH: usize = 500;
/// Lease fields of a bucket (`P{B}:leases`) are forgotten this many lease lifetimes
/// after the lease they name ran out.
const LEASE_FORGET_AFTER_TTLS: u32 = 10;
/// How long a claimed bucket is left to its sweeper before another node may take it
/// (the sweeper died, or is stuck).
pub const CLAIM_FOR: Duration = Duration::from_secs(5);
/// Most buckets one round claims.
pub const MOST_CLAIMED: usize = 256;
/// How often a node writes the marks it has collected (its registrations' lease
/// fields) to the index and checks the groups it added members to.
pub const MARKS_EVERY: Duration = Duration::from_secs(10);
/// How often each node marks every bucket due, as a backstop (also once at start).
pub const FULL_SWEEP_EVERY: Duration = Duration::from_secs(600);
/// Most (group, bucket) pairs a node watches for emptying; past it, new ones are
/// left to the full sweep.
pub const GROUP_WATCH_MAX: usize = 10_000;
/// Group checks (`EXISTS`) in flight at once.
const GROUP_CHECKS_IN_FLIGHT: usize = 256;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// What this node has done that the sweep index must learn of, and when its
/// periodic chores are due. Bounded: at most one entry per bucket, and
/// [`GROUP_WATCH_MAX`] group pairs.
pub(crate) struct Marks {
    /// Buckets where this node's registrations wrote a lease field, with the newest
    /// lease they carried: flushed to the index every [`MARKS_EVERY`].
    leases: Mutex<HashMap<Bucket, i64>>,
    /// Buckets where this node registered or re-asserted sockets, with the time of
    /// the last: reconciliation looks only at these (and those of its sockets).
    registered: Mutex<HashMap<Bucket, i64>>,
    /// (group, bucket) pairs this node added members to, until they are gone.
    groups: Mutex<HashSet<(GroupName, Bucket)>>,
    /// When the marks are next flushed (Unix ms; 0: at the first round).
    next_flush: AtomicI64,
    /// When this node next marks every bucket due (Unix ms); it also does when it
    /// takes a lease ([`Inner::note_all_due`]).
    next_full: AtomicI64,
}

impl Marks {
    /// No marks yet; the first full sweep is [`FULL_SWEEP_EVERY`] from now (the
    /// node marks every bucket due when it takes its lease).
    pub(crate) fn new() -> Self {
        Self {
            leases: Mutex::default(),
            registered: Mutex::default(),
            groups: Mutex::default(),
            next_flush: AtomicI64::new(0),
            next_full: AtomicI64::new(now_ms() + FULL_SWEEP_EVERY.as_millis() as i64),
        }
    }

    /// A registration (or re-assertion) in bucket `b` under `lease`.
    pub(crate) fn registered(&self, b: Bucket, lease: i64) {
        {
            let mut leases = lock(&self.leases);
            let e = leases.entry(b).or_insert(lease);
            *e = (*e).max(lease);
        }
        lock(&self.registered).insert(b, now_ms());
    }

    /// A member added to `group` in bucket `b`.
    pub(crate) fn group_added(&self, group: &GroupName, b: Bucket) {
        let mut groups = lock(&self.groups);
        if groups.len() < GROUP_WATCH_MAX {
            groups.insert((group.clone(), b));
        }
    }

    /// The buckets reconciliation must look at, with the time of this node's last
    /// registration in each.
    pub(crate) fn registered_buckets(&self) -> HashMap<Bucket, i64> {
        lock(&self.registered).clone()
    }

    /// Stops looking at bucket `b` in reconciliation, unless a registration came
    /// after `seen` (the time read with [`Marks::registered_buckets`]).
    pub(crate) fn forget_registered(&self, b: Bucket, seen: i64) {
        let mut r = lock(&self.registered);
        if r.get(&b).is_some_and(|&at| at <= seen) {
            r.remove(&b);
        }
    }

    /// Makes the next sweep round mark every bucket due.
    pub(crate) fn full_sweep_soon(&self) {
        self.next_full.store(0, Ordering::Relaxed);
    }

    /// Whether a periodic chore whose next time is in `next` is due at `now`; if
    /// so, its next time moves `every` later.
    fn due(next: &AtomicI64, now: i64, every: Duration) -> bool {
        let at = next.load(Ordering::Relaxed);
        at <= now
            && next
                .compare_exchange(
                    at,
                    now + every.as_millis() as i64,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
    }
}

impl Inner {
    /// How long after the lease it names a lease field is forgotten (ms).
    pub(crate) fn lease_forget_after(&self) -> i64 {
        self.lease.ttl_ms() as i64 * i64::from(LEASE_FORGET_AFTER_TTLS)
    }

    /// Lowers the sweep index's time of each bucket to the given one (`ZADD LT`, one
    /// command for all).
    pub(crate) async fn note_due(&self, points: &[(Bucket, i64)]) -> Result<(), EngineError> {
        if points.is_empty() {
            return Ok(());
        }
        let key = self.keys.sweep();
        let mut cmd = redis::cmd("ZADD");
        cmd.arg(key).arg("LT");
        for (b, at) in points {
            cmd.arg(*at).arg(b.hex());
        }
        self.run(|mut c| async move { cmd.query_async::<i64>(&mut c).await })
            .await
            .map(drop)
    }

    /// Marks every bucket due now: the backstop (at start and every
    /// [`FULL_SWEEP_EVERY`]).
    pub(crate) async fn note_all_due(&self) -> Result<(), EngineError> {
        let now = now_ms();
        let all: Vec<(Bucket, i64)> = Bucket::all().map(|b| (b, now)).collect();
        self.note_due(&all).await
    }

    /// Marks buckets due after this node dropped a node's records with fence
    /// `upto`: every bucket when the fence can be forgotten, and at once those where
    /// records went (`dropped`: per bucket, in bucket order).
    pub(crate) async fn note_dropped(&self, upto: i64, dropped: &[u64]) -> Result<(), EngineError> {
        let forget = upto + self.lease_forget_after() + 1;
        let now = now_ms();
        let points: Vec<(Bucket, i64)> = Bucket::all()
            .zip(dropped.iter().copied().chain(std::iter::repeat(0)))
            .map(|(b, n)| (b, if n > 0 { now } else { forget }))
            .collect();
        self.note_due(&points).await
    }

    /// One sweep round: the periodic chores if due, then every bucket whose time
    /// has come. Returns the sessions ended.
    pub(crate) async fn sweep(&self) -> Result<u64, EngineError> {
        let now = now_ms();
        if Marks::due(&self.marks.next_full, now, FULL_SWEEP_EVERY) {
            if let Err(e) = self.note_all_due().await {
                self.marks.next_full.store(0, Ordering::Relaxed);
                return Err(e);
            }
            tracing::debug!("marked every bucket due (full sweep)");
        }
        if Marks::due(&self.marks.next_flush, now, MARKS_EVERY)
            && let Err(e) = self.flush_marks().await
        {
            // The marks stay (see `flush_marks`) for the next try; the sweep goes on.
            tracing::debug!(error = %e, "sweep marks not written yet");
        }
        let key = self.keys.sweep();
        let any: Vec<String> = self
            .run(|mut c| async move {
                redis::cmd("ZRANGE")
                    .arg(key)
                    .arg("-inf")
                    .arg(now)
                    .arg("BYSCORE")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(1)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        if any.is_empty() {
            return Ok(0);
        }
        let claimed: Vec<String> = self
            .fcall(
                "sh_sweep_claim",
                &[self.keys.sweep()],
                (now, now + CLAIM_FOR.as_millis() as i64, MOST_CLAIMED),
            )
            .await?;
        let ended = try_join_all(
            claimed
                .iter()
                .filter_map(|h| Bucket::parse_hex(h))
                .map(|b| self.sweep_bucket(b)),
        )
        .await?;
        Ok(ended.into_iter().sum())
    }

    /// Sweeps one claimed bucket and writes its next time back.
    async fn sweep_bucket(&self, b: Bucket) -> Result<u64, EngineError> {
        let key = [self.keys.expiry(b)];
        let forget = self.lease_forget_after();
        let reply: redis::Value = self
            .fcall("sh_expire", &key, (now_ms(), EXPIRE_BATCH, forget, "1"))
            .await?;
        let (mut n, emptied) = expire_reply(reply)?;
        for (group, count) in emptied {
            self.forget_group_bucket(&group, b).await?;
            self.fcall::<i64>(
                "sh_group_emptied_done",
                &[self.keys.groups_emptied(b)],
                (group.as_str(), count.as_str()),
            )
            .await?;
        }
        let mut total = 0;
        loop {
            total += n.max(0) as u64;
            if (n.max(0) as usize) < EXPIRE_BATCH {
                break;
            }
            n = self
                .fcall("sh_expire", &key, (now_ms(), EXPIRE_BATCH))
                .await?;
        }
        // Raise to what the bucket needs, then look again: see the module's doc.
        let next = self.sweep_next(b).await?;
        let index = self.keys.sweep();
        let member = b.hex();
        self.run(|mut c| async move {
            let cmd = if next < 0 {
                let mut c = redis::cmd("ZREM");
                c.arg(index).arg(member);
                c
            } else {
                let mut c = redis::cmd("ZADD");
                c.arg(index).arg(next).arg(member);
                c
            };
            cmd.query_async::<i64>(&mut c).await
        })
        .await?;
        let again = self.sweep_next(b).await?;
        if again >= 0 && (next < 0 || again < next) {
            self.note_due(&[(b, again)]).await?;
        }
        Ok(total)
    }

    /// When bucket `b` next needs the sweep (`sh_sweep_next`; -1: nothing).
    async fn sweep_next(&self, b: Bucket) -> Result<i64, EngineError> {
        self.fcall(
            "sh_sweep_next",
            &[self.keys.expiry(b)],
            self.lease_forget_after(),
        )
        .await
    }

    /// Writes this node's lease-field marks to the index, and marks due the buckets
    /// where a group it added members to has emptied.
    async fn flush_marks(&self) -> Result<(), EngineError> {
        let forget = self.lease_forget_after();
        let leases: Vec<(Bucket, i64)> = lock(&self.marks.leases).drain().collect();
        let points: Vec<(Bucket, i64)> = leases
            .iter()
            .map(|&(b, lease)| (b, lease + forget + 1))
            .collect();
        if let Err(e) = self.note_due(&points).await {
            let mut back = lock(&self.marks.leases);
            for (b, lease) in leases {
                let e = back.entry(b).or_insert(lease);
                *e = (*e).max(lease);
            }
            return Err(e);
        }
        // Each pair leaves the set before it is looked at and comes back if the
        // group is still there, so an add racing the check is never lost.
        let watched: Vec<(GroupName, Bucket)> = lock(&self.marks.groups).drain().collect();
        if watched.is_empty() {
            return Ok(());
        }
        let checks = futures_util::stream::iter(watched.into_iter().map(|(g, b)| async move {
            let key = self.keys.group(b, &g);
            let exists: Result<i64, _> = self
                .run(|mut c| async move { redis::cmd("EXISTS").arg(key).query_async(&mut c).await })
                .await;
            (g, b, exists)
        }))
        .buffer_unordered(GROUP_CHECKS_IN_FLIGHT)
        .collect::<Vec<_>>()
        .await;
        let now = now_ms();
        let mut gone = Vec::new();
        let mut emptied = Vec::new();
        let mut failed = None;
        {
            let mut groups = lock(&self.marks.groups);
            for (g, b, exists) in checks {
                match exists {
                    Ok(0) => {
                        gone.push((b, now));
                        emptied.push((g, b));
                    }
                    Ok(_) => {
                        groups.insert((g, b));
                    }
                    Err(e) => {
                        groups.insert((g, b));
                        failed = Some(e);
                    }
                }
            }
        }
        gone.sort_unstable();
        gone.dedup();
        self.note_due(&gone).await?;
        // The sweep forgets a bucket where a group emptied, but only one its
        // `groups:emptied` lists: a member whose socket closed between this node's
        // `sh_group_add` and its count's `HINCRBY`, with a sweep in between, would
        // leave the count behind for good. Forgetting here is as safe as there (the
        // count is read before the members are looked at).
        for (g, b) in emptied {
            self.forget_group_bucket(g.as_str(), b).await?;
        }
        if let Some(e) = failed {
            return Err(e);
        }
        Ok(())
    }
}
