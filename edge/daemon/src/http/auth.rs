//! Bearer-token checks in front of the API (`http.auth_token_file`,
//! `http.metrics_token_file`).
//!
//! A [`Guard`] holds the tokens a group of routes accepts; [`require`] is
//! its middleware (`route_layer`), so it runs before a handler reads the
//! body: a refused write stores nothing (the body is read and dropped,
//! bounded, so a client still sending it reads the 401). Tokens are compared in constant
//! time (`subtle`); only the length of a wrong token can show in timing.
//! A refusal is 401 with `WWW-Authenticate: Bearer` and the usual JSON
//! error. Nothing here logs a token or a query string (the status page's
//! `/?token=` handoff carries one): refusals are logged with the path only.

use super::ApiError;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use dai_config::BearerToken;
use std::net::SocketAddr;
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// The tokens one group of routes accepts (any of them).
#[derive(Debug)]
pub struct Guard {
    tokens: Vec<BearerToken>,
}

impl Guard {
    /// A guard accepting any of `tokens`; `None` when there is none (the
    /// routes stay open).
    pub fn new<'a>(tokens: impl IntoIterator<Item = &'a BearerToken>) -> Option<Arc<Guard>> {
        let tokens: Vec<BearerToken> = tokens.into_iter().cloned().collect();
        (!tokens.is_empty()).then(|| Arc::new(Guard { tokens }))
    }

    /// Whether `presented` is one of the tokens. Every token is compared,
    /// each in constant time for its length.
    fn accepts(&self, presented: &[u8]) -> bool {
        self.tokens
            .iter()
            .fold(subtle::Choice::from(0), |any, t| {
                any | t.expose().as_bytes().ct_eq(presented)
            })
            .into()
    }
}

/// What an `Authorization` header holds, as far as the guard cares.
#[derive(Debug, PartialEq, Eq)]
enum Presented<'a> {
    Missing,
    NotBearer,
    Bearer(&'a [u8]),
}

fn presented(req: &Request) -> Presented<'_> {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return Presented::Missing;
    };
    bearer(value.as_bytes())
}

/// `Bearer TOKEN`, the scheme matched without regard to case (RFC 9110).
fn bearer(value: &[u8]) -> Presented<'_> {
    match value.split_at_checked(7) {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case(b"bearer ") => {
            Presented::Bearer(rest.trim_ascii())
        }
        _ => Presented::NotBearer,
    }
}

/// Middleware: pass the request on when it carries one of the guard's
/// tokens, else answer 401.
pub async fn require(State(guard): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    let why = match presented(&req) {
        Presented::Bearer(t) if guard.accepts(t) => return next.run(req).await,
        Presented::Bearer(_) => "the bearer token is not valid",
        Presented::NotBearer => "the Authorization header is not `Bearer TOKEN`",
        Presented::Missing => {
            "this endpoint needs `Authorization: Bearer TOKEN` (http.auth_token_file)"
        }
    };
    tracing::debug!(method = %req.method(), path = %req.uri().path(), why, "request refused");
    super::oversize::discard(req.into_body(), super::oversize::REFUSED_DRAIN).await;
    unauthorized(why)
}

fn unauthorized(why: &str) -> Response {
    let mut resp =
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", why.to_string()).into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"dai-edge\""),
    );
    resp
}

/// Say at start how the API is protected: a warning when it is open beyond
/// loopback, and for each token file that others (or a group the daemon
/// is not in) may read.
pub fn log_at_start(http: &dai_config::HttpConfig, addr: Option<SocketAddr>) {
    let open_beyond_loopback = addr.is_some_and(|a| !a.ip().to_canonical().is_loopback());
    match &http.tokens.api {
        Some(_) => tracing::info!("HTTP API requires a bearer token (http.auth_token_file)"),
        None if open_beyond_loopback => tracing::warn!(
            "HTTP API on a non-loopback address WITHOUT authentication \
             (http.allow_unauthenticated: true): anyone who reaches it can run, \
             train and read models"
        ),
        None => {}
    }
    for (key, path, token) in [
        (
            "http.auth_token_file",
            &http.auth_token_file,
            &http.tokens.api,
        ),
        (
            "http.metrics_token_file",
            &http.metrics_token_file,
            &http.tokens.metrics,
        ),
    ] {
        if let Some(mode) = token.as_ref().and_then(BearerToken::loose_mode) {
            tracing::warn!(
                "{key} {} is readable by others or by a group this process is not in \
                 (mode {mode:03o}); chmod 600 it",
                path.display()
            );
        }
    }
}

/// Whether serving on `addr` without a token would break the rule the
/// config enforces (a non-loopback address needs a token unless
/// `http.allow_unauthenticated`). `serve` checks the listener it is given.
pub fn refused(http: &dai_config::HttpConfig, addr: SocketAddr) -> bool {
    http.tokens.api.is_none()
        && !http.allow_unauthenticated
        && !addr.ip().to_canonical().is_loopback()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(s: &str) -> BearerToken {
        BearerToken::new(s).expect("token")
    }

    #[test]
    fn the_scheme_is_case_insensitive_and_the_token_trimmed() {
        assert_eq!(bearer(b"Bearer abc"), Presented::Bearer(b"abc"));
        assert_eq!(bearer(b"bEaReR   abc "), Presented::Bearer(b"abc"));
        assert_eq!(bearer(b"Basic YWxhZGRpbjpvcGVu"), Presented::NotBearer);
        assert_eq!(bearer(b"Bearer"), Presented::NotBearer);
        assert_eq!(bearer(b""), Presented::NotBearer);
    }

    #[test]
    fn a_guard_accepts_exactly_its_tokens() {
        let (a, b) = (token("aaaaaaaaaaaaaaaa1"), token("bbbbbbbbbbbbbbbb2"));
        assert!(Guard::new([]).is_none(), "no token, no guard");
        let g = Guard::new([&a, &b]).expect("guard");
        assert!(g.accepts(b"aaaaaaaaaaaaaaaa1"));
        assert!(g.accepts(b"bbbbbbbbbbbbbbbb2"));
        for wrong in [
            &b"aaaaaaaaaaaaaaaa"[..],
            b"aaaaaaaaaaaaaaaa12",
            b"aaaaaaaaaaaaaaaa2",
            b"",
        ] {
            assert!(!g.accepts(wrong), "{:?}", String::from_utf8_lossy(wrong));
        }
    }

    #[test]
    fn only_an_open_api_beyond_loopback_is_refused() {
        let mut h = dai_config::HttpConfig::default();
        let public: SocketAddr = "0.0.0.0:80".parse().expect("addr");
        let local: SocketAddr = "[::1]:80".parse().expect("addr");
        assert!(refused(&h, public));
        assert!(!refused(&h, local));
        h.allow_unauthenticated = true;
        assert!(!refused(&h, public));
        h.allow_unauthenticated = false;
        h.tokens.api = Some(token("cccccccccccccccc3"));
        assert!(!refused(&h, public));
    }
}
