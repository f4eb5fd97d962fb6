//! Static files: the browser client (always, at a stable path) and the demo app
//! (with `SESSIONHUB_DEMO`). They are compiled into the binary from the repository's
//! `web/` folder, so a node needs no files beside it.

use actix_web::{HttpResponse, web};

/// The browser client, an ES module.
pub const CLIENT_JS: &str = include_str!("../../../web/sessionhub.js");
const DEMO_HTML: &str = include_str!("../../../web/demo/index.html");
const DEMO_CSS: &str = include_str!("../../../web/demo/demo.css");
const DEMO_JS: &str = include_str!("../../../web/demo/demo.js");
const FAVICON_SVG: &str = include_str!("../../../web/demo/favicon.svg");
const ADMIN_HTML: &str = include_str!("../../../web/admin/index.html");
const ADMIN_CSS: &str = include_str!("../../../web/admin/admin.css");
const ADMIN_JS: &str = include_str!("../../../web/admin/admin.js");

/// The admin console's policy: its own scripts and styles only, no framing (it
/// holds the service key), nothing sent elsewhere.
const ADMIN_CSP: &str = "default-src 'self'; connect-src 'self'; img-src 'self' data:; \
    frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

fn asset(content_type: &'static str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .body(body)
}

/// The client module: `GET /sessionhub.js`.
pub fn client_routes(cfg: &mut web::ServiceConfig) {
    cfg.route(
        "/sessionhub.js",
        web::get().to(|| async { asset("text/javascript; charset=utf-8", CLIENT_JS) }),
    );
}

/// The demo app's pages: `/`, `/demo/demo.css`, `/demo/demo.js`, its icon at
/// `/favicon.svg`, and `/favicon.ico` answered 204 (browsers that ask for it anyway
/// get no icon and no 404).
pub fn demo_routes(cfg: &mut web::ServiceConfig) {
    cfg.route(
        "/",
        web::get().to(|| async {
            let mut res = asset("text/html; charset=utf-8", DEMO_HTML);
            res.headers_mut().insert(
                actix_web::http::header::CONTENT_SECURITY_POLICY,
                actix_web::http::header::HeaderValue::from_static(
                    "default-src 'self'; connect-src 'self' ws: wss:; frame-ancestors 'none'",
                ),
            );
            res
        }),
    )
    .route(
        "/demo/demo.css",
        web::get().to(|| async { asset("text/css; charset=utf-8", DEMO_CSS) }),
    )
    .route(
        "/demo/demo.js",
        web::get().to(|| async { asset("text/javascript; charset=utf-8", DEMO_JS) }),
    )
    .route(
        "/favicon.svg",
        web::get().to(|| async { asset("image/svg+xml", FAVICON_SVG) }),
    )
    .route(
        "/favicon.ico",
        web::get().to(|| async { HttpResponse::NoContent().finish() }),
    );
}

/// The admin console: `/admin` and its assets. The page asks for the service API key
/// and calls the service API with it; it is never put in a URL or a cookie.
pub fn admin_routes(cfg: &mut web::ServiceConfig) {
    let guarded = |content_type: &'static str, body: &'static str| {
        let mut res = asset(content_type, body);
        let h = res.headers_mut();
        h.insert(
            actix_web::http::header::CONTENT_SECURITY_POLICY,
            actix_web::http::header::HeaderValue::from_static(ADMIN_CSP),
        );
        h.insert(
            actix_web::http::header::X_FRAME_OPTIONS,
            actix_web::http::header::HeaderValue::from_static("DENY"),
        );
        h.insert(
            actix_web::http::header::REFERRER_POLICY,
            actix_web::http::header::HeaderValue::from_static("no-referrer"),
        );
        res
    };
    cfg.route(
        "/admin",
        web::get().to(move || async move { guarded("text/html; charset=utf-8", ADMIN_HTML) }),
    )
    .route(
        "/admin/admin.css",
        web::get().to(move || async move { guarded("text/css; charset=utf-8", ADMIN_CSS) }),
    )
    .route(
        "/admin/admin.js",
        web::get().to(move || async move { guarded("text/javascript; charset=utf-8", ADMIN_JS) }),
    )
    .route(
        "/admin/favicon.svg",
        web::get().to(|| async { asset("image/svg+xml", FAVICON_SVG) }),
    );
}
