//! TLS: with certificates from a throwaway CA, a TLS worker trains and a
//! plaintext client is refused; with mutual TLS, a worker without a client
//! certificate is refused.

use std::path::Path;
use std::time::Duration;

use crate::common::spawn;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// Writes ca.pem, server.pem/server.key (for 127.0.0.1 and localhost) and
/// client.pem/client.key into `dir`.
fn certificates(dir: &Path) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("ca");
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("w");
    for (name, sans) in [
        (
            "server",
            vec!["127.0.0.1".to_string(), "localhost".to_string()],
        ),
        ("client", vec!["worker".to_string()]),
    ] {
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(sans)
            .expect("params")
            .signed_by(&key, &ca)
            .expect("sign");
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).expect("w");
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).expect("w");
    }
}

#[test]
fn tls_workers_train_and_plaintext_is_refused() {
    let _turn = crate::common::beside_others();
    let d = tempfile::tempdir().expect("tmp");
    certificates(d.path());
    let mut coord = spawn(
        "coordinator",
        &[
            "--config",
            "tiny",
            "--workers",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            "server.pem",
            "--tls-key",
            "server.key",
            "--set",
            "train.max_steps=2",
            "--set",
            "train.warmup_steps=0",
        ],
        d.path(),
        "c.out",
    );
    let url = crate::common::coordinator_url(d.path(), "tiny", &mut coord);
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");

    let plain = url.replacen("https://", "http://", 1);
    let out = std::process::Command::new(crate::common::bin("worker"))
        .args(["--connect", &plain, "--connect-timeout", "2"])
        .env("STRIDE_TOKEN", crate::common::TOKEN)
        .output()
        .expect("worker runs");
    assert!(!out.status.success(), "a plaintext worker must not get in");

    let mut w = spawn(
        "worker",
        &["--connect", &url, "--tls-ca", "ca.pem"],
        d.path(),
        "w.out",
    );
    assert!(coord.wait(Duration::from_secs(300)).success());
    assert!(w.wait(Duration::from_secs(60)).success());
    let log = std::fs::read_to_string(d.path().join("runs/tiny/train.log")).expect("log");
    assert!(log.contains("done: 2 steps"), "{log}");
}

#[test]
fn mutual_tls_refuses_a_worker_without_a_client_certificate() {
    let _turn = crate::common::beside_others();
    let d = tempfile::tempdir().expect("tmp");
    certificates(d.path());
    let mut coord = spawn(
        "coordinator",
        &[
            "--config",
            "tiny",
            "--workers",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            "server.pem",
            "--tls-key",
            "server.key",
            "--tls-client-ca",
            "ca.pem",
            "--set",
            "train.max_steps=2",
            "--set",
            "train.warmup_steps=0",
        ],
        d.path(),
        "c.out",
    );
    let url = crate::common::coordinator_url(d.path(), "tiny", &mut coord);
    let out = std::process::Command::new(crate::common::bin("worker"))
        .args([
            "--connect",
            &url,
            "--tls-ca",
            "ca.pem",
            "--connect-timeout",
            "2",
        ])
        .current_dir(d.path())
        .env("STRIDE_TOKEN", crate::common::TOKEN)
        .output()
        .expect("worker runs");
    assert!(!out.status.success(), "no client certificate: refused");
    let mut w = spawn(
        "worker",
        &[
            "--connect",
            &url,
            "--tls-ca",
            "ca.pem",
            "--tls-cert",
            "client.pem",
            "--tls-key",
            "client.key",
        ],
        d.path(),
        "w.out",
    );
    assert!(coord.wait(Duration::from_secs(300)).success());
    assert!(w.wait(Duration::from_secs(60)).success());
}
