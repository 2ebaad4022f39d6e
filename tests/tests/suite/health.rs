//! The coordinator's gRPC surface without workers: the standard health
//! service answers without a token (for Kubernetes probes) and says
//! NOT_SERVING when the driver loop is stuck; the Stride service refuses a
//! call without the right token, from another version, or too large.

use std::path::Path;
use std::time::{Duration, Instant};

use stride_job::test_hooks::Hook;
use stride_proto::v1::coordinator_client::CoordinatorClient;
use stride_proto::v1::{RegisterRequest, StatusRequest};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::common::{Proc, beside_others, coordinator_url, spawn_env};

/// Runs an async test (tonic clients) in its turn beside the others.
fn in_turn(test: impl Future<Output = ()>) {
    let _turn = beside_others();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(test);
}

/// A coordinator in `dir` waiting for its one worker, with the job token
/// `token` and `extra` flags, and the URL it listens on.
fn start_coordinator(
    dir: &Path,
    token: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Proc, String) {
    let mut args = vec![
        "--config",
        "tiny",
        "--workers",
        "1",
        "--listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let mut env = env.to_vec();
    env.push(("STRIDE_TOKEN", token));
    let mut coord = spawn_env("coordinator", &args, dir, "coordinator.out", &env);
    let url = coordinator_url(dir, "tiny", &mut coord);
    (coord, url)
}

#[test]
fn health_is_open_and_the_job_service_needs_the_token() {
    in_turn(health_is_open_and_the_job_service_needs_the_token_());
}

async fn health_is_open_and_the_job_service_needs_the_token_() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_coord, url) = start_coordinator(dir.path(), "health-test", &[], &[]);

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

#[test]
fn another_version_and_oversized_messages_are_refused() {
    in_turn(another_version_and_oversized_messages_are_refused_());
}

async fn another_version_and_oversized_messages_are_refused_() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_coord, url) = start_coordinator(dir.path(), "v", &[], &[]);
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

/// A driver loop that stops going round (held by a test hook) turns
/// the health answer to NOT_SERVING within its bound (5 s here); a
/// coordinator that merely waits for workers stays SERVING past it.
#[test]
fn health_says_not_serving_while_the_driver_loop_is_stuck() {
    in_turn(health_says_not_serving_while_the_driver_loop_is_stuck_());
}

async fn health_says_not_serving_while_the_driver_loop_is_stuck_() {
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
    const SERVING: i32 = 1;
    const NOT_SERVING: i32 = 2;

    let (stuck_dir, idle_dir) = (
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
    );
    let start = |dir: &Path, stall: &str| {
        start_coordinator(
            dir,
            "health-test",
            &[
                "--set",
                "cluster.heartbeat_interval_s=0.1",
                "--set",
                "cluster.startup_timeout_s=120",
            ],
            &[(Hook::StallDriverS.var(), stall)],
        )
    };
    let (_stuck, stuck) = start(stuck_dir.path(), "300");
    let (_idle, idle) = start(idle_dir.path(), "0");
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
