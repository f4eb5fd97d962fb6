//! The [`Engine`] implementation: each call one function of the library, or a
//! read, bucket by bucket where a call spans buckets.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use futures_util::future::try_join_all;
use sessionhub_core::protocol::{SESSION_CREATED_MESSAGE, ServerFrame};
use sessionhub_core::time::now_ms;
use sessionhub_core::{
    ConnectionId, CreatedSession, Delivery, EndReason, Engine, EngineError, EngineStats, GroupName,
    HeldSockets, LocalRecord, Member, NewSession, NodeId, NodeStatus, NodeView, OnlineUser,
    PresenceCounts, Reasserted, Recovery, Registered, SecretHash, Session, SessionId, Target,
    Token, UserId,
};

use crate::client::Inner;
use crate::error::{FunctionError, corrupt};
use crate::keys::Bucket;
use crate::reply::{history_state, parse_conns, session_from_fields, session_from_map};
use crate::wire::{self, Fields};
use crate::{RedisEngine, cleanup};

/// No arguments for a function call.
const NO_ARGS: &[&str] = &[];
/// Sockets re-asserted per function call, to keep each call short.
const REASSERT_BATCH: usize = 1000;

fn member_key(member: &Member) -> (&'static str, &str) {
    match member {
        Member::Connection(c) => ("conn", c.as_str()),
        Member::User(u) => ("user", u.as_str()),
    }
}

#[async_trait]
impl Engine for RedisEngine {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn node_id(&self) -> &NodeId {
        &self.inner.node_id
    }

    fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    fn stats(&self) -> EngineStats {
        EngineStats {
            store_errors: self.inner.errors.load(Ordering::Relaxed),
            reconnects: self.inner.reconnects.load(Ordering::Relaxed),
            reaped_records: self.inner.reaped.load(Ordering::Relaxed),
            cleanup_pending: self.inner.cleanup.pending(),
            cleanup_dropped: self.inner.cleanup.dropped(),
        }
    }

    /// Ready when Redis answers, the subscriber holds its subscriptions, and this
    /// node's own probe came back through pub/sub recently: a node that is connected
    /// but deaf is not ready.
    async fn ping(&self) -> Result<(), EngineError> {
        self.inner
            .run(
                |mut c| async move { redis::cmd("PING").query_async::<redis::Value>(&mut c).await },
            )
            .await?;
        if !self.inner.subscribed.load(Ordering::Relaxed) {
            return Err(EngineError::unavailable(
                "this node's pub/sub subscriber is reconnecting",
            ));
        }
        if !self.inner.probes_proven() {
            return Err(EngineError::unavailable(
                "this node's pub/sub probe has not come back on every bucket channel since it subscribed",
            ));
        }
        let lag = self.inner.probe_lag();
        if lag > self.inner.lease.probe_max_lag().as_millis() as i64 {
            return Err(EngineError::unavailable(format!(
                "this node's pub/sub probe has not come back for {lag} ms"
            )));
        }
        Ok(())
    }

    async fn create_session(&self, new: NewSession) -> Result<CreatedSession, EngineError> {
        let now = now_ms();
        let expires_at = now + new.ttl.as_millis() as i64;
        let idle_ms = new.idle.as_millis() as i64;
        let user_agent = new.user_agent.clone().unwrap_or_default();
        let ip = new.ip.clone().unwrap_or_default();
        let keys = &self.inner.keys;
        // A session id is 96 random bits under the user's tag; a collision is
        // astronomically unlikely, but the function refuses one rather than overwrite.
        let history = self.inner.history;
        for _ in 0..3 {
            let token = Token::generate(&new.user_id);
            let sid = token.session_id().clone();
            let session = Session {
                session_id: sid.clone(),
                user_id: new.user_id.clone(),
                user_agent: new.user_agent.clone(),
                ip: new.ip.clone(),
                created_at: now,
                last_seen_at: now,
                expires_at,
                idle_expires_at: now + idle_ms,
                connections: Vec::new(),
            };
            // The user's other sockets get this frame (with its offset, when it joins
            // the history), routed by the function like a publish.
            let created = ServerFrame::SessionCreated {
                session: &session,
                message: SESSION_CREATED_MESSAGE,
            }
            .to_json();
            let res: Result<i64, _> = self
                .inner
                .try_fcall(
                    "sh_create_session",
                    &[keys.session(&sid), keys.user_sessions(&new.user_id)],
                    (
                        (
                            new.user_id.as_str(),
                            token.secret_hash().as_str(),
                            user_agent.as_str(),
                            ip.as_str(),
                            now,
                            expires_at,
                            idle_ms,
                            self.inner.limits.sessions_per_user,
                            self.inner.deadline(),
                        ),
                        (
                            created.as_str(),
                            history.size,
                            history.ttl_ms(),
                            history.meta_ttl_ms(),
                        ),
                    ),
                )
                .await;
            match res {
                Ok(_) => {
                    // The sweep index learns of the session after its function (see
                    // `sweep`); if Redis does not answer now, the cleanup queue retries.
                    let due = [(Bucket::of(sid.as_str()), expires_at.min(now + idle_ms))];
                    if let Err(e) = self.inner.note_due(&due).await {
                        tracing::debug!(error = %e, "sweep index not told of a login yet; retrying");
                        self.inner
                            .cleanup
                            .push(cleanup::Item::Due(due[0].0, due[0].1));
                    }
                    return Ok(CreatedSession { session, token });
                }
                Err(FunctionError::Exists(_)) => continue,
                Err(e) => {
                    let e = EngineError::from(e);
                    if matches!(e, EngineError::Unavailable { .. }) {
                        // The caller never gets this token: if the call ran after all
                        // (its answer lost), end the session it made.
                        self.inner.cleanup.push(cleanup::Item::Session(sid));
                    }
                    return Err(e);
                }
            }
        }
        Err(EngineError::corrupt("could not find a free session id"))
    }

    async fn authenticate(&self, token: &Token) -> Result<Option<Session>, EngineError> {
        let sid = token.session_id();
        let key = self.inner.keys.session(sid);
        let mut map: std::collections::HashMap<String, String> = self
            .inner
            .run(|mut c| async move { redis::cmd("HGETALL").arg(key).query_async(&mut c).await })
            .await?;
        let Some(stored) = map.remove("secret_hash") else {
            return Ok(None);
        };
        if !SecretHash::from_stored(stored).ct_eq(&token.secret_hash()) {
            return Ok(None);
        }
        let session = session_from_map(sid, map)?;
        Ok((!session.expired_at(now_ms())).then_some(session))
    }

    async fn get_session(&self, session_id: &SessionId) -> Result<Option<Session>, EngineError> {
        let keys = &self.inner.keys;
        let (key, conns_key) = (keys.session(session_id), keys.conns(session_id));
        type Reply = (
            std::collections::HashMap<String, String>,
            Vec<(String, String)>,
        );
        let (map, conns): Reply = self
            .inner
            .run(|mut c| async move {
                redis::pipe()
                    .hgetall(key)
                    .hgetall(conns_key)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        if map.is_empty() {
            return Ok(None);
        }
        let mut session = session_from_map(session_id, map)?;
        if session.expired_at(now_ms()) {
            return Ok(None);
        }
        session.connections = parse_conns(conns)?;
        Ok(Some(session))
    }

    async fn user_sessions(&self, user_id: &UserId) -> Result<Vec<Session>, EngineError> {
        type Row = (
            String,
            String,
            String,
            String,
            String,
            String,
            String,
            Vec<(String, String)>,
        );
        let rows: Vec<Row> = self
            .inner
            .fcall(
                "sh_user_sessions",
                &[self.inner.keys.user_sessions(user_id)],
                NO_ARGS,
            )
            .await?;
        let now = now_ms();
        let mut out = Vec::with_capacity(rows.len());
        for (sid, user_agent, ip, created_at, last_seen_at, expires_at, idle_ms, conns) in rows {
            let sid = SessionId::parse(&sid).map_err(corrupt)?;
            let row = (
                user_agent,
                ip,
                created_at,
                last_seen_at,
                expires_at,
                idle_ms,
            );
            let fields = Fields::from_row(user_id.to_string(), row);
            let mut s = session_from_fields(&sid, fields)?;
            if s.expired_at(now) {
                continue;
            }
            s.connections = parse_conns(conns)?;
            out.push(s);
        }
        out.sort_by(|a, b| (a.created_at, &a.session_id).cmp(&(b.created_at, &b.session_id)));
        Ok(out)
    }

    async fn kill_session(
        &self,
        session_id: &SessionId,
        owner: Option<&UserId>,
        reason: EndReason,
    ) -> Result<bool, EngineError> {
        let owner = owner.map(UserId::as_str).unwrap_or("");
        let n: i64 = self
            .inner
            .fcall(
                "sh_kill_session",
                &[self.inner.keys.session(session_id)],
                (reason.as_str(), owner, self.inner.deadline(), now_ms()),
            )
            .await?;
        Ok(n > 0)
    }

    async fn kill_user_sessions(
        &self,
        user_id: &UserId,
        except: Option<&SessionId>,
        reason: EndReason,
    ) -> Result<u64, EngineError> {
        let keep = except.map(SessionId::as_str).unwrap_or("");
        let n: i64 = self
            .inner
            .fcall(
                "sh_kill_user_sessions",
                &[self.inner.keys.user_sessions(user_id)],
                (reason.as_str(), keep, self.inner.deadline(), now_ms()),
            )
            .await?;
        Ok(n.max(0) as u64)
    }

    async fn register_recovering(
        &self,
        token: &Token,
        connection_id: &ConnectionId,
        recovery: Option<&Recovery>,
    ) -> Result<Option<Registered>, EngineError> {
        let sid = token.session_id();
        let limits = self.inner.limits;
        let history = self.inner.history;
        let (since, epoch) = match recovery {
            Some(r) => (r.since.to_string(), r.epoch.as_str()),
            None => (String::new(), ""),
        };
        let lease = self.inner.lease_until.load(Ordering::Acquire);
        self.inner
            .marks
            .registered(Bucket::of(connection_id.as_str()), lease);
        // Dropped mid-call (a client that resets its upgrade makes actix drop the
        // handler), the call may still run: its record must not outlive it, counted
        // against the socket limits until reconciliation found it.
        let undo = cleanup::OnDrop::new(
            &self.inner.cleanup,
            cleanup::Item::Connection(connection_id.clone()),
        );
        let reply: Result<Option<Vec<redis::Value>>, _> = self
            .inner
            .fcall(
                "sh_register_connection",
                &[self.inner.keys.session(sid)],
                (
                    (
                        token.secret_hash().as_str(),
                        connection_id.as_str(),
                        self.inner.node_id.as_str(),
                        now_ms(),
                        limits.per_session,
                        limits.per_user,
                        lease,
                        self.inner.deadline(),
                    ),
                    (
                        history.size,
                        history.ttl_ms(),
                        history.meta_ttl_ms(),
                        since.as_str(),
                        epoch,
                    ),
                ),
            )
            .await;
        let reply = match reply {
            // It may still run (before its deadline) or have run with the answer
            // lost: the undo stays armed, so no record outlives this failed upgrade.
            Err(e @ EngineError::Unavailable { .. }) => return Err(e),
            other => {
                undo.disarm();
                other?
            }
        };
        let Some(mut reply) = reply else {
            return Ok(None);
        };
        if reply.len() < 7 {
            return Err(corrupt(format!(
                "sh_register_connection answered {} fields, expected at least 7",
                reply.len()
            )));
        }
        let rest = reply.split_off(7);
        let row: (String, String, String, String, String, String, String) =
            redis::from_redis_value(redis::Value::Array(reply)).map_err(corrupt)?;
        let (user_id, user_agent, ip, created_at, last_seen_at, expires_at, idle_ms) = row;
        let row = (
            user_agent,
            ip,
            created_at,
            last_seen_at,
            expires_at,
            idle_ms,
        );
        let session = session_from_fields(sid, Fields::from_row(user_id, row))?;
        let history = history_state(rest)?;
        Ok(Some(Registered { session, history }))
    }

    async fn unregister_connection(&self, connection_id: &ConnectionId) -> Result<(), EngineError> {
        let res = self.inner.unregister(connection_id).await;
        if res.is_err() {
            // Retried until Redis confirms: a record left behind would count
            // against presence and the socket limits.
            self.inner
                .cleanup
                .push(cleanup::Item::Connection(connection_id.clone()));
        }
        res
    }

    async fn publish(&self, target: &Target, frame: &str) -> Result<Delivery, EngineError> {
        let keys = &self.inner.keys;
        let key = match target {
            Target::User(u) => keys.user_sessions(u),
            Target::Session(s) => keys.session(s),
            Target::Connection(c) => keys.conn(c),
            Target::Group(g) => return self.publish_group(g, frame).await,
            Target::All => {
                let nodes = self
                    .inner
                    .publish_raw(keys.all_channel(), wire::broadcast_payload(frame))
                    .await?;
                return Ok(Delivery {
                    nodes: nodes.max(0) as u64,
                    connections: None,
                    offset: None,
                });
            }
        };
        let history = self.inner.history;
        let reply: Vec<i64> = self
            .inner
            .fcall(
                "sh_publish",
                &[key],
                (
                    frame,
                    self.inner.deadline(),
                    history.size,
                    history.ttl_ms(),
                    history.meta_ttl_ms(),
                ),
            )
            .await?;
        delivery_of(&reply)
    }

    async fn publish_batch(
        &self,
        items: &[(Target, String)],
    ) -> Vec<Result<Delivery, EngineError>> {
        // Users, sessions and connections: on Redis Cluster one sh_publish_batch per
        // bucket (a call's keys share a slot), on one Redis one per
        // SINGLE_REDIS_BATCH_CALL targets of any buckets, in the batch's order
        // within each. Groups and "all" span buckets: as single publishes.
        // Each target's key is built once (a user's bucket is a SHA-256 of its id).
        let mut keys: Vec<Option<String>> = Vec::with_capacity(items.len());
        let mut targeted = Vec::new();
        let mut single = Vec::new();
        for (i, (target, _)) in items.iter().enumerate() {
            match target_key(&self.inner.keys, target) {
                Some((b, key)) => {
                    targeted.push((i, b));
                    keys.push(Some(key));
                }
                None => {
                    single.push(i);
                    keys.push(None);
                }
            }
        }
        let calls: Vec<Vec<usize>> = if self.inner.is_cluster() {
            by_bucket(targeted)
        } else {
            targeted
                .chunks(SINGLE_REDIS_BATCH_CALL)
                .map(|chunk| chunk.iter().map(|&(i, _)| i).collect())
                .collect()
        };
        let calls: Vec<(Vec<usize>, Vec<String>)> = calls
            .into_iter()
            .map(|idx| {
                let call_keys = idx.iter().filter_map(|&i| keys[i].take()).collect();
                (idx, call_keys)
            })
            .collect();
        let batches =
            futures_util::future::join_all(calls.into_iter().map(|(idx, call_keys)| async move {
                let res = self.publish_in_bucket(items, &idx, &call_keys).await;
                (idx, res)
            }));
        let singles = futures_util::future::join_all(single.into_iter().map(|i| async move {
            let (target, frame) = &items[i];
            (i, self.publish(target, frame).await)
        }));
        let (batches, singles) = futures_util::join!(batches, singles);
        let mut out: Vec<Option<Result<Delivery, EngineError>>> = Vec::new();
        out.resize_with(items.len(), || None);
        for (idx, res) in batches {
            match res {
                Ok(deliveries) => {
                    for (i, d) in idx.into_iter().zip(deliveries) {
                        out[i] = Some(Ok(d));
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    for i in idx {
                        out[i] = Some(Err(EngineError::unavailable(message.clone())));
                    }
                }
            }
        }
        for (i, res) in singles {
            out[i] = Some(res);
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(EngineError::corrupt("a batch item got no answer"))))
            .collect()
    }

    async fn group_add(&self, group: &GroupName, member: &Member) -> Result<bool, EngineError> {
        let inner = &self.inner;
        let b = member_bucket(member);
        let key = [inner.keys.group(b, group)];
        let add = async {
            match member {
                Member::Connection(c) => {
                    inner
                        .fcall::<i64>(
                            "sh_group_add",
                            &key,
                            ("conn", c.as_str(), now_ms(), inner.deadline()),
                        )
                        .await
                }
                Member::User(u) => {
                    inner
                        .fcall::<i64>(
                            "sh_group_add",
                            &key,
                            ("user", u.as_str(), now_ms(), inner.deadline()),
                        )
                        .await
                }
            }
        };
        // Both must hold before the add is acknowledged, in this order: the sweep
        // that forgets emptied buckets relies on the count moving after the add.
        let n = add.await?;
        if n == 0 {
            // Refused (the connection is not live): nothing was added, so nothing
            // may point at the bucket; a 404 has no later effect.
            return Ok(false);
        }
        inner.marks.group_added(group, b);
        let buckets = inner.keys.group_buckets(group);
        inner
            .run(|mut c| async move {
                redis::cmd("HINCRBY")
                    .arg(buckets)
                    .arg(b.hex())
                    .arg(1)
                    .query_async::<i64>(&mut c)
                    .await
            })
            .await?;
        Ok(true)
    }

    async fn group_remove(&self, group: &GroupName, member: &Member) -> Result<bool, EngineError> {
        let (kind, id) = member_key(member);
        let key = self.inner.keys.group(member_bucket(member), group);
        let n: i64 = self
            .inner
            .fcall("sh_group_remove", &[key], (kind, id, self.inner.deadline()))
            .await?;
        Ok(n > 0)
    }

    async fn group_members(&self, group: &GroupName) -> Result<Vec<Member>, EngineError> {
        let inner = &self.inner;
        let buckets = inner.group_buckets(group).await?;
        let per_bucket = try_join_all(buckets.into_iter().map(|b| {
            let key = inner.keys.group(b, group);
            inner.run(|mut c| async move {
                redis::cmd("HKEYS")
                    .arg(key)
                    .query_async::<Vec<String>>(&mut c)
                    .await
            })
        }))
        .await?;
        let mut out = per_bucket
            .iter()
            .flatten()
            .map(|f| match f.split_once(':') {
                Some(("conn", id)) => ConnectionId::parse(id)
                    .map(Member::Connection)
                    .map_err(corrupt),
                Some(("user", id)) => UserId::parse(id).map(Member::User).map_err(corrupt),
                _ => Err(corrupt(format!("bad group member {f:?}"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.sort();
        Ok(out)
    }

    /// Merges one page from every bucket (each in lexical order) into one page.
    async fn online_users(
        &self,
        after: Option<&UserId>,
        limit: usize,
    ) -> Result<Vec<OnlineUser>, EngineError> {
        // An empty prefix matches every user id: the same merged walk of the buckets.
        self.online_users_matching("", after, limit).await
    }

    async fn online_users_matching(
        &self,
        prefix: &str,
        after: Option<&UserId>,
        limit: usize,
    ) -> Result<Vec<OnlineUser>, EngineError> {
        let inner = &self.inner;
        let after = after.map(UserId::as_str).unwrap_or("");
        let pages = inner
            .each_bucket(|b| async move {
                inner
                    .fcall::<Vec<(String, u64)>>(
                        "sh_online_users",
                        &[inner.keys.online(b)],
                        (after, limit, prefix),
                    )
                    .await
            })
            .await?;
        let mut all: Vec<(String, u64)> = pages.into_iter().flatten().collect();
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        all.truncate(limit);
        all.into_iter()
            .map(|(u, n)| {
                Ok(OnlineUser {
                    user_id: UserId::parse(&u).map_err(corrupt)?,
                    connections: n,
                })
            })
            .collect()
    }

    async fn announce(&self, status: &NodeStatus) -> Result<(), EngineError> {
        let key = self.inner.keys.node_status(&self.inner.node_id);
        // With the library copy it calls: nodes delete the copies no live node names
        // (`Inner::forget_unused_libraries`).
        #[derive(serde::Serialize)]
        struct Announced<'a> {
            #[serde(flatten)]
            status: &'a NodeStatus,
            library: String,
        }
        let json = serde_json::to_string(&Announced {
            status,
            library: self.inner.library_name(),
        })
        .map_err(corrupt)?;
        // It lives as long as the lease it was written under: a node that stops
        // renewing both leaves no status behind.
        let ttl = self.inner.lease.ttl_ms();
        self.inner
            .run(|mut c| async move {
                redis::cmd("SET")
                    .arg(key)
                    .arg(json)
                    .arg("PX")
                    .arg(ttl)
                    .query_async::<()>(&mut c)
                    .await
            })
            .await
    }

    async fn nodes(&self) -> Result<Vec<NodeView>, EngineError> {
        let inner = &self.inner;
        let key = inner.keys.nodes();
        let leases: Vec<(String, f64)> = inner
            .run(|mut c| async move {
                redis::cmd("ZRANGE")
                    .arg(key)
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES")
                    .query_async(&mut c)
                    .await
            })
            .await?;
        try_join_all(leases.into_iter().map(|(id, lease)| async move {
            let node_id = NodeId::parse(&id).map_err(corrupt)?;
            let key = inner.keys.node_status(&node_id);
            let json: Option<String> = inner
                .run(|mut c| async move { redis::cmd("GET").arg(key).query_async(&mut c).await })
                .await?;
            Ok(NodeView {
                node_id,
                lease_expires_at: Some(lease as i64),
                // An unreadable status is shown as none rather than failing the list.
                status: json.and_then(|j| serde_json::from_str(&j).ok()),
            })
        }))
        .await
    }

    async fn presence_counts(&self) -> Result<PresenceCounts, EngineError> {
        let inner = &self.inner;
        let nodes = inner.node_ids().await?;
        let nodes = &nodes;
        let counts = inner
            .each_bucket(|b| async move {
                inner
                    .fcall::<(u64, u64)>("sh_presence_counts", &[inner.keys.online(b)], nodes)
                    .await
            })
            .await?;
        let (online_users, connections) = counts
            .into_iter()
            .fold((0, 0), |(u, c), (bu, bc)| (u + bu, c + bc));
        Ok(PresenceCounts {
            online_users,
            connections,
            nodes: nodes.len() as u64,
        })
    }

    /// Cheap first: the number of this node's records in each bucket; only buckets
    /// holding more records than sockets get a full look (`sh_reconcile`).
    async fn reconcile(&self, held: &dyn HeldSockets, before: i64) -> Result<u64, EngineError> {
        let inner = &self.inner;
        // A connection's bucket is its id's shard. Counting what is held per bucket
        // costs nothing; the ids are listed only for a bucket with more records than
        // sockets, so a node with many sockets does not walk them all every round.
        let counts: Vec<usize> = Bucket::all().map(|b| held.count(b.shard())).collect();
        // Only buckets where this node registered sockets since it started can
        // hold its records (it dropped every older one when it took its lease).
        let registered = inner.marks.registered_buckets();
        let mut look: Vec<Bucket> = registered
            .keys()
            .copied()
            .chain(Bucket::all().filter(|b| counts[b.index()] > 0))
            .collect();
        look.sort_unstable();
        look.dedup();
        let lens = try_join_all(look.into_iter().map(|b| async move {
            let key = inner.keys.node_conns(b, &inner.node_id);
            let n: usize = inner
                .run(|mut c| async move { redis::cmd("HLEN").arg(key).query_async(&mut c).await })
                .await?;
            Ok::<_, EngineError>((b, n))
        }))
        .await?;
        for (b, n) in &lens {
            // Nothing left there and no socket: look again only after a new
            // registration, and only once it is older than the grace time.
            if *n == 0
                && counts[b.index()] == 0
                && let Some(&at) = registered.get(b)
                && at < before
            {
                inner.marks.forget_registered(*b, at);
            }
        }
        let calls: Vec<_> = lens
            .into_iter()
            .filter(|(b, n)| *n > counts[b.index()])
            .map(|(b, _)| {
                let mut args = vec![before.to_string()];
                args.extend(held.ids(b.shard()).iter().map(ToString::to_string));
                (inner.keys.node_conns(b, &inner.node_id), args)
            })
            .collect();
        let removed: i64 = try_join_all(calls.into_iter().map(|(key, args)| async move {
            inner.fcall::<i64>("sh_reconcile", &[key], args).await
        }))
        .await?
        .into_iter()
        .sum();
        Ok(removed.max(0) as u64)
    }

    /// One pipeline per bucket (a pipeline must stay within one hash slot on Redis
    /// Cluster), all sent at once.
    async fn sessions_alive(&self, sessions: &[SessionId]) -> Result<Vec<bool>, EngineError> {
        let inner = &self.inner;
        let mut by_bucket: HashMap<Bucket, Vec<usize>> = HashMap::new();
        for (i, sid) in sessions.iter().enumerate() {
            by_bucket
                .entry(Bucket::of(sid.as_str()))
                .or_default()
                .push(i);
        }
        let replies = try_join_all(by_bucket.into_values().map(|idx| {
            let mut pipe = redis::pipe();
            for &i in &idx {
                pipe.exists(inner.keys.session(&sessions[i]));
            }
            async move {
                let alive: Vec<bool> = inner
                    .run(|mut c| async move { pipe.query_async(&mut c).await })
                    .await?;
                Ok::<_, EngineError>((idx, alive))
            }
        }))
        .await?;
        let mut out = vec![false; sessions.len()];
        for (idx, alive) in replies {
            for (i, a) in idx.into_iter().zip(alive) {
                out[i] = a;
            }
        }
        Ok(out)
    }

    async fn reassert(&self, records: &[LocalRecord]) -> Result<Reasserted, EngineError> {
        let inner = &self.inner;
        let mut by_bucket: HashMap<Bucket, Vec<&LocalRecord>> = HashMap::new();
        for r in records {
            by_bucket
                .entry(Bucket::of(r.connection_id.as_str()))
                .or_default()
                .push(r);
        }
        let lease = inner.lease_until.load(Ordering::Acquire);
        for b in by_bucket.keys() {
            inner.marks.registered(*b, lease);
        }
        let history = inner.history;
        let calls = by_bucket.iter().flat_map(|(b, recs)| {
            recs.chunks(REASSERT_BATCH).map(move |chunk| {
                let mut args: Vec<String> = Vec::with_capacity(6 + chunk.len() * 6);
                args.push(lease.to_string());
                args.push(now_ms().to_string());
                args.push("history".to_owned());
                args.push(history.size.to_string());
                args.push(history.ttl_ms().to_string());
                args.push(history.meta_ttl_ms().to_string());
                for r in chunk {
                    args.push(r.connection_id.to_string());
                    args.push(r.session_id.to_string());
                    args.push(r.user_id.to_string());
                    args.push(r.connected_at.to_string());
                    match &r.recovery {
                        Some(point) => {
                            args.push(point.epoch.clone());
                            args.push(point.since.to_string());
                        }
                        None => {
                            args.push(String::new());
                            args.push(String::new());
                        }
                    }
                }
                let key = inner.keys.node_conns(*b, &inner.node_id);
                async move {
                    inner
                        .fcall::<(Vec<String>, Vec<String>)>("sh_reassert", &[key], args)
                        .await
                }
            })
        });
        let mut out = Reasserted::default();
        for (gone, missed) in try_join_all(calls).await? {
            for s in gone {
                out.gone.push(SessionId::parse(&s).map_err(corrupt)?);
            }
            for c in missed {
                out.missed.push(ConnectionId::parse(&c).map_err(corrupt)?);
            }
        }
        Ok(out)
    }

    async fn touch(&self, session_id: &SessionId) -> Result<(), EngineError> {
        self.inner
            .fcall::<i64>(
                "sh_touch",
                &[self.inner.keys.session(session_id)],
                (now_ms(), self.inner.deadline()),
            )
            .await
            .map(drop)
    }

    /// Sweeps the buckets the sweep index says are due; see [`crate::sweep`].
    async fn expire_due(&self) -> Result<u64, EngineError> {
        self.inner.sweep().await
    }

    async fn leave(&self) -> Result<(), EngineError> {
        let inner = &self.inner;
        inner.stop.cancel();
        // Whose id is it? Asked afresh: the lease task may be finding out right now
        // (a node paused past its lease gets SIGTERM while another process took its
        // id), and dropping the id's records then would drop that process's.
        let superseded = inner.superseded.load(Ordering::Acquire)
            || matches!(inner.claim_id().await, Ok(Some(_)));
        if superseded {
            tracing::info!("left the cluster (this node's id is another process's)");
            return self.stop_tasks().await;
        }
        // Past any lease a heartbeat already on its way may set (one sent just before
        // the stop, waiting in Redis's socket, lands before the calls below): with
        // only the lease seen so far, such a heartbeat outlived the node in sh:nodes,
        // listed and counted until it was reaped.
        let upto = inner
            .lease_until
            .load(Ordering::Acquire)
            .max(now_ms().saturating_add(i64::try_from(inner.lease.ttl_ms()).unwrap_or(i64::MAX)));
        let n = inner.drop_node(&inner.node_id, upto).await?;
        inner
            .fcall::<i64>(
                "sh_node_forget",
                &[inner.keys.nodes()],
                (inner.node_id.as_str(), upto),
            )
            .await?;
        inner.release_id().await?;
        tracing::info!(records = n, "left the cluster");
        self.stop_tasks().await
    }
}

impl RedisEngine {
    /// Waits (a while) for the engine's tasks to return once stopped.
    async fn stop_tasks(&self) -> Result<(), EngineError> {
        let inner = &self.inner;
        inner.tasks.close();
        if tokio::time::timeout(TASKS_STOP_TIMEOUT, inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("the engine's tasks did not stop in time");
        }
        Ok(())
    }
}

/// How long leaving waits for the engine's tasks (subscriber, lease, cleanup) to
/// return once stopped.
const TASKS_STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// The bucket and key of a user, session or connection target (`None` for groups
/// and `"all"`, which span buckets).
fn target_key(keys: &crate::keys::Keys, target: &Target) -> Option<(Bucket, String)> {
    let key = match target {
        Target::User(u) => keys.user_sessions(u),
        Target::Session(s) => keys.session(s),
        Target::Connection(c) => keys.conn(c),
        Target::Group(_) | Target::All => return None,
    };
    keys.bucket_of_key(&key).map(|b| (b, key))
}

/// One `{nodes, connections[, offset]}` of `sh_publish` or `sh_publish_batch`.
fn delivery_of(reply: &[i64]) -> Result<Delivery, EngineError> {
    match reply {
        [n, c, rest @ ..] => Ok(Delivery {
            nodes: (*n).max(0) as u64,
            connections: Some((*c).max(0) as u64),
            offset: rest.first().map(|&o| o.max(0) as u64),
        }),
        _ => Err(corrupt(format!("a publish answered {reply:?}"))),
    }
}

/// Batch items (index, bucket) grouped by bucket, each group in the batch's order.
fn by_bucket(items: impl IntoIterator<Item = (usize, Bucket)>) -> Vec<Vec<usize>> {
    let mut groups: HashMap<Bucket, Vec<usize>> = HashMap::new();
    for (i, b) in items {
        groups.entry(b).or_default().push(i);
    }
    groups.into_values().collect()
}

/// Most targets of a batch publish in one `sh_publish_batch` on one Redis: the call
/// holds Redis for its whole run, so a batch of 1,000 goes as several.
const SINGLE_REDIS_BATCH_CALL: usize = 64;

impl RedisEngine {
    /// Items `idx` of a batch, all user, session or connection targets (of one
    /// bucket on Redis Cluster): one `sh_publish_batch`.
    async fn publish_in_bucket(
        &self,
        items: &[(Target, String)],
        idx: &[usize],
        keys: &[String],
    ) -> Result<Vec<Delivery>, EngineError> {
        let replies = self.batch_call(items, idx, keys).await?;
        if replies.len() != idx.len() {
            return Err(corrupt(format!(
                "sh_publish_batch answered {} results for {} messages",
                replies.len(),
                idx.len()
            )));
        }
        replies.iter().map(|r| delivery_of(r)).collect()
    }

    /// One `sh_publish_batch` for items `idx`, whose target keys are `keys`: its
    /// replies as they are.
    async fn batch_call(
        &self,
        items: &[(Target, String)],
        idx: &[usize],
        keys: &[String],
    ) -> Result<Vec<Vec<i64>>, FunctionError> {
        let inner = &self.inner;
        let history = inner.history;
        let frames: Vec<&str> = idx.iter().map(|&i| items[i].1.as_str()).collect();
        inner
            .try_fcall(
                "sh_publish_batch",
                keys,
                (
                    inner.deadline(),
                    history.size,
                    history.ttl_ms(),
                    history.meta_ttl_ms(),
                    frames,
                ),
            )
            .await
    }

    /// A group publish: one `sh_publish` per bucket that may hold members. The node
    /// count is the sum over buckets (a node reached from two buckets counts twice).
    async fn publish_group(&self, group: &GroupName, frame: &str) -> Result<Delivery, EngineError> {
        let inner = &self.inner;
        let buckets = inner.group_buckets(group).await?;
        let replies = try_join_all(buckets.into_iter().map(|b| {
            let key = inner.keys.group(b, group);
            async move {
                inner
                    .fcall::<(i64, i64)>("sh_publish", &[key], (frame, inner.deadline()))
                    .await
            }
        }))
        .await?;
        let (nodes, conns) = replies
            .into_iter()
            .fold((0, 0), |(n, c), (bn, bc)| (n + bn.max(0), c + bc.max(0)));
        Ok(Delivery {
            nodes: nodes as u64,
            connections: Some(conns as u64),
            offset: None,
        })
    }
}

impl Inner {
    /// The node ids holding a lease entry, live or not yet reaped.
    /// The nodes whose lease has not expired (a dead node not yet reaped is not
    /// counted: its records are going, in several steps on Redis Cluster).
    async fn node_ids(&self) -> Result<Vec<String>, EngineError> {
        let key = self.keys.nodes();
        self.run(|mut c| async move {
            redis::cmd("ZRANGE")
                .arg(key)
                .arg(now_ms())
                .arg("+inf")
                .arg("BYSCORE")
                .query_async(&mut c)
                .await
        })
        .await
    }

    /// Removes a connection's records (idempotent).
    pub(crate) async fn unregister(&self, cid: &ConnectionId) -> Result<(), EngineError> {
        self.fcall::<i64>("sh_unregister_connection", &[self.keys.conn(cid)], NO_ARGS)
            .await
            .map(drop)
    }

    /// Ends a session whose creation was answered with an error (if it exists).
    pub(crate) async fn end_unseen_session(&self, sid: &SessionId) -> Result<(), EngineError> {
        self.fcall::<i64>(
            "sh_kill_session",
            &[self.keys.session(sid)],
            (EndReason::Killed.as_str(), ""),
        )
        .await
        .map(drop)
    }
}

impl Inner {
    /// The buckets that may hold members of a group (and those a 0.2.0 node wrote
    /// in the older set).
    async fn group_buckets(&self, group: &GroupName) -> Result<Vec<Bucket>, EngineError> {
        let key = self.keys.group_buckets(group);
        let legacy = self.keys.legacy_group_buckets(group);
        let current =
            self.run(|mut c| async move { redis::cmd("HKEYS").arg(key).query_async(&mut c).await });
        let old = self.run(|mut c| async move {
            redis::cmd("SMEMBERS").arg(legacy).query_async(&mut c).await
        });
        let (current, old): (Vec<String>, Vec<String>) = tokio::try_join!(current, old)?;
        let mut buckets: Vec<Bucket> = current.iter().chain(&old).map(|h| Bucket::of(h)).collect();
        buckets.sort_unstable();
        buckets.dedup();
        Ok(buckets)
    }

    /// Forgets bucket `b` in a group's bucket index if its members there are gone
    /// and none was added meanwhile. The count is read before the members are
    /// looked at: see `sh_group_forget_bucket`.
    pub(crate) async fn forget_group_bucket(
        &self,
        group: &str,
        b: Bucket,
    ) -> Result<(), EngineError> {
        let Ok(group) = GroupName::parse(group) else {
            tracing::warn!(
                group,
                "ignoring a malformed group name in an emptied-groups set"
            );
            return Ok(());
        };
        let index = self.keys.group_buckets(&group);
        let idx = index.clone();
        let adds: Option<String> = self
            .run(|mut c| async move {
                redis::cmd("HGET")
                    .arg(idx)
                    .arg(b.hex())
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let Some(adds) = adds else { return Ok(()) };
        let members = self.keys.group(b, &group);
        let exists: i64 = self
            .run(|mut c| async move { redis::cmd("EXISTS").arg(members).query_async(&mut c).await })
            .await?;
        if exists == 0 {
            self.fcall::<i64>("sh_group_forget_bucket", &[index], (b.hex(), adds))
                .await?;
        }
        Ok(())
    }
}

/// The bucket a group member's entry lives in.
fn member_bucket(member: &Member) -> Bucket {
    match member {
        Member::Connection(c) => Bucket::of(c.as_str()),
        Member::User(u) => Bucket::of(&u.tag()),
    }
}
