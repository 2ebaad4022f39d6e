//! The one rule every file Stride is given by name obeys: it must be a
//! regular file (or a symlink to one). A FIFO would block the reader
//! forever, a character device would read without end, a directory or a
//! socket cannot be read at all; each is refused before it is opened,
//! with what it is.
//!
//! Used for token files, config files, the job token and TLS material;
//! [`write_whole`] writes the small files other processes poll.
//! It never opens the file (opening a FIFO for reading blocks).

use std::path::{Path, PathBuf};

/// What kind of thing `path` is, when it is not a regular file.
fn kind(meta: &std::fs::Metadata) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_file() {
        None
    } else if t.is_dir() {
        Some("a directory")
    } else if t.is_fifo() {
        Some("a FIFO (named pipe)")
    } else if t.is_char_device() {
        Some("a character device")
    } else if t.is_block_device() {
        Some("a block device")
    } else if t.is_socket() {
        Some("a socket")
    } else {
        Some("not a regular file")
    }
}

/// A file given by name that cannot be read: not there, or not a regular
/// file. Bad input (exit code 2 where it reaches `main`).
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct BadFile {
    pub path: PathBuf,
    pub message: String,
}

/// [`check_regular`] as a [`BadFile`] error.
pub fn require_regular(path: &Path) -> Result<std::fs::Metadata, BadFile> {
    check_regular(path).map_err(|message| BadFile {
        path: path.to_path_buf(),
        message,
    })
}

/// `Ok` when `path` is a regular file (following symlinks); otherwise a
/// message saying what it is, or why it cannot be looked at.
pub fn check_regular(path: &Path) -> Result<std::fs::Metadata, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot open: {e}"))?;
    match kind(&meta) {
        None => Ok(meta),
        Some(what) => Err(format!(
            "is {what}, not a regular file; Stride reads only regular files (a pipe or a device could block or never end)"
        )),
    }
}

/// Bytes free for an unprivileged writer on the filesystem holding
/// `path` (`statvfs`), for messages about a full disk; `None` when it
/// cannot be told.
pub fn free_bytes(path: &Path) -> Option<u64> {
    let s = rustix::fs::statvfs(path).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

/// Writes `contents` to `path` so that a reader sees the file whole or
/// not at all (a sibling temporary file, then a rename): for the small
/// files other processes poll, such as `coordinator.addr` (a plain write
/// can be read between its truncation and its bytes, as an empty file).
pub fn write_whole(path: &Path, contents: &str) -> std::io::Result<()> {
    let name = path.file_name().map_or_else(
        || std::ffi::OsString::from("file"),
        std::ffi::OsStr::to_os_string,
    );
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(&name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_write_replaces_the_file_and_leaves_nothing_beside_it() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("coordinator.addr");
        std::fs::write(&p, "old\n").expect("write");
        write_whole(&p, "http://127.0.0.1:1\n").expect("write_whole");
        assert_eq!(
            std::fs::read_to_string(&p).expect("read"),
            "http://127.0.0.1:1\n"
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["coordinator.addr"]);
    }

    #[test]
    fn only_regular_files_pass() {
        let d = tempfile::tempdir().expect("tmp");
        let f = d.path().join("f");
        std::fs::write(&f, "x").expect("write");
        assert!(check_regular(&f).is_ok());
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&f, &link).expect("symlink");
        assert!(check_regular(&link).is_ok());
        let fifo = d.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(made.success());
        let cases = [
            (fifo.as_path(), "a FIFO"),
            (d.path(), "a directory"),
            (Path::new("/dev/null"), "a character device"),
            (&d.path().join("missing"), "cannot open"),
        ];
        for (p, want) in cases {
            let e = check_regular(p).expect_err("refused");
            assert!(e.contains(want), "{}: {e}", p.display());
        }
    }
}
