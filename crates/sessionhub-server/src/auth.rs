//! Who is calling: the service API key, the session cookie, and same-origin checks.

use std::future::Future;
use std::pin::Pin;

use std::net::IpAddr;

use actix_web::cookie::{Cookie, SameSite};
use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{FromRequest, HttpRequest, web};
use sessionhub_core::time::now_ms;
use sessionhub_core::{Session, Token};
use subtle::ConstantTimeEq;

use crate::config::Config;
use crate::error::ApiError;
use crate::state::AppState;

/// Name of the session cookie over plain HTTP.
pub const COOKIE_NAME: &str = "sh_session";
/// Name of the session cookie when it is `Secure`: browsers accept a `__Host-`
/// cookie only from HTTPS, with `Path=/` and no `Domain`, so no sibling host or plain
/// HTTP page can plant or overwrite it.
pub const SECURE_COOKIE_NAME: &str = "__Host-sh_session";

/// Proof that the request carries the service API key.
pub struct ServiceAuth;

fn state(req: &HttpRequest) -> Result<&web::Data<AppState>, ApiError> {
    req.app_data::<web::Data<AppState>>()
        .ok_or(ApiError::Internal)
}

impl FromRequest for ServiceAuth {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        std::future::ready(check_api_key(req))
    }
}

fn check_api_key(req: &HttpRequest) -> Result<ServiceAuth, ApiError> {
    let state = state(req)?;
    // No key configured: the service API does not exist, rather than being open.
    let Some(expected) = state.config.api_key.as_deref() else {
        return Err(ApiError::NotFound);
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(ApiError::BadApiKey)?;
    if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        Ok(ServiceAuth)
    } else {
        Err(ApiError::BadApiKey)
    }
}

/// The token in the request's session cookie (`__Host-sh_session`, else
/// `sh_session`), if well-formed.
pub fn cookie_token(req: &HttpRequest) -> Result<Token, ApiError> {
    let cookie = req
        .cookie(SECURE_COOKIE_NAME)
        .or_else(|| req.cookie(COOKIE_NAME))
        .ok_or(ApiError::Unauthorized)?;
    Token::parse(cookie.value()).map_err(|_| ApiError::Unauthorized)
}

/// A trusted proxy: one address, or a range in CIDR notation (`10.0.0.0/8`,
/// `fd00::/8`: proxies whose addresses change, as an ingress controller's pods do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyRange {
    net: IpAddr,
    prefix: u8,
}

impl ProxyRange {
    /// Parses `addr` or `addr/prefix`; the address is taken as its network.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR range"))?;
        let bits = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= bits)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {bits}"))?,
        };
        // An IPv4 range written as IPv6 (`::ffff:10.0.0.0/104`) is that IPv4 range.
        match net.to_canonical() {
            IpAddr::V4(v4) if net.is_ipv6() && prefix >= 96 => Ok(Self {
                net: IpAddr::V4(v4),
                prefix: prefix - 96,
            }),
            _ => Ok(Self { net, prefix }),
        }
    }

    /// Whether `ip` is in the range (an IPv4 address written as IPv6,
    /// `::ffff:a.b.c.d`, as a node listening on `[::]` sees IPv4 peers, counts as
    /// the IPv4 one).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

fn trusted(ip: IpAddr, proxies: &[ProxyRange]) -> bool {
    proxies.iter().any(|p| p.contains(ip))
}

fn from_trusted_proxy(req: &HttpRequest, config: &Config) -> bool {
    req.peer_addr()
        .is_some_and(|a| trusted(a.ip(), &config.sessions.trusted_proxies))
}

/// Whether the client reached us over TLS: always with `SESSIONHUB_COOKIE_SECURE`,
/// otherwise when a trusted proxy says `X-Forwarded-Proto: https`.
pub fn is_secure(req: &HttpRequest, config: &Config) -> bool {
    config.sessions.cookie_secure
        || (from_trusted_proxy(req, config)
            && req
                .headers()
                .get("x-forwarded-proto")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.eq_ignore_ascii_case("https")))
}

/// The client's address: the peer, or, behind a trusted proxy, the last address in
/// `X-Forwarded-For` that is not itself a trusted proxy.
pub fn client_ip(req: &HttpRequest, config: &Config) -> Option<IpAddr> {
    let peer = req.peer_addr()?.ip();
    if !from_trusted_proxy(req, config) {
        return Some(peer);
    }
    let forwarded = req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    Some(forwarded_client(
        peer,
        forwarded,
        &config.sessions.trusted_proxies,
    ))
}

/// The client's address in a trusted proxy's `X-Forwarded-For`: walking from the
/// right (the hop nearest us), the first address that is not a trusted proxy. An
/// entry may carry a port (`203.0.113.9:51234`, `[2001:db8::1]:443`: some load
/// balancers write one). An entry that is no address ends the walk, and the peer is
/// the answer: what lies left of it was not written by a proxy we trust, and
/// skipping it would let the client name its own address.
fn forwarded_client(peer: IpAddr, forwarded: &str, proxies: &[ProxyRange]) -> IpAddr {
    for entry in forwarded.rsplit(',') {
        let entry = entry.trim();
        let Some(ip) = entry
            .parse::<IpAddr>()
            .ok()
            .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
        else {
            break;
        };
        if !trusted(ip, proxies) {
            return ip.to_canonical();
        }
    }
    peer
}

/// The session cookie for `token`: HttpOnly, SameSite=Lax, Path=/, no expiry (it
/// lives with the browser session; the server enforces the lifetimes), and `Secure`
/// with the `__Host-` name when the client came over TLS.
pub fn session_cookie(token: String, secure: bool) -> Cookie<'static> {
    let name = if secure {
        SECURE_COOKIE_NAME
    } else {
        COOKIE_NAME
    };
    Cookie::build(name, token)
        .path("/")
        .http_only(true)
        .same_site(SameSite::Lax)
        .secure(secure)
        .finish()
}

/// Cookies that remove the session cookie, under both names.
pub fn removal_cookies() -> [Cookie<'static>; 2] {
    let mut plain = session_cookie(String::new(), false);
    plain.make_removal();
    let mut secure = session_cookie(String::new(), true);
    secure.make_removal();
    [plain, secure]
}

/// A request authenticated by its session cookie. A state-changing one (any method
/// but GET, HEAD, OPTIONS and TRACE) must also pass [`check_same_origin`], checked
/// first: refused, it has no effect at all, not even the session activity the
/// authentication records.
pub struct CookieSession {
    /// The caller's session (no connections filled in).
    pub session: Session,
}

impl FromRequest for CookieSession {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let state = state(&req)?;
            if !req.method().is_safe() {
                check_same_origin(&req, &state.config)?;
            }
            let token = cookie_token(&req)?;
            let session = state
                .engine
                .authenticate(&token)
                .await?
                .ok_or(ApiError::Unauthorized)?;
            touch_if_due(state, &session).await;
            Ok(CookieSession { session })
        })
    }
}

/// How long after its last recorded activity a session's activity is recorded
/// again: the refresh interval, or half the session's own idle timeout if that is
/// shorter (a session given a 30 s idle timeout must not idle out while in use
/// because the node writes activity once a minute).
pub fn refresh_ms(state: &AppState, session: &Session) -> i64 {
    let refresh = state.config.sessions.idle_refresh.as_millis() as i64;
    refresh.min(session.idle_ms() / 2)
}

/// Records activity for the idle timeout, at most once per refresh interval (see
/// [`refresh_ms`]), so that Redis is not written on every request. False if it was
/// due and could not be recorded.
pub async fn touch_if_due(state: &AppState, session: &Session) -> bool {
    if now_ms() - session.last_seen_at < refresh_ms(state, session) {
        return true;
    }
    match state.engine.touch(&session.session_id).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "could not record session activity");
            false
        }
    }
}

/// Whether the request's `Origin` (if any) may act: the node's own origin, or one of
/// the configured ones. Requests without `Origin` come from non-browser clients,
/// which no cross-site page can drive, and are allowed.
pub fn origin_allowed(req: &HttpRequest, config: &Config) -> bool {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    if config.allowed_origins.iter().any(|o| o == origin) {
        return true;
    }
    let Some(host) = request_host(req, config) else {
        return false;
    };
    origin
        .split_once("://")
        .is_some_and(|(_, origin_host)| origin_host.eq_ignore_ascii_case(host))
}

/// The host (with port) the client asked for: the `Host` header, or, from a trusted
/// proxy only, its `X-Forwarded-Host`. `Forwarded` and `X-Forwarded-Host` from
/// anyone else are ignored: believing them would let any client pass the
/// same-origin check with a foreign `Origin`.
pub fn request_host<'a>(req: &'a HttpRequest, config: &Config) -> Option<&'a str> {
    let header = |name| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    if from_trusted_proxy(req, config)
        && let Some(forwarded) = header("x-forwarded-host")
    {
        // A chain of proxies appends: the first is what the client asked for.
        return forwarded.split(',').next().map(str::trim);
    }
    header(header::HOST.as_str()).or_else(|| req.uri().authority().map(|a| a.as_str()))
}

/// Refuses cross-site requests to state-changing cookie calls: the browser's
/// `Sec-Fetch-Site` must not say cross-site, and `Origin` must be allowed.
pub fn check_same_origin(req: &HttpRequest, config: &Config) -> Result<(), ApiError> {
    let site = req
        .headers()
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok());
    if matches!(site, Some("cross-site")) {
        return Err(ApiError::Forbidden("cross-site request refused"));
    }
    if !origin_allowed(req, config) {
        return Err(ApiError::Forbidden("origin not allowed"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{ProxyRange, forwarded_client};
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn the_client_is_the_first_untrusted_hop_from_the_right() {
        let peer = ip("10.0.0.2");
        let trusted = [
            ProxyRange::parse("10.0.0.2").unwrap(),
            ProxyRange::parse("10.0.0.3").unwrap(),
        ];
        let client = |xff| forwarded_client(peer, xff, &trusted);
        assert_eq!(client("203.0.113.9"), ip("203.0.113.9"));
        // What the client wrote itself is left of its real address.
        assert_eq!(client("6.6.6.6, 203.0.113.9"), ip("203.0.113.9"));
        assert_eq!(client("6.6.6.6, 203.0.113.9, 10.0.0.3"), ip("203.0.113.9"));
        // A port, as some load balancers write it.
        assert_eq!(client("6.6.6.6, 203.0.113.9:51234"), ip("203.0.113.9"));
        assert_eq!(client("[2001:db8::1]:443"), ip("2001:db8::1"));
        assert_eq!(client("2001:db8::1"), ip("2001:db8::1"));
        // An entry that is no address ends the walk: nothing left of it is believed.
        assert_eq!(client("6.6.6.6, unknown"), peer);
        assert_eq!(client("6.6.6.6, garbage, 10.0.0.3"), peer);
        assert_eq!(client(""), peer);
        assert_eq!(client("10.0.0.3"), peer);
    }

    #[test]
    fn proxy_ranges_hold_their_addresses_only() {
        let r = |s: &str| ProxyRange::parse(s).unwrap();
        assert!(r("10.0.0.0/8").contains(ip("10.200.3.4")));
        assert!(!r("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(
            r("10.1.2.3/8").contains(ip("10.9.9.9")),
            "the network of the address"
        );
        assert!(r("192.168.1.7").contains(ip("192.168.1.7")));
        assert!(!r("192.168.1.7").contains(ip("192.168.1.8")));
        assert!(r("0.0.0.0/0").contains(ip("203.0.113.9")));
        assert!(!r("0.0.0.0/0").contains(ip("2001:db8::1")));
        assert!(r("fd00::/8").contains(ip("fd12:3456::1")));
        assert!(!r("fd00::/8").contains(ip("fe80::1")));
        // An IPv4 peer as a dual-stack listener sees it.
        assert!(r("127.0.0.1").contains(ip("::ffff:127.0.0.1")));
        assert!(r("::ffff:10.0.0.0/104").contains(ip("10.3.3.3")));
        for bad in [
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0.0/",
            "10.0.0/8",
            "nginx",
            "/8",
        ] {
            assert!(ProxyRange::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_client_behind_a_proxy_range_is_found() {
        let peer = ip("10.244.1.7");
        let trusted = [ProxyRange::parse("10.244.0.0/16").unwrap()];
        let client = |xff| forwarded_client(peer, xff, &trusted);
        assert_eq!(client("203.0.113.9, 10.244.2.9"), ip("203.0.113.9"));
        assert_eq!(client("::ffff:203.0.113.9"), ip("203.0.113.9"));
    }
}
