//! The coordinator's gRPC surface without workers: the standard health
//! service answers without a token (for Kubernetes probes) and says
//! NOT_SERVING when the driver loop is stuck; the Stride service refuses a
//! call without the right token.

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

/// A driver loop that stops going round (held by a debug-build hook) turns
/// the health answer to NOT_SERVING within its bound (5 s here); a
/// coordinator that merely waits for workers stays SERVING past it.
#[tokio::test]
async fn health_says_not_serving_while_the_driver_loop_is_stuck() {
    let status_of = |url: String| async move {
        let channel = tonic::transport::Endpoint::from_shared(url)
            .expect("url")
            .connect()
            .await
            .expect("connect");
        let mut client = HealthClient::new(channel);
        client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health check")
            .into_inner()
            .status
    };
    let start = |dir: &std::path::Path, stall: &str| {
        Kill(
            Command::new(env!("CARGO_BIN_EXE_coordinator"))
                .args([
                    "--config",
                    "tiny",
                    "--workers",
                    "1",
                    "--listen",
                    "127.0.0.1:0",
                    "--set",
                    "cluster.heartbeat_interval_s=0.1",
                    "--set",
                    "cluster.startup_timeout_s=120",
                ])
                .current_dir(dir)
                .env("STRIDE_TOKEN", "health-test")
                .env("STRIDE_TEST_STALL_DRIVER_S", stall)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("coordinator starts"),
        )
    };
    let url_of = |dir: &std::path::Path| {
        let addr = dir.join("runs/tiny/coordinator.addr");
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Ok(s) = std::fs::read_to_string(&addr)
                    && !s.trim().is_empty()
                {
                    return s.trim().to_string();
                }
                assert!(Instant::now() < deadline, "no address");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    const SERVING: i32 = 1;
    const NOT_SERVING: i32 = 2;

    let (stuck_dir, idle_dir) = (
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
    );
    let _stuck = start(stuck_dir.path(), "300");
    let _idle = start(idle_dir.path(), "0");
    let (stuck, idle) = (
        url_of(stuck_dir.path()).await,
        url_of(idle_dir.path()).await,
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if status_of(stuck.clone()).await == NOT_SERVING {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a stuck driver must turn health NOT_SERVING"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // By now more than the 5 s bound has passed for the idle one too.
    assert_eq!(
        status_of(idle).await,
        SERVING,
        "waiting for workers is not stuck"
    );
}
