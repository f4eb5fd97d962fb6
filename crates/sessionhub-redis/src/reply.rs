//! Parsing the replies of Redis commands and functions into the engine's types.

use sessionhub_core::history::HistoryFrame;
use sessionhub_core::{
    ConnectionId, ConnectionInfo, EngineError, HistoryState, NodeId, Recovered, Session, SessionId,
};

use crate::error::corrupt;
use crate::wire::{self, Fields};

pub(crate) fn session_from_fields(sid: &SessionId, f: Fields) -> Result<Session, EngineError> {
    f.into_session(sid.clone()).map_err(corrupt)
}

/// Parses a connections hash (`connection_id` → `<node_id>|<connected_at>`),
/// sorted by connection time.
pub(crate) fn parse_conns(
    pairs: Vec<(String, String)>,
) -> Result<Vec<ConnectionInfo>, EngineError> {
    let mut out = pairs
        .into_iter()
        .map(|(cid, v)| {
            let (node, at) = v
                .split_once('|')
                .ok_or_else(|| corrupt(format!("bad connection record {v:?}")))?;
            Ok(ConnectionInfo {
                connection_id: ConnectionId::parse(&cid).map_err(corrupt)?,
                node_id: NodeId::parse(node).map_err(corrupt)?,
                connected_at: wire::ms(at).map_err(corrupt)?,
            })
        })
        .collect::<Result<Vec<_>, EngineError>>()?;
    out.sort_by_key(|c| c.connected_at);
    Ok(out)
}

fn field(map: &mut std::collections::HashMap<String, String>, name: &str) -> String {
    map.remove(name).unwrap_or_default()
}

pub(crate) fn session_from_map(
    sid: &SessionId,
    mut map: std::collections::HashMap<String, String>,
) -> Result<Session, EngineError> {
    session_from_fields(
        sid,
        Fields {
            user_id: field(&mut map, "user_id"),
            user_agent: field(&mut map, "user_agent"),
            ip: field(&mut map, "ip"),
            created_at: field(&mut map, "created_at"),
            last_seen_at: field(&mut map, "last_seen_at"),
            expires_at: field(&mut map, "expires_at"),
            idle_ms: field(&mut map, "idle_ms"),
        },
    )
}

/// The history part of `sh_register_connection`'s reply: nothing (history off),
/// epoch and offset, or those and the recovery's outcome and frames.
pub(crate) fn history_state(rest: Vec<redis::Value>) -> Result<Option<HistoryState>, EngineError> {
    let mut it = rest.into_iter();
    let (Some(epoch), Some(offset)) = (it.next(), it.next()) else {
        return Ok(None);
    };
    let epoch: String = redis::from_redis_value(epoch).map_err(corrupt)?;
    let offset: String = redis::from_redis_value(offset).map_err(corrupt)?;
    let offset: u64 = offset
        .parse()
        .map_err(|_| corrupt(format!("bad history offset {offset:?}")))?;
    let recovery = match (it.next(), it.next()) {
        (Some(ok), Some(frames)) => {
            let ok: i64 = redis::from_redis_value(ok).map_err(corrupt)?;
            let flat: Vec<String> = redis::from_redis_value(frames).map_err(corrupt)?;
            let frames = flat
                .chunks_exact(2)
                .map(|p| {
                    let offset = p[0]
                        .parse()
                        .map_err(|_| corrupt(format!("bad history offset {:?}", p[0])))?;
                    Ok(HistoryFrame {
                        offset,
                        frame: p[1].clone().into(),
                    })
                })
                .collect::<Result<Vec<_>, EngineError>>()?;
            Some(Recovered {
                recovered: ok == 1,
                frames,
            })
        }
        _ => None,
    };
    Ok(Some(HistoryState {
        epoch,
        offset,
        recovery,
    }))
}

/// `sh_expire`'s reply when the groups emptied are asked for: the sessions ended and
/// the groups with their counts. (Asked without, as 0.2 nodes do, it answers the
/// number alone; a node calls its own copy of the library, which always has this.)
pub(crate) fn expire_reply(v: redis::Value) -> Result<(i64, Vec<(String, String)>), EngineError> {
    let (n, flat): (i64, Vec<String>) = redis::from_redis_value(v).map_err(corrupt)?;
    let pairs = flat
        .chunks_exact(2)
        .map(|p| (p[0].clone(), p[1].clone()))
        .collect();
    Ok((n, pairs))
}
