//! The shared job token: where it comes from and how it is compared.
//!
//! Every RPC to the coordinator carries `authorization: Bearer <token>`
//! (the wire format is `stride_proto::client`).
//! The token comes from a file (`--token-file`, e.g. a mounted Kubernetes
//! Secret) or the `STRIDE_TOKEN` environment variable; `coordinator --local`
//! generates one and hands it to the workers it starts. Comparison takes
//! the same time whatever the first differing byte.

use std::path::Path;

/// Environment variable holding the token.
pub const TOKEN_ENV: &str = "STRIDE_TOKEN";

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token file {path}: {message}")]
    File { path: String, message: String },
    #[error(
        "no job token: pass --token-file PATH or set {TOKEN_ENV} (generate one with `openssl rand -hex 32`); `coordinator --local` makes its own"
    )]
    Missing,
}

/// The token from `file`, else from `STRIDE_TOKEN`; `None` when neither is set.
pub fn load(file: Option<&Path>) -> Result<Option<String>, TokenError> {
    if let Some(path) = file {
        crate::files::check_regular(path).map_err(|message| TokenError::File {
            path: path.display().to_string(),
            message,
        })?;
        let text = std::fs::read_to_string(path).map_err(|e| TokenError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let token = text.trim().to_string();
        if token.is_empty() {
            return Err(TokenError::File {
                path: path.display().to_string(),
                message: "the file is empty".into(),
            });
        }
        return Ok(Some(token));
    }
    Ok(std::env::var(TOKEN_ENV)
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty()))
}

/// A fresh random token (32 bytes from the OS, hex).
pub fn generate() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(crate::names::hex(&bytes))
}

/// Compares `presented` with `expected` in time independent of where they
/// differ (only the length may leak).
pub fn matches(presented: &[u8], expected: &[u8]) -> bool {
    if presented.len() != expected.len() {
        return false;
    }
    let diff = presented
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparison_and_sources() {
        assert!(matches(b"Bearer abc", b"Bearer abc"));
        assert!(!matches(b"Bearer abd", b"Bearer abc"));
        assert!(!matches(b"Bearer ab", b"Bearer abc"));
        let d = tempfile::tempdir().expect("tmp");
        let f = d.path().join("token");
        std::fs::write(&f, "s3cret\n").expect("write");
        assert_eq!(load(Some(&f)).expect("load"), Some("s3cret".to_string()));
        std::fs::write(&f, "\n").expect("write");
        assert!(
            load(Some(&f))
                .expect_err("empty")
                .to_string()
                .contains("empty")
        );
        assert!(load(Some(&d.path().join("none"))).is_err());
        let e = load(Some(Path::new("/dev/zero"))).expect_err("a device");
        assert!(e.to_string().contains("a character device"), "{e}");
        let t = generate().expect("random");
        assert_eq!(t.len(), 64);
        assert_ne!(t, generate().expect("random"));
    }
}
