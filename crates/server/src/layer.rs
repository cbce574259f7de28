//! Authentication as a layer: each of the clean room's gRPC services is wrapped so that every
//! call is authenticated, and held to its principal's limits, before the service sees it. An
//! admitted call carries its context ([`Call`]) to the handler; a refused one never reaches it.
//! Health and reflection are not wrapped: they say nothing about data.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::Service;
use tonic::codegen::http::{Request, Response};
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::context::Call;
use crate::state::App;

/// A gRPC service behind authentication.
#[derive(Clone)]
pub struct Authenticated<S> {
    app: Arc<App>,
    inner: S,
}

impl<S> Authenticated<S> {
    /// Wraps `inner`.
    pub fn new(app: Arc<App>, inner: S) -> Self {
        Self { app, inner }
    }
}

impl<S: NamedService> NamedService for Authenticated<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<Request<Body>> for Authenticated<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        // The service made ready serves this call; a fresh clone waits for the next one.
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        let app = Arc::clone(&self.app);
        Box::pin(async move {
            let (mut parts, body) = request.into_parts();
            let method = parts.uri.path().rsplit('/').next().unwrap_or_default();
            let presented = parts
                .extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|info| info.peer_certs())
                .and_then(|certs| certs.first().map(|c| crate::tls::cert_sha256(c)));
            match app.open_call(method, &parts.headers, presented).await {
                Ok(call) => {
                    parts.extensions.insert::<Call>(call);
                    inner.call(Request::from_parts(parts, body)).await
                }
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}
