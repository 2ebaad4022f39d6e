//! Token files and the corpus a job reads.
//!
//! Two on-disk formats, told apart by the header:
//! - nanoGPT: raw little-endian `uint16` tokens, nothing else;
//! - llm.c: a 256 × `int32` header (magic 20240520, version 1, token count)
//!   followed by `uint16` tokens.
//!
//! Files are memory-mapped, never read whole into RAM. Opening checks the
//! shape of the file (empty, odd length, bad or truncated header); the
//! vocabulary check ([`Tokens::check_vocab`]) scans the tokens once. Every
//! error names the file. A [`Corpus`] is the train and validation token
//! views of a job: two files, one file split by `val_fraction`, or the
//! built-in synthetic source.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use crate::config::{DataConfig, ModelConfig};
use crate::synthetic::MarkovSource;

/// First int32 of an llm.c token file.
pub const LLMC_MAGIC: i32 = 20_240_520;
/// The llm.c format version Stride reads (uint16 tokens).
pub const LLMC_VERSION: i32 = 1;
/// Bytes of the llm.c header.
pub const LLMC_HEADER_BYTES: usize = 256 * 4;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("token file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{name}: {message}")]
    Corpus { name: String, message: String },
}

fn file_err(path: &Path, message: impl Into<String>) -> DataError {
    DataError::File {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// How a token file is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenFormat {
    NanoGpt,
    LlmC,
}

impl fmt::Display for TokenFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenFormat::NanoGpt => "nanoGPT raw uint16",
            TokenFormat::LlmC => "llm.c (header + uint16)",
        })
    }
}

#[derive(Debug)]
enum Backing {
    /// Little-endian u16 tokens at `offset` bytes into the map. The file
    /// stays open, so that [`Tokens::check_unchanged`] can ask whether it
    /// was changed under the map (a truncated file would raise SIGBUS on
    /// the next read past its new end).
    Mapped {
        map: Mmap,
        offset: usize,
        file: std::fs::File,
        modified: Option<std::time::SystemTime>,
    },
    Memory(Vec<u16>),
}

/// What identifies the tokens of a split: their count and their xxh3-64
/// (of the tokens as little-endian `u16`, headers excluded). A checkpoint
/// records one per split, so that a resume against other data is caught;
/// workers report theirs when they join.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Fingerprint {
    /// "train" or "val".
    pub split: String,
    /// The file (or "synthetic corpus …") as its reader names it.
    pub name: String,
    pub tokens: u64,
    /// xxh3-64, 16 hex digits.
    pub xxh3: String,
}

impl Fingerprint {
    pub fn new(split: &str, name: &str, tokens: u64, checksum: u64) -> Fingerprint {
        Fingerprint {
            split: split.to_string(),
            name: name.to_string(),
            tokens,
            xxh3: format!("{checksum:016x}"),
        }
    }

    /// The same tokens (the name may differ: a file moved or mounted
    /// elsewhere holds the same data).
    pub fn same_tokens(&self, other: &Fingerprint) -> bool {
        self.tokens == other.tokens && self.xxh3 == other.xxh3
    }

    /// `name: N tokens, xxh3 H`.
    pub fn describe(&self) -> String {
        format!("{}: {} tokens, xxh3 {}", self.name, self.tokens, self.xxh3)
    }
}

/// A read-only view of a range of tokens, cheap to clone.
#[derive(Debug, Clone)]
pub struct Tokens {
    /// The file path, or a description such as "synthetic corpus".
    pub name: String,
    pub format: Option<TokenFormat>,
    backing: Arc<Backing>,
    start: usize,
    len: usize,
}

impl Tokens {
    /// Memory-maps a token file and checks its layout.
    pub fn open(path: &Path) -> Result<Tokens, DataError> {
        crate::files::check_regular(path).map_err(|e| file_err(path, e))?;
        let file =
            std::fs::File::open(path).map_err(|e| file_err(path, format!("cannot open: {e}")))?;
        let meta = file
            .metadata()
            .map_err(|e| file_err(path, format!("cannot stat: {e}")))?;
        let bytes = meta.len() as usize;
        let modified = meta.modified().ok();
        if bytes == 0 {
            return Err(file_err(path, "the file is empty"));
        }
        // SAFETY: the map is read-only and private to this process. Stride
        // never writes token files it reads; a file changed underneath a
        // running job by someone else is outside what we can defend against
        // (as with every mmap-based loader).
        #[allow(unsafe_code)]
        let map =
            unsafe { Mmap::map(&file) }.map_err(|e| file_err(path, format!("cannot map: {e}")))?;
        let (format, offset) = detect(path, &map)?;
        let len = (bytes - offset) / 2;
        Ok(Tokens {
            name: path.display().to_string(),
            format: Some(format),
            backing: Arc::new(Backing::Mapped {
                map,
                offset,
                file,
                modified,
            }),
            start: 0,
            len,
        })
    }

    /// Fails, naming the file, if it was truncated, extended or rewritten
    /// since it was opened (its length or modification time changed). One
    /// `fstat`; readers call it before each batch, so that a file truncated
    /// under a running job is an error that names it instead of a SIGBUS.
    pub fn check_unchanged(&self) -> Result<(), DataError> {
        let Backing::Mapped {
            map,
            file,
            modified,
            ..
        } = &*self.backing
        else {
            return Ok(());
        };
        let now = file
            .metadata()
            .map_err(|e| file_err(Path::new(&self.name), format!("cannot stat: {e}")))?;
        let was = map.len() as u64;
        if now.len() != was || now.modified().ok() != *modified {
            return Err(DataError::Corpus {
                name: self.name.clone(),
                message: format!(
                    "the token file changed while the job read it ({was} bytes when opened, {} now{}); a running job's data must not change: restore it, or resume from a checkpoint with --data-changed",
                    now.len(),
                    if now.len() == was {
                        ", rewritten in place"
                    } else {
                        ""
                    }
                ),
            });
        }
        Ok(())
    }

    /// Tokens held in memory (the synthetic corpus, tests).
    pub fn from_vec(name: impl Into<String>, tokens: Vec<u16>) -> Tokens {
        let len = tokens.len();
        Tokens {
            name: name.into(),
            format: None,
            backing: Arc::new(Backing::Memory(tokens)),
            start: 0,
            len,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Token `i` of this view (panics past the end: callers index windows
    /// they computed from `len`).
    pub fn get(&self, i: usize) -> u16 {
        assert!(
            i < self.len,
            "token {i} out of range of {} ({} tokens)",
            self.name,
            self.len
        );
        let i = self.start + i;
        match &*self.backing {
            Backing::Mapped { map, offset, .. } => {
                let at = offset + 2 * i;
                u16::from_le_bytes([map[at], map[at + 1]])
            }
            Backing::Memory(v) => v[i],
        }
    }

    /// xxh3-64 of this view's tokens as little-endian `u16` bytes: two
    /// views hold the same tokens iff (barring collisions) their lengths
    /// and checksums agree. One pass over the view (~0.1 s per GB).
    pub fn checksum(&self) -> u64 {
        self.scan().1
    }

    /// The largest token id and the checksum, in one pass over the view,
    /// 16 MiB at a time: a file costs one read whatever its size (a 20 GB
    /// corpus: one sequential read of it, ~0.1 s per GB from the page
    /// cache).
    pub fn scan(&self) -> (Option<u16>, u64) {
        const CHUNK: usize = 16 << 20;
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let mut max: Option<u16> = None;
        let mut take = |bytes: &[u8]| {
            hasher.update(bytes);
            let m = bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .max();
            max = max.max(m);
        };
        match &*self.backing {
            Backing::Mapped { map, offset, .. } => {
                let from = offset + 2 * self.start;
                for chunk in map[from..from + 2 * self.len].chunks(CHUNK) {
                    take(chunk);
                }
            }
            Backing::Memory(v) => {
                for chunk in v[self.start..self.start + self.len].chunks(CHUNK / 2) {
                    let bytes: Vec<u8> = chunk.iter().flat_map(|t| t.to_le_bytes()).collect();
                    take(&bytes);
                }
            }
        }
        (max, hasher.digest())
    }

    /// `len` tokens from `from`, widened to u32 (the model's index type).
    pub fn read(&self, from: usize, len: usize, out: &mut Vec<u32>) {
        out.clear();
        out.extend((from..from + len).map(|i| u32::from(self.get(i))));
    }

    /// The sub-range `from..to` of this view.
    pub fn slice(&self, from: usize, to: usize, name: impl Into<String>) -> Tokens {
        assert!(from <= to && to <= self.len);
        Tokens {
            name: name.into(),
            format: self.format,
            backing: Arc::clone(&self.backing),
            start: self.start + from,
            len: to - from,
        }
    }

    /// The largest token id, in one pass.
    pub fn max_token(&self) -> Option<u16> {
        self.scan().0
    }

    /// Fails, naming the file and the first offending position, if any token
    /// id is not below `vocab_size`.
    pub fn check_vocab(&self, vocab_size: usize) -> Result<(), DataError> {
        self.check_vocab_max(self.max_token(), vocab_size)
    }

    /// [`Tokens::check_vocab`] with the largest id already known.
    fn check_vocab_max(&self, max: Option<u16>, vocab_size: usize) -> Result<(), DataError> {
        let max = max.unwrap_or(0);
        if usize::from(max) < vocab_size {
            return Ok(());
        }
        let pos = (0..self.len)
            .find(|&i| usize::from(self.get(i)) >= vocab_size)
            .unwrap_or(0);
        Err(DataError::Corpus {
            name: self.name.clone(),
            message: format!(
                "token id {} at position {pos} is not below model.vocab_size = {vocab_size} (largest id in the file: {max}); was it tokenised with another vocabulary?",
                self.get(pos)
            ),
        })
    }
}

fn detect(path: &Path, map: &[u8]) -> Result<(TokenFormat, usize), DataError> {
    let int = |i: usize| {
        map.get(4 * i..4 * i + 4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if int(0) == Some(LLMC_MAGIC) {
        if map.len() < LLMC_HEADER_BYTES {
            return Err(file_err(
                path,
                format!(
                    "starts with the llm.c magic {LLMC_MAGIC} but is only {} bytes, shorter than its {LLMC_HEADER_BYTES}-byte header (truncated?)",
                    map.len()
                ),
            ));
        }
        let version = int(1).unwrap_or(0);
        if version != LLMC_VERSION {
            return Err(file_err(
                path,
                format!(
                    "llm.c header version {version} is not supported (Stride reads version {LLMC_VERSION}: uint16 tokens)"
                ),
            ));
        }
        let count = int(2).unwrap_or(-1);
        let body = map.len() - LLMC_HEADER_BYTES;
        if count < 0 || body != 2 * count as usize {
            return Err(file_err(
                path,
                format!(
                    "llm.c header says {count} tokens ({} bytes) but {body} bytes follow the header (truncated or corrupted)",
                    2 * i64::from(count)
                ),
            ));
        }
        return Ok((TokenFormat::LlmC, LLMC_HEADER_BYTES));
    }
    if !map.len().is_multiple_of(2) {
        return Err(file_err(
            path,
            format!(
                "odd length of {} bytes: a nanoGPT token file holds 2-byte tokens (truncated, or not a token file?)",
                map.len()
            ),
        ));
    }
    Ok((TokenFormat::NanoGpt, 0))
}

/// Writes tokens in the nanoGPT format, atomically (temporary file, fsync, rename).
pub fn write_nanogpt(path: &Path, tokens: &[u16]) -> std::io::Result<()> {
    write_atomic(path, |w| write_u16s(w, tokens))
}

/// Tokens as little-endian u16, in bounded chunks.
fn write_u16s(w: &mut impl Write, tokens: &[u16]) -> std::io::Result<()> {
    for chunk in tokens.chunks(1 << 16) {
        let bytes: Vec<u8> = chunk.iter().flat_map(|t| t.to_le_bytes()).collect();
        w.write_all(&bytes)?;
    }
    Ok(())
}

/// Writes tokens in the llm.c format, atomically.
pub fn write_llmc(path: &Path, tokens: &[u16]) -> std::io::Result<()> {
    let count = i32::try_from(tokens.len())
        .map_err(|_| std::io::Error::other("llm.c files hold at most 2^31 − 1 tokens"))?;
    write_atomic(path, |w| {
        let mut header = [0i32; 256];
        header[0] = LLMC_MAGIC;
        header[1] = LLMC_VERSION;
        header[2] = count;
        let bytes: Vec<u8> = header.iter().flat_map(|h| h.to_le_bytes()).collect();
        w.write_all(&bytes)?;
        write_u16s(w, tokens)
    })
}

/// Writes a file next to `path` under a temporary name, fsyncs it and
/// renames it into place, so a reader never sees half a file.
pub fn write_atomic(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<&std::fs::File>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let file = std::fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::new(&file);
        fill(&mut w)?;
        w.flush()?;
        drop(w);
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Where a single token source is cut into train (before) and validation
/// (after): the last `val_fraction` of the tokens, rounded, are validation.
pub fn split_point(tokens: usize, val_fraction: f64) -> usize {
    let val_len = (tokens as f64 * val_fraction).round() as usize;
    tokens - val_len.min(tokens)
}

/// The length of the training split the config names, without generating
/// or scanning anything (for `plan`).
pub fn train_split_len(data: &DataConfig) -> Result<usize, DataError> {
    let total = match &data.train {
        Some(path) => Tokens::open(path)?.len(),
        None => data.synthetic_tokens,
    };
    Ok(if data.val.is_some() {
        total
    } else {
        split_point(total, data.val_fraction)
    })
}

/// The length of the validation split the config names, the same way
/// (for `plan`).
pub fn val_split_len(data: &DataConfig) -> Result<usize, DataError> {
    Ok(match (&data.val, &data.train) {
        (Some(path), _) => Tokens::open(path)?.len(),
        (None, Some(path)) => {
            let total = Tokens::open(path)?.len();
            total - split_point(total, data.val_fraction)
        }
        (None, None) => {
            data.synthetic_tokens - split_point(data.synthetic_tokens, data.val_fraction)
        }
    })
}

/// How much of a corpus to check when opening it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// Layout and lengths, plus one pass over every token for ids outside
    /// the vocabulary, which also computes the splits' fingerprints (the
    /// coordinator, once per job).
    Full,
    /// Layout and lengths only (workers: the coordinator has scanned); the
    /// fingerprints are computed when first asked for.
    Layout,
}

/// The train and validation tokens of a job.
#[derive(Debug, Clone)]
pub struct Corpus {
    pub train: Tokens,
    pub val: Tokens,
    /// The synthetic source, when the corpus is built in (its entropy rate
    /// is the floor of the validation loss).
    pub synthetic: Option<MarkovSource>,
    /// Train's and val's [`Fingerprint`], once computed.
    fingerprints: Arc<std::sync::OnceLock<[Fingerprint; 2]>>,
}

impl Corpus {
    /// Opens (or generates) the corpus the config names and checks it:
    /// every token below the vocabulary, every split long enough for one
    /// window of `context + 1` tokens (the validation split may be empty
    /// only when `val_fraction` is 0 and there is no `val` file).
    pub fn open(
        data: &DataConfig,
        model: &ModelConfig,
        seed: u64,
        scan: Scan,
    ) -> Result<Corpus, DataError> {
        let (train_all, synthetic) = match &data.train {
            Some(path) => (Tokens::open(path)?, None),
            None => {
                let src = MarkovSource::new(model.vocab_size, data.synthetic_branching, seed);
                let tokens = src.generate(data.synthetic_tokens, seed);
                (Tokens::from_vec("synthetic corpus", tokens), Some(src))
            }
        };
        let (train, val) = match &data.val {
            Some(path) => (train_all, Tokens::open(path)?),
            None => {
                let n = train_all.len();
                let cut = split_point(n, data.val_fraction);
                let val_len = n - cut;
                let train_name = format!("{} (first {cut} tokens)", train_all.name);
                let val_name = format!(
                    "{} (last {val_len} tokens, data.val_fraction)",
                    train_all.name
                );
                (
                    train_all.slice(0, cut, train_name),
                    train_all.slice(cut, n, val_name),
                )
            }
        };
        let window = model.context + 1;
        for (split, t) in [("training", &train), ("validation", &val)] {
            if split == "validation" && t.is_empty() && data.val.is_none() {
                continue;
            }
            if t.len() < window {
                return Err(DataError::Corpus {
                    name: t.name.clone(),
                    message: format!(
                        "{} tokens is shorter than one {split} window of model.context + 1 = {window} tokens",
                        t.len()
                    ),
                });
            }
        }
        let corpus = Corpus {
            train,
            val,
            synthetic,
            fingerprints: Arc::default(),
        };
        if scan == Scan::Full {
            // One pass per split: the vocabulary check and the fingerprint.
            let mut prints = Vec::with_capacity(2);
            for (split, t) in corpus.splits() {
                let (max, checksum) = t.scan();
                t.check_vocab_max(max, model.vocab_size)?;
                prints.push(Fingerprint::new(split, &t.name, t.len() as u64, checksum));
            }
            if let Ok(prints) = <[Fingerprint; 2]>::try_from(prints) {
                let _ = corpus.fingerprints.set(prints);
            }
        }
        Ok(corpus)
    }

    /// ("train", its tokens), ("val", its tokens).
    pub fn splits(&self) -> [(&'static str, &Tokens); 2] {
        [("train", &self.train), ("val", &self.val)]
    }

    /// The fingerprints of the train and val splits (one pass over each
    /// the first time, unless [`Scan::Full`] computed them).
    pub fn fingerprints(&self) -> &[Fingerprint; 2] {
        self.fingerprints.get_or_init(|| {
            self.splits()
                .map(|(split, t)| Fingerprint::new(split, &t.name, t.len() as u64, t.checksum()))
        })
    }

    /// [`Tokens::check_unchanged`] of every token file behind the corpus.
    pub fn check_unchanged(&self) -> Result<(), DataError> {
        self.train.check_unchanged()?;
        self.val.check_unchanged()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().expect("tempdir")
    }

    #[test]
    fn both_formats_read_back() {
        let dir = tmp();
        let tokens: Vec<u16> = (0..5000u32).map(|i| (i * 7 % 50257) as u16).collect();
        let a = dir.path().join("a.bin");
        let b = dir.path().join("b.bin");
        write_nanogpt(&a, &tokens).expect("write");
        write_llmc(&b, &tokens).expect("write");
        for (p, fmt) in [(&a, TokenFormat::NanoGpt), (&b, TokenFormat::LlmC)] {
            let t = Tokens::open(p).expect("open");
            assert_eq!(t.format, Some(fmt));
            assert_eq!(t.len(), tokens.len());
            assert!((0..t.len()).all(|i| t.get(i) == tokens[i]));
            assert_eq!(t.max_token(), tokens.iter().copied().max());
            let s = t.slice(10, 20, "s");
            assert_eq!(s.get(0), tokens[10]);
            let mut out = Vec::new();
            s.read(2, 3, &mut out);
            assert_eq!(
                out,
                vec![
                    u32::from(tokens[12]),
                    u32::from(tokens[13]),
                    u32::from(tokens[14])
                ]
            );
        }
    }

    #[test]
    fn bad_files_are_named_errors() {
        let dir = tmp();
        let mut header = vec![0u8; LLMC_HEADER_BYTES];
        header[..4].copy_from_slice(&LLMC_MAGIC.to_le_bytes());
        header[4..8].copy_from_slice(&1i32.to_le_bytes());
        header[8..12].copy_from_slice(&10i32.to_le_bytes());
        let mut wrong_version = header.clone();
        wrong_version[4..8].copy_from_slice(&2i32.to_le_bytes());
        let mut truncated_body = header.clone();
        truncated_body.extend([1u8; 8]); // 4 of the 10 tokens
        // (file bytes, expected substring)
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty.bin", vec![], "the file is empty"),
            ("odd.bin", vec![1, 0, 2], "odd length of 3 bytes"),
            (
                "short_header.bin",
                header[..100].to_vec(),
                "shorter than its 1024-byte header",
            ),
            ("version.bin", wrong_version, "version 2 is not supported"),
            (
                "truncated.bin",
                truncated_body,
                "header says 10 tokens (20 bytes) but 8 bytes follow",
            ),
        ];
        for (name, bytes, want) in cases {
            let p = dir.path().join(name);
            std::fs::write(&p, &bytes).expect("write");
            let e = Tokens::open(&p).expect_err(name).to_string();
            assert!(e.contains(name) && e.contains(want), "{name}: {e}");
            assert_eq!(
                std::fs::read(&p).expect("read"),
                bytes,
                "{name} was modified"
            );
        }
        let e = Tokens::open(&dir.path().join("missing.bin"))
            .expect_err("missing")
            .to_string();
        assert!(
            e.contains("missing.bin") && e.contains("cannot open"),
            "{e}"
        );
    }

    #[test]
    fn token_ids_beyond_the_vocabulary_are_found() {
        let dir = tmp();
        let p = dir.path().join("big.bin");
        let mut tokens = vec![5u16; 3000];
        tokens[1234] = 60_000;
        write_nanogpt(&p, &tokens).expect("write");
        let t = Tokens::open(&p).expect("open");
        let e = t.check_vocab(50_304).expect_err("too big").to_string();
        assert!(
            e.contains("big.bin") && e.contains("60000 at position 1234"),
            "{e}"
        );
        t.check_vocab(65_536).expect("fits u16 vocab");
    }

    #[test]
    fn corpus_splits_and_checks() {
        let dir = tmp();
        let model = ModelConfig {
            context: 16,
            vocab_size: 100,
            ..ModelConfig::default()
        };
        let p = dir.path().join("train.bin");
        write_nanogpt(&p, &(0..1000).map(|i| (i % 100) as u16).collect::<Vec<_>>()).expect("write");
        let data = DataConfig {
            train: Some(p.clone()),
            val_fraction: 0.1,
            stride: 16,
            ..DataConfig::default()
        };
        let c = Corpus::open(&data, &model, 1, Scan::Full).expect("opens");
        assert_eq!((c.train.len(), c.val.len()), (900, 100));
        assert_eq!(c.val.get(0), (900 % 100) as u16);

        let short = DataConfig {
            val_fraction: 0.99,
            ..data.clone()
        };
        let e = Corpus::open(&short, &model, 1, Scan::Full)
            .expect_err("train too short")
            .to_string();
        assert!(
            e.contains("shorter than one training window of model.context + 1 = 17"),
            "{e}"
        );

        let small_vocab = ModelConfig {
            vocab_size: 50,
            ..model.clone()
        };
        let e = Corpus::open(&data, &small_vocab, 1, Scan::Full)
            .expect_err("vocab")
            .to_string();
        assert!(
            e.contains("train.bin") && e.contains("not below model.vocab_size = 50"),
            "{e}"
        );

        let synth = DataConfig {
            synthetic_tokens: 2000,
            ..DataConfig::default()
        };
        let c = Corpus::open(&synth, &model, 1, Scan::Full).expect("synthetic");
        assert_eq!((c.train.len(), c.val.len()), (1800, 200));
        assert!(c.synthetic.is_some());
    }

    #[test]
    fn fingerprints_are_one_pass_and_equal_the_whole_file_hash() {
        let dir = tmp();
        let p = dir.path().join("t.bin");
        // More than one 16 MiB chunk, so that the streaming hash is tested.
        let tokens: Vec<u16> = (0..9_000_000u32)
            .map(|i| (i * 31 % 50_000) as u16)
            .collect();
        write_nanogpt(&p, &tokens).expect("write");
        let t = Tokens::open(&p).expect("open");
        let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        assert_eq!(
            t.scan(),
            (
                tokens.iter().copied().max(),
                xxhash_rust::xxh3::xxh3_64(&bytes)
            )
        );
        let mem = Tokens::from_vec("m", tokens.clone());
        assert_eq!(mem.scan(), t.scan());
        let s = t.slice(3, 1003, "s");
        assert_eq!(s.checksum(), xxhash_rust::xxh3::xxh3_64(&bytes[6..2006]));
    }

    #[test]
    fn a_token_file_changed_under_its_reader_is_named() {
        let dir = tmp();
        let p = dir.path().join("train.bin");
        write_nanogpt(&p, &vec![7u16; 4000]).expect("write");
        let t = Tokens::open(&p).expect("open");
        t.check_unchanged().expect("unchanged");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .expect("open rw");
        f.set_len(6000).expect("truncate");
        let e = t.check_unchanged().expect_err("truncated").to_string();
        assert!(
            e.contains("train.bin") && e.contains("8000 bytes when opened, 6000 now"),
            "{e}"
        );
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tmp();
        let fifo = dir.path().join("train.bin");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(made.success());
        let e = Tokens::open(&fifo).expect_err("fifo").to_string();
        assert!(e.contains("train.bin") && e.contains("a FIFO"), "{e}");
    }
}
