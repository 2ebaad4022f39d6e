//! The coordinator's gRPC surface without workers: the standard health
//! service answers without a token (for Kubernetes probes); the Stride
//! service refuses a call without the right token.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use stride_proto::v1::coordinator_client::CoordinatorClient;
use stride_proto::v1::{RegisterRequest, StatusRequest};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A coordinator waiting for its one worker, and the URL it listens on.
async fn start_coordinator(dir: &std::path::Path, token: &str) -> (Kill, String) {
    let coord = Kill(
        Command::new(env!("CARGO_BIN_EXE_coordinator"))
            .args([
                "--config",
                "tiny",
                "--workers",
                "1",
                "--listen",
                "127.0.0.1:0",
            ])
            .current_dir(dir)
            .env("STRIDE_TOKEN", token)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("coordinator starts"),
    );
    let addr_file = dir.join("runs/tiny/coordinator.addr");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(s) = std::fs::read_to_string(&addr_file)
            && !s.trim().is_empty()
        {
            return (coord, s.trim().to_string());
        }
        assert!(
            Instant::now() < deadline,
            "the coordinator never wrote its address"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn health_is_open_and_the_job_service_needs_the_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_coord, url) = start_coordinator(dir.path(), "health-test").await;

    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel);
    for service in ["", "stride.v1.Coordinator"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check")
            .into_inner();
        assert_eq!(r.status, 1, "{service:?} must be SERVING");
    }

    let mut client = CoordinatorClient::connect(url.clone())
        .await
        .expect("connect");
    let e = client.status(StatusRequest {}).await.expect_err("no token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);

    let channel = tonic::transport::Endpoint::from_shared(url)
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut client = CoordinatorClient::with_interceptor(channel, |mut req: tonic::Request<()>| {
        req.metadata_mut().insert(
            "authorization",
            "Bearer health-test".parse().expect("ascii"),
        );
        Ok(req)
    });
    let s = client
        .status(StatusRequest {})
        .await
        .expect("status with the token")
        .into_inner();
    assert_eq!(s.step, 0);
}

#[tokio::test]
async fn another_version_and_oversized_messages_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_coord, url) = start_coordinator(dir.path(), "v").await;
    let channel = tonic::transport::Endpoint::from_shared(url)
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut client = CoordinatorClient::with_interceptor(channel, |mut req: tonic::Request<()>| {
        req.metadata_mut()
            .insert("authorization", "Bearer v".parse().expect("ascii"));
        Ok(req)
    })
    .max_encoding_message_size(64 << 20);
    let e = client
        .register(RegisterRequest {
            version: "0.0.1-old".into(),
            protocol_version: 1,
            ..Default::default()
        })
        .await
        .expect_err("another version");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(
        e.message().contains("0.0.1-old") && e.message().contains(env!("CARGO_PKG_VERSION")),
        "{}",
        e.message()
    );
    // 20 MiB is above the 16 MiB bound of any message.
    let e = client
        .register(RegisterRequest {
            version: env!("CARGO_PKG_VERSION").into(),
            protocol_version: 1,
            host: "x".repeat(20 << 20),
            ..Default::default()
        })
        .await
        .expect_err("too large");
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");
}
