//! The review page: a browser front end for legal reviewers, served on its own port next to gRPC
//! (HTTPS when TLS is configured, loopback only otherwise). Its JSON routes call the very `LegalService` handlers that gRPC clients call, with the
//! caller's bearer token passed through, so the page can do nothing a gRPC client of the same role
//! could not, and every approval it makes is audited the same way. It shows no row-level data:
//! there is none to show.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use cleanroom_proto::v1::legal_service_server::LegalService;
use cleanroom_proto::v1::{
    ApproveQueryRequest, ListAllowListRequest, ListAuditRequest, ListReceiptsRequest,
    RejectQueryRequest,
};
use serde::Deserialize;

use crate::legal::LegalApi;
use crate::state::App;
use crate::{Error, Result};

/// The page itself: one self-contained file, no external resources.
const PAGE: &str = include_str!("review_page.html");

/// The page only talks to its own origin and runs only its own inline code.
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                   connect-src 'self'; img-src data:; form-action 'none'; frame-ancestors 'none'; \
                   base-uri 'none'";

/// Serves the review page on `listener` (plain TCP on loopback, or [`crate::tls::TlsListener`])
/// until `shutdown` resolves.
pub async fn serve<L>(
    app: Arc<App>,
    listener: L,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let api = Arc::new(Page {
        legal: LegalApi::new(Arc::clone(&app)),
        app,
    });
    let router = Router::new()
        .route("/", get(page))
        .route("/api/allowlist", get(allowlist))
        .route("/api/audit", get(audit))
        .route("/api/receipts", get(receipts))
        .route("/api/receipts.csv", get(receipts_csv))
        .route("/api/queries/{id}/approve", post(approve))
        .route("/api/queries/{id}/reject", post(reject))
        .route("/metrics", get(metrics))
        .with_state(api);
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| Error::Internal(format!("review page: {e}")))
}

fn hardened(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn page() -> Response {
    hardened(([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE).into_response())
}

/// A request to a `LegalService` handler, authenticated from the browser's `Authorization`
/// header exactly as the gRPC layer authenticates a call: the same credentials, limits and
/// per-call context. A refused call is answered here and never reaches the handler.
async fn authenticated<T>(
    api: &Page,
    method: &str,
    headers: &HeaderMap,
    message: T,
) -> std::result::Result<tonic::Request<T>, Response> {
    match api.app.open_call(method, headers, None).await {
        Ok(call) => {
            let mut request = tonic::Request::new(message);
            request.extensions_mut().insert(call);
            Ok(request)
        }
        Err(status) => Err(json::<()>(Err(status))),
    }
}

/// What the page's routes share.
struct Page {
    app: Arc<App>,
    legal: LegalApi,
}

/// The handler's answer as JSON, or its status as an HTTP error with the same reason.
fn json<T: serde::Serialize>(
    result: std::result::Result<tonic::Response<T>, tonic::Status>,
) -> Response {
    let response = match result {
        Ok(response) => axum::Json(response.into_inner()).into_response(),
        Err(status) => {
            let code = StatusCode::from_u16(crate::status::http_code(status.code()))
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            (
                code,
                axum::Json(serde_json::json!({
                    "error": status.message(),
                    "code": format!("{:?}", status.code()),
                })),
            )
                .into_response()
        }
    };
    hardened(response)
}

async fn allowlist(State(api): State<Arc<Page>>, headers: HeaderMap) -> Response {
    match authenticated(&api, "ListAllowList", &headers, ListAllowListRequest {}).await {
        Ok(request) => json(api.legal.list_allow_list(request).await),
        Err(refused) => refused,
    }
}

/// The service's metrics (Prometheus text), for the legal and analyst roles: authenticated like
/// the page's API, refused to partners. A scrape reads state; it is not audited.
async fn metrics(State(api): State<Arc<Page>>, headers: HeaderMap) -> Response {
    const METHOD: &str = "Metrics";
    let call = match api.app.open_call(METHOD, &headers, None).await {
        Ok(call) => call,
        Err(status) => return json::<()>(Err(status)),
    };
    if let Err(e) = crate::legal::reviewer(&call, METHOD, false) {
        return json::<()>(Err(crate::status::to_status(&e, "-")));
    }
    match api.app.scrape() {
        Ok(text) => {
            hardened(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
        }
        Err(e) => json::<()>(Err(crate::status::to_status(&e, "unrecorded"))),
    }
}

#[derive(Deserialize)]
struct AuditFilter {
    #[serde(default)]
    partner: String,
    #[serde(default)]
    query: String,
    #[serde(default)]
    limit: u32,
}

async fn audit(
    State(api): State<Arc<Page>>,
    headers: HeaderMap,
    Query(filter): Query<AuditFilter>,
) -> Response {
    let request = ListAuditRequest {
        partner: filter.partner,
        query_id: filter.query,
        limit: filter.limit,
    };
    match authenticated(&api, "ListAudit", &headers, request).await {
        Ok(request) => json(api.legal.list_audit(request).await),
        Err(refused) => refused,
    }
}

/// The records of receipt and the partners' declarations, for the page.
async fn receipts(State(api): State<Arc<Page>>, headers: HeaderMap) -> Response {
    let request = ListReceiptsRequest::default();
    match authenticated(&api, "ListReceipts", &headers, request).await {
        Ok(request) => json(api.legal.list_receipts(request).await),
        Err(refused) => refused,
    }
}

/// The records of receipt as a CSV file to download: the same call as [`receipts`], so the
/// same roles and the same audit record.
async fn receipts_csv(State(api): State<Arc<Page>>, headers: HeaderMap) -> Response {
    let request = ListReceiptsRequest::default();
    let request = match authenticated(&api, "ListReceipts", &headers, request).await {
        Ok(request) => request,
        Err(refused) => return refused,
    };
    match api.legal.list_receipts(request).await {
        Ok(page) => hardened(
            (
                [
                    (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
                    (
                        header::CONTENT_DISPOSITION,
                        "attachment; filename=\"receipts.csv\"",
                    ),
                ],
                crate::disclosure::csv(&page.into_inner().receipts),
            )
                .into_response(),
        ),
        Err(status) => json::<()>(Err(status)),
    }
}

#[derive(Deserialize)]
struct ApproveBody {
    content_sha256: String,
    #[serde(default)]
    expires: Option<String>,
    #[serde(default)]
    note: String,
}

#[derive(Deserialize)]
struct RejectBody {
    content_sha256: String,
    #[serde(default)]
    reason: String,
}

/// A JSON body, or a 400 that says what is wrong with it.
type Body<T> = std::result::Result<axum::Json<T>, axum::extract::rejection::JsonRejection>;

fn bad_body(rejection: axum::extract::rejection::JsonRejection) -> Response {
    hardened(
        (
            StatusCode::BAD_REQUEST,
            axum::Json(serde_json::json!({
                "error": format!("the request body is not what the API expects: {}", rejection.body_text()),
                "code": "InvalidArgument",
            })),
        )
            .into_response(),
    )
}

async fn approve(
    State(api): State<Arc<Page>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body<ApproveBody>,
) -> Response {
    let body = match body {
        Ok(axum::Json(body)) => body,
        Err(rejection) => return bad_body(rejection),
    };
    let request = ApproveQueryRequest {
        query_id: id,
        content_sha256: body.content_sha256,
        expires: body.expires,
        note: body.note,
    };
    match authenticated(&api, "ApproveQuery", &headers, request).await {
        Ok(request) => json(api.legal.approve_query(request).await),
        Err(refused) => refused,
    }
}

async fn reject(
    State(api): State<Arc<Page>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body<RejectBody>,
) -> Response {
    let body = match body {
        Ok(axum::Json(body)) => body,
        Err(rejection) => return bad_body(rejection),
    };
    let request = RejectQueryRequest {
        query_id: id,
        content_sha256: body.content_sha256,
        reason: body.reason,
    };
    match authenticated(&api, "RejectQuery", &headers, request).await {
        Ok(request) => json(api.legal.reject_query(request).await),
        Err(refused) => refused,
    }
}
