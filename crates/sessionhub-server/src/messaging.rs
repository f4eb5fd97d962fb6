//! Service API for messages, groups and presence.

use std::borrow::Cow;
use std::fmt;

use actix_web::{HttpResponse, web};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sessionhub_core::protocol::ServerFrame;
use sessionhub_core::{ConnectionId, EngineError, GroupName, Member, SessionId, Target, UserId};

use crate::auth::ServiceAuth;
use crate::error::ApiError;
use crate::state::AppState;

/// Longest event name, in bytes.
pub const MAX_EVENT_LEN: usize = 128;
/// Default and largest page of `GET /api/v1/users?online=true`.
pub const DEFAULT_PAGE: usize = 100;
/// Largest page size a caller may ask for.
pub const MAX_PAGE: usize = 1000;
/// Room for the rest of a publish body around its `data`.
const PUBLISH_ENVELOPE: usize = 16 * 1024;
/// Most messages in one batch publish (more: 413).
pub const MAX_BATCH: usize = 1000;
/// Largest body of a batch publish (more: 413).
pub const MAX_BATCH_BODY: usize = 8 * 1024 * 1024;

/// Registers the routes (inside `/api/v1`).
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/publish", web::post().to(publish))
        .service(
            web::scope("/groups")
                .route("/{group}/members", web::get().to(group_members))
                .service(
                    crate::api::resource("/{group}/members/{member}")
                        .route(web::put().to(group_membership))
                        .route(web::delete().to(group_membership)),
                ),
        )
        .route("/users", web::get().to(online_users))
        .route("/presence", web::get().to(presence));
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Publish<'a> {
    #[serde(borrow)]
    to: To<'a>,
    event: String,
    /// Kept as the raw JSON text: it is checked for size and forwarded, never
    /// rebuilt.
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::BadRequest(msg.into())
}

/// A publish's `to` as sent, read without building a `serde_json::Value` (a map
/// and two strings per message of a batch): a string, a one-entry object `{kind:
/// id}` (the id `None` when it is not a string), or any other JSON value, read and
/// dropped. [`parse_target`] takes `"all"` and `{kind: id}` and refuses the rest once
/// the body has parsed. Strings are borrowed from the body unless they have escapes.
enum To<'a> {
    Str(Cow<'a, str>),
    One(Cow<'a, str>, Option<Cow<'a, str>>),
    Other,
}

impl<'de: 'a, 'a> Deserialize<'de> for To<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ToVisitor(std::marker::PhantomData))
    }
}

struct ToVisitor<'a>(std::marker::PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for ToVisitor<'a> {
    type Value = To<'a>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(To::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(To::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(To::Other)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(To::Other)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(To::Other)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(To::Other)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(To::Other)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(To::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let Some((To::Str(kind), id)) = map.next_entry::<To<'a>, To<'a>>()? else {
            return Ok(To::Other); // {} (keys are always strings)
        };
        // A second entry (even the same key again) makes it ambiguous.
        if map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(To::Other);
        }
        Ok(To::One(
            kind,
            match id {
                To::Str(id) => Some(id),
                _ => None,
            },
        ))
    }
}

/// Parses `"all"` or `{"user"|"session"|"connection"|"group": id}`.
fn parse_target(to: &To<'_>) -> Result<Target, ApiError> {
    const HINT: &str = "\"to\" must be \"all\" or one of {\"user\": id}, {\"session\": id}, {\"connection\": id}, {\"group\": name}";
    let (kind, id) = match to {
        To::Str(s) if s == "all" => return Ok(Target::All),
        To::One(kind, Some(id)) => (kind, id),
        To::Str(_) | To::One(_, None) | To::Other => return Err(bad(HINT)),
    };
    let err = |e: sessionhub_core::IdError| bad(e.to_string());
    Ok(match kind.as_ref() {
        "user" => Target::User(UserId::parse(id).map_err(err)?),
        "session" => Target::Session(SessionId::parse(id).map_err(err)?),
        "connection" => Target::Connection(ConnectionId::parse(id).map_err(err)?),
        "group" => Target::Group(GroupName::parse(id).map_err(err)?),
        _ => return Err(bad(HINT)),
    })
}

/// Reads a request body of at most `limit` bytes.
async fn read_body(mut payload: web::Payload, limit: usize) -> Result<web::BytesMut, ApiError> {
    use futures_util::StreamExt;
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| bad(format!("could not read the body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::TooLarge(format!(
                "publish body is over {limit} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Deepest nesting of arrays and objects in a published `data`.
pub const MAX_DATA_DEPTH: usize = 64;

/// The deepest nesting of arrays and objects in a JSON text (which serde_json has
/// already checked to be well-formed).
fn json_depth(json: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &b in json {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// Checks one message of a publish and serialises its client frame, once: every
/// node and socket forwards these bytes as they are.
fn prepare(req: &Publish<'_>, max: usize) -> Result<(Target, String), ApiError> {
    let target = parse_target(&req.to)?;
    if req.event.is_empty()
        || req.event.len() > MAX_EVENT_LEN
        || req.event.chars().any(char::is_control)
    {
        return Err(bad(format!(
            "\"event\" must be 1 to {MAX_EVENT_LEN} bytes without control characters"
        )));
    }
    let null = RawValue::NULL;
    let data = req.data.unwrap_or(null);
    let data_len = data.get().len();
    if data_len > max {
        return Err(ApiError::TooLarge(format!(
            "message data is {data_len} bytes; the limit is {max} (SESSIONHUB_MAX_MESSAGE_BYTES)"
        )));
    }
    // Forwarded verbatim, so bound what every receiving client must parse.
    if json_depth(data.get().as_bytes()) > MAX_DATA_DEPTH {
        return Err(bad(format!(
            "message data nests deeper than {MAX_DATA_DEPTH} levels"
        )));
    }
    let frame = ServerFrame::Message {
        event: &req.event,
        data,
    }
    .to_json();
    Ok((target, frame))
}

/// `POST /api/v1/publish`: one `{to, event, data}`, or an array of up to
/// [`MAX_BATCH`] of them.
async fn publish(
    _: ServiceAuth,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let max = state.config.max_message_bytes;
    let single_limit = max + PUBLISH_ENVELOPE;
    let body = read_body(payload, single_limit.max(MAX_BATCH_BODY)).await?;
    if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return publish_batch(&state, &body, max).await;
    }
    if body.len() > single_limit {
        return Err(ApiError::TooLarge(format!(
            "publish body is over {single_limit} bytes"
        )));
    }
    let req: Publish<'_> =
        serde_json::from_slice(&body).map_err(|e| bad(format!("invalid JSON body: {e}")))?;
    let (target, frame) = prepare(&req, max)?;
    let started = std::time::Instant::now();
    let delivery = state.engine.publish(&target, &frame).await?;
    state.metrics.publish_latency.observe(started.elapsed());
    Ok(HttpResponse::Accepted().json(delivery))
}

/// A batch's answer: `{"results": [...]}`, one per message in order (serialised
/// as it is, not through a `serde_json::Value`).
#[derive(Serialize)]
struct BatchAnswer {
    results: Vec<BatchResult>,
}

/// One answer of a batch: where the message went, or why it did not.
#[derive(Serialize)]
#[serde(untagged)]
enum BatchResult {
    Delivered(sessionhub_core::Delivery),
    Failed { error: String, status: u16 },
}

/// When a batch is a JSON array but one of its messages is not a message (a field
/// missing, unknown or of the wrong type): that message's error, naming it. Looked
/// for only once the whole batch failed to parse.
fn bad_item(body: &[u8]) -> Option<ApiError> {
    let items: Vec<&RawValue> = serde_json::from_slice(body).ok()?;
    items.iter().enumerate().find_map(|(i, raw)| {
        serde_json::from_str::<Publish<'_>>(raw.get())
            .err()
            .map(|e| bad(format!("invalid message: {e}")).for_item(i))
    })
}

/// A batch publish. Every message is checked first: one bad message refuses the
/// whole batch (400 or 413, naming it) and nothing is sent. Then one Redis call per
/// bucket the batch touches; 202 with one result per message, in order. A message
/// the store could not take has `{"error", "status": 503}` in its place; if none
/// could be taken the answer is 503.
async fn publish_batch(
    state: &AppState,
    body: &[u8],
    max: usize,
) -> Result<HttpResponse, ApiError> {
    let reqs: Vec<Publish<'_>> = match serde_json::from_slice(body) {
        Ok(reqs) => reqs,
        Err(e) => {
            return Err(bad_item(body).unwrap_or_else(|| bad(format!("invalid JSON body: {e}"))));
        }
    };
    if reqs.len() > MAX_BATCH {
        return Err(ApiError::TooLarge(format!(
            "a batch holds at most {MAX_BATCH} messages; this one has {}",
            reqs.len()
        )));
    }
    let items = reqs
        .iter()
        .enumerate()
        .map(|(i, r)| prepare(r, max).map_err(|e| e.for_item(i)))
        .collect::<Result<Vec<_>, ApiError>>()?;
    if items.is_empty() {
        return Ok(HttpResponse::Accepted().json(BatchAnswer {
            results: Vec::new(),
        }));
    }
    let started = std::time::Instant::now();
    let answers = state.engine.publish_batch(&items).await;
    state.metrics.publish_latency.observe(started.elapsed());
    let failed = answers.iter().filter(|a| a.is_err()).count();
    if failed == answers.len() {
        // Nothing was taken: the batch's answer is the store's error (logged once).
        let first = answers.into_iter().find_map(Result::err);
        return Err(first.map_or(ApiError::Internal, ApiError::from));
    }
    if failed > 0 {
        tracing::warn!(failed, of = answers.len(), "part of a batch publish failed");
    }
    let results: Vec<BatchResult> = answers
        .into_iter()
        .map(|a| match a {
            Ok(d) => BatchResult::Delivered(d),
            Err(e) => {
                let (status, error) = batch_error(&e);
                BatchResult::Failed {
                    error: error.to_owned(),
                    status,
                }
            }
        })
        .collect();
    Ok(HttpResponse::Accepted().json(BatchAnswer { results }))
}

/// The status and message a failed batch item reports (without logging it again).
fn batch_error(e: &EngineError) -> (u16, &'static str) {
    match e {
        EngineError::Unavailable { .. } => (503, "session store unavailable, retry later"),
        EngineError::Limit(_) => (429, "over a limit"),
        EngineError::Corrupt { .. } => (500, "internal error"),
    }
}

/// `<connection_id>` or `user:<user_id>`.
fn parse_member(s: &str) -> Result<Member, ApiError> {
    match s.strip_prefix("user:") {
        Some(u) => UserId::parse(u)
            .map(Member::User)
            .map_err(|e| bad(e.to_string())),
        None => ConnectionId::parse(s)
            .map(Member::Connection)
            .map_err(|_| bad("member must be a connection id or user:<user_id>")),
    }
}

fn parse_group(s: &str) -> Result<GroupName, ApiError> {
    GroupName::parse(s).map_err(|e| bad(e.to_string()))
}

/// `PUT` (add) or `DELETE` (remove) `/groups/{group}/members/{member}`: 204, or 404
/// when the connection is not live (add) or not a member (remove).
async fn group_membership(
    req: actix_web::HttpRequest,
    _: ServiceAuth,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (group, member) = path.into_inner();
    let (group, member) = (parse_group(&group)?, parse_member(&member)?);
    let done = if req.method() == actix_web::http::Method::PUT {
        state.engine.group_add(&group, &member).await?
    } else {
        state.engine.group_remove(&group, &member).await?
    };
    if !done {
        return Err(ApiError::NotFound);
    }
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Serialize)]
#[serde(untagged)]
enum MemberView<'a> {
    Connection { connection_id: &'a ConnectionId },
    User { user_id: &'a UserId },
}

async fn group_members(
    _: ServiceAuth,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let group = parse_group(&path)?;
    let members = state.engine.group_members(&group).await?;
    let view: Vec<MemberView<'_>> = members
        .iter()
        .map(|m| match m {
            Member::Connection(c) => MemberView::Connection { connection_id: c },
            Member::User(u) => MemberView::User { user_id: u },
        })
        .collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({ "group": group, "members": view })))
}

#[derive(Deserialize)]
struct OnlineQuery {
    online: Option<bool>,
    after: Option<String>,
    limit: Option<usize>,
    /// Only users whose id starts with this.
    prefix: Option<String>,
}

async fn online_users(
    _: ServiceAuth,
    state: web::Data<AppState>,
    query: web::Query<OnlineQuery>,
) -> Result<HttpResponse, ApiError> {
    if query.online != Some(true) {
        return Err(bad(
            "only ?online=true is supported: sessionhub lists online users",
        ));
    }
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(bad(format!("limit must be between 1 and {MAX_PAGE}")));
    }
    let after = match query.after.as_deref().filter(|s| !s.is_empty()) {
        Some(a) => Some(UserId::parse(a).map_err(|e| bad(e.to_string()))?),
        None => None,
    };
    let users = match query.prefix.as_deref().filter(|p| !p.is_empty()) {
        Some(p) => {
            if p.len() > 256 || p.chars().any(char::is_control) {
                return Err(bad(
                    "prefix must be at most 256 characters, none a control character",
                ));
            }
            state
                .engine
                .online_users_matching(p, after.as_ref(), limit)
                .await?
        }
        None => state.engine.online_users(after.as_ref(), limit).await?,
    };
    let next = (users.len() == limit)
        .then(|| users.last().map(|u| u.user_id.clone()))
        .flatten();
    Ok(HttpResponse::Ok().json(serde_json::json!({ "users": users, "next": next })))
}

async fn presence(_: ServiceAuth, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.engine.presence_counts().await?))
}

#[cfg(test)]
mod tests {
    use super::{Publish, json_depth, parse_target};
    use sessionhub_core::Target;

    /// The target of a publish body, or the error text it answers.
    fn target(body: &str) -> Result<Target, String> {
        let req: Publish<'_> = serde_json::from_str(body).map_err(|e| format!("json: {e}"))?;
        parse_target(&req.to).map_err(|e| e.to_string())
    }

    #[test]
    fn targets_are_read_without_a_json_value() {
        let user = |id: &str| Ok(Target::User(sessionhub_core::UserId::parse(id).unwrap()));
        assert_eq!(target(r#"{"to":"all","event":"e"}"#), Ok(Target::All));
        assert_eq!(
            target(r#"{"to":{"user":"alice"},"event":"e"}"#),
            user("alice")
        );
        // Escapes in the key or the id (not borrowed from the body).
        assert_eq!(
            target(r#"{"to":{"us\u0065r":"al\u0069ce"},"event":"e"}"#),
            user("alice")
        );
        assert!(matches!(
            target(r#"{"event":"e","to":{"group":"g1"},"data":[1]}"#),
            Ok(Target::Group(_))
        ));
        // Anything else is refused with the hint, once the body parsed.
        for to in [
            r#""everyone""#,
            "null",
            "1",
            "true",
            "[]",
            r#"["all"]"#,
            "{}",
            r#"{"user":1}"#,
            r#"{"user":{"id":"alice","more":[1,{"x":null}]}}"#,
            r#"{"user":"alice","session":"00"}"#,
            r#"{"user":"alice","user":"bob"}"#,
            r#"{"bogus":"alice"}"#,
        ] {
            let err = target(&format!(r#"{{"to":{to},"event":"e"}}"#)).unwrap_err();
            assert!(err.contains(r#""to" must be "all""#), "{to}: {err}");
        }
        // Ids are still validated, and a missing or malformed `to` is a JSON error.
        assert!(
            target(r#"{"to":{"user":"a b"},"event":"e"}"#)
                .unwrap_err()
                .contains("user_id")
        );
        assert!(
            target(r#"{"event":"e"}"#)
                .unwrap_err()
                .contains("missing field `to`")
        );
        assert!(
            target(r#"{"to":{"user":"alice""#)
                .unwrap_err()
                .starts_with("json: ")
        );
    }

    #[test]
    fn depth_counts_nesting_outside_strings() {
        assert_eq!(json_depth(b"1"), 0);
        assert_eq!(json_depth(br#"{"a":[1,{"b":[]}]}"#), 4);
        assert_eq!(json_depth(br#"["[[[[", "\"{{"]"#), 1);
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(json_depth(deep.as_bytes()), 10_000);
    }
}
