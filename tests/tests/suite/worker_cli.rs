//! The worker binary on its own: what a user sees when there is no
//! coordinator to talk to.

use std::process::Command;

/// Runs `worker ARGS` with a token in the environment: exit code and stderr.
fn worker(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(crate::common::bin("worker"))
        .args(args)
        .env("STRIDE_TOKEN", "t")
        .output()
        .expect("worker runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn no_coordinator_is_a_clear_timeout() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let (code, err) = worker(&["--connect", &url, "--connect-timeout", "1"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains(&format!("no coordinator answered at {url} within 1s")),
        "{err}"
    );
}

#[test]
fn a_bad_url_is_named() {
    let (code, err) = worker(&["--connect", "not a url"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--connect not a url"), "{err}");
}

#[test]
fn no_token_is_refused_before_connecting() {
    let out = Command::new(crate::common::bin("worker"))
        .args(["--connect", "http://127.0.0.1:9"])
        .env_remove("STRIDE_TOKEN")
        .output()
        .expect("worker runs");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no job token") && err.contains("--token-file"),
        "{err}"
    );
}

#[test]
fn a_server_that_never_answers_is_a_clear_error_not_a_hang() {
    // The kernel completes the connection into the backlog; nothing ever
    // reads or answers it.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", silent.local_addr().expect("addr"));
    let (code, err) = worker(&["--connect", &url, "--connect-timeout", "1"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains(&format!("{url} accepted the connection but did not answer")),
        "{err}"
    );
    drop(silent);
}

#[test]
fn a_timeout_no_clock_can_hold_is_refused_not_a_panic() {
    for bad in ["inf", "NaN", "-1", "1e20", "soon"] {
        let flag = format!("--connect-timeout={bad}");
        let (code, err) = worker(&["--connect", "http://127.0.0.1:9", &flag]);
        assert_eq!(code, Some(2), "{bad}: {err}");
        assert!(err.contains("--connect-timeout"), "{bad}: {err}");
        assert!(!err.contains("panicked"), "{bad}: {err}");
    }
}
