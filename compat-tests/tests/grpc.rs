//! gRPC over h2c on both backends: tonic's health service (`tonic-health`), its `Routes`
//! turned into an axum Router and served by hop with default settings, called with tonic's
//! own client (a `Channel` over HTTP/2 with prior knowledge): a unary `Check`, and a
//! server-streaming `Watch` that receives the initial status and then each change.

use std::future::Future;
use std::time::Duration;

use compat_tests::{backend_tests, start};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const WAIT: Duration = Duration::from_secs(30);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {WAIT:?}: {what}"),
    }
}

fn check(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.to_owned(),
    }
}

/// Starts the health service on `backend`; its reporter, the server and a connected client.
async fn health(
    backend: compat_tests::Backend,
) -> (
    tonic_health::server::HealthReporter,
    compat_tests::TestServer,
    HealthClient<Channel>,
) {
    let (reporter, service) = tonic_health::server::health_reporter();
    let app = tonic::service::Routes::new(service).into_axum_router();
    let srv = start(backend, app, |b| b);
    let channel = within(
        "connect",
        Endpoint::from_shared(srv.url("")).unwrap().connect(),
    )
    .await
    .unwrap_or_else(|e| panic!("[{backend}] connect: {e}"));
    (reporter, srv, HealthClient::new(channel))
}

backend_tests! {
    /// Unary `Check`: the server's overall status, a service set serving and then not serving,
    /// and an unknown service (`NOT_FOUND`).
    async fn health_check(backend) {
        let (reporter, srv, mut client) = health(backend).await;
        let status = |res: tonic::Response<tonic_health::pb::HealthCheckResponse>| {
            ServingStatus::try_from(res.into_inner().status).unwrap()
        };
        let res = within("Check", client.check(check(""))).await.unwrap();
        assert_eq!(status(res), ServingStatus::Serving, "[{backend}]");

        reporter
            .set_service_status("svc", tonic_health::ServingStatus::Serving)
            .await;
        let res = within("Check", client.check(check("svc"))).await.unwrap();
        assert_eq!(status(res), ServingStatus::Serving, "[{backend}]");
        reporter
            .set_service_status("svc", tonic_health::ServingStatus::NotServing)
            .await;
        let res = within("Check", client.check(check("svc"))).await.unwrap();
        assert_eq!(status(res), ServingStatus::NotServing, "[{backend}]");

        let err = within("Check", client.check(check("nope")))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "[{backend}] {err:?}");

        let stats = srv.handle.stats();
        assert_eq!(stats.http2_connections, 1, "[{backend}] {stats:?}");
        assert!(stats.http2_streams >= 4, "[{backend}] {stats:?}");
    }

    /// Server-streaming `Watch`: the initial status, then each change the reporter makes, on
    /// a stream that stays open between them; unary calls share the connection meanwhile.
    async fn health_watch(backend) {
        let (reporter, srv, mut client) = health(backend).await;
        reporter
            .set_service_status("svc", tonic_health::ServingStatus::Serving)
            .await;
        let mut watch = within("Watch", client.watch(check("svc")))
            .await
            .unwrap()
            .into_inner();
        let mut next = async || {
            let msg = within("a Watch update", watch.message())
                .await
                .unwrap_or_else(|e| panic!("[{backend}] Watch: {e}"))
                .unwrap_or_else(|| panic!("[{backend}] Watch ended"));
            ServingStatus::try_from(msg.status).unwrap()
        };
        assert_eq!(next().await, ServingStatus::Serving, "[{backend}]");
        for (set, expected) in [
            (
                tonic_health::ServingStatus::NotServing,
                ServingStatus::NotServing,
            ),
            (tonic_health::ServingStatus::Serving, ServingStatus::Serving),
        ] {
            // The stream stays open while nothing changes.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let res = within("Check", client.check(check(""))).await.unwrap();
            assert_eq!(res.into_inner().status, ServingStatus::Serving as i32);
            reporter.set_service_status("svc", set).await;
            assert_eq!(next().await, expected, "[{backend}]");
        }
        let stats = srv.handle.stats();
        assert_eq!(stats.http2_connections, 1, "[{backend}] {stats:?}");
    }
}
