//! Weights and AdamW moments to and from safetensors by parameter name:
//! a streaming writer (no second copy of the state) and direct reads into
//! the caller's flat buffers, checked against the model's layout.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::names::hex;
use crate::params::Slot;

use super::*;

/// One named tensor of a safetensors file.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Writes `tensors` (name, shape, values) as an f32 safetensors file with
/// `metadata`, fsyncs it, and returns its sha256 — straight from the
/// callers' buffers: the header, then each tensor's bytes (its `f32`
/// slice seen as little-endian bytes, not copied), while a second thread
/// hashes the same bytes. The layout is the safetensors crate's (tensors
/// by name, header padded to 8 bytes; [`reference::write_tensors`] is
/// the crate's own writer, held to this one in tests).
pub fn write_tensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, &[f32])],
    metadata: HashMap<String, String>,
) -> Result<String, CheckpointError> {
    let invalid = |message: String| CheckpointError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    for (name, shape, data) in tensors {
        if shape.iter().product::<usize>() != data.len() {
            return Err(invalid(format!(
                "cannot write tensor {name}: shape {shape:?} does not hold {} values",
                data.len()
            )));
        }
    }
    let shapes: Vec<(&str, &[usize])> = tensors
        .iter()
        .map(|(n, s, _)| (n.as_str(), s.as_slice()))
        .collect();
    let head = FileHead::new(path, &shapes, metadata)?;
    let pieces: Vec<&[u8]> = std::iter::once(&head.bytes[..])
        .chain(
            head.order
                .iter()
                .map(|&i| bytemuck::cast_slice::<f32, u8>(tensors[i].2)),
        )
        .collect();
    std::thread::scope(|scope| {
        let hasher = scope.spawn(|| {
            let mut h = Sha256::new();
            for piece in &pieces {
                h.update(piece);
            }
            hex(&h.finalize())
        });
        let written = (|| {
            // Small tensors gather in the buffer; large ones go out in
            // 4 MiB writes, straight from the caller's memory.
            let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
            for piece in &pieces {
                for chunk in piece.chunks(4 << 20) {
                    w.write_all(chunk)?;
                }
            }
            w.into_inner().map_err(|e| e.into_error())?.sync_all()
        })();
        let sha256 = hasher
            .join()
            .map_err(|_| invalid("the hashing thread failed".into()));
        written.map_err(io_err(path))?;
        sha256
    })
}

/// The start of an f32 safetensors file as [`write_tensors`] lays it out:
/// the header's length and the header (tensors by name, padded to 8
/// bytes), and where each tensor's bytes begin.
#[derive(Debug)]
struct FileHead {
    /// The length (u64 LE) and the header.
    bytes: Vec<u8>,
    /// The tensors' indices in file order (by name).
    order: Vec<usize>,
    /// Each tensor's first byte in the file, by the caller's index.
    starts: Vec<u64>,
}

impl FileHead {
    /// The head of a file of `tensors` (name, shape) with `metadata`.
    fn new(
        path: &Path,
        tensors: &[(&str, &[usize])],
        metadata: HashMap<String, String>,
    ) -> Result<FileHead, CheckpointError> {
        /// A header entry, fields in the safetensors crate's order.
        #[derive(Serialize)]
        struct Info<'a> {
            dtype: &'static str,
            shape: &'a [usize],
            data_offsets: (usize, usize),
        }
        let json_err = |e: serde_json::Error| CheckpointError::Invalid {
            path: path.to_path_buf(),
            message: format!("cannot write the header: {e}"),
        };
        let mut order: Vec<usize> = (0..tensors.len()).collect();
        order.sort_by(|&a, &b| tensors[a].0.cmp(tensors[b].0));
        let metadata: BTreeMap<String, String> = metadata.into_iter().collect();
        let mut json = format!(
            "{{\"__metadata__\":{}",
            serde_json::to_string(&metadata).map_err(json_err)?
        );
        let mut offsets = vec![0usize; tensors.len()];
        let mut offset = 0usize;
        for &i in &order {
            let (name, shape) = tensors[i];
            let end = offset + 4 * shape.iter().product::<usize>();
            let info = Info {
                dtype: "F32",
                shape,
                data_offsets: (offset, end),
            };
            json.push(',');
            json.push_str(&serde_json::to_string(name).map_err(json_err)?);
            json.push(':');
            json.push_str(&serde_json::to_string(&info).map_err(json_err)?);
            offsets[i] = offset;
            offset = end;
        }
        json.push('}');
        let mut json = json.into_bytes();
        json.resize(json.len().next_multiple_of(8), b' ');
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&json);
        let data = bytes.len() as u64;
        let starts = offsets.iter().map(|&o| data + o as u64).collect();
        Ok(FileHead {
            bytes,
            order,
            starts,
        })
    }
}

/// A tensor of a checkpoint file cut from one of the flat buffers the file
/// holds (weights; first or second moments): its name, shape, which
/// buffer, and the values of that buffer it is.
#[derive(Debug, Clone)]
pub struct Cut {
    pub name: String,
    pub shape: Vec<usize>,
    pub source: usize,
    pub values: Range<usize>,
}

/// Writes this rank's part of a checkpoint file laid out as
/// [`write_tensors`] lays out the `cuts` (a sharded optimizer's writer):
/// the header, and for each cut the values of `part` it holds, taken from
/// `sources` (each the values `part` of its flat buffer), at their place in
/// the file; then fsyncs. The file is created if it is not there and
/// never truncated: the ranks write disjoint parts of it (and the same
/// header bytes), which together are the whole file, byte for byte the
/// file one writer makes. Its sha256 is the committer's to compute, once
/// every part is written.
pub fn write_part(
    path: &Path,
    cuts: &[Cut],
    metadata: HashMap<String, String>,
    part: Range<usize>,
    sources: &[&[f32]],
) -> Result<(), CheckpointError> {
    use std::os::unix::fs::FileExt;
    let invalid = |message: String| CheckpointError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    if let Some(s) = sources.iter().find(|s| s.len() != part.len()) {
        return Err(invalid(format!(
            "{} values given for the part {part:?} of the state",
            s.len()
        )));
    }
    let shapes: Vec<(&str, &[usize])> = cuts
        .iter()
        .map(|c| (c.name.as_str(), c.shape.as_slice()))
        .collect();
    let head = FileHead::new(path, &shapes, metadata)?;
    let written = (|| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        f.write_all_at(&head.bytes, 0)?;
        for (cut, start) in cuts.iter().zip(&head.starts) {
            let (lo, hi) = (
                cut.values.start.max(part.start),
                cut.values.end.min(part.end),
            );
            if lo >= hi {
                continue;
            }
            let Some(source) = sources.get(cut.source) else {
                return Err(std::io::Error::other(format!(
                    "tensor {} reads buffer {} of {}",
                    cut.name,
                    cut.source,
                    sources.len()
                )));
            };
            let values = &source[lo - part.start..hi - part.start];
            let at = start + 4 * (lo - cut.values.start) as u64;
            f.write_all_at(bytemuck::cast_slice(values), at)?;
        }
        f.sync_all()
    })();
    written.map_err(io_err(path))
}

/// One tensor as a safetensors header describes it.
#[derive(Debug)]
struct Entry {
    name: String,
    shape: Vec<usize>,
    /// Where its bytes start in the file.
    start: u64,
}

/// Reads and checks the header of an f32 safetensors file: the tensors in
/// file order, and the metadata.
fn read_header(
    path: &Path,
    f: &mut std::fs::File,
) -> Result<(Vec<Entry>, HashMap<String, String>), CheckpointError> {
    let invalid = |m: String| CheckpointError::Invalid {
        path: path.to_path_buf(),
        message: m,
    };
    let file_len = f.metadata().map_err(io_err(path))?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| invalid("not a safetensors file: shorter than its header".into()))?;
    let n = u64::from_le_bytes(len);
    if n > (100 << 20) || 8 + n > file_len {
        return Err(invalid(format!(
            "not a safetensors file: a header of {n} bytes in a file of {file_len}"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(io_err(path))?;
    let json: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| invalid(format!("not a safetensors file: bad header: {e}")))?;
    let mut entries = Vec::new();
    let mut metadata = HashMap::new();
    for (name, v) in json {
        if name == "__metadata__" {
            metadata = serde_json::from_value(v)
                .map_err(|e| invalid(format!("bad metadata in the header: {e}")))?;
            continue;
        }
        let bad = |what: &str| invalid(format!("tensor {name}: {what}"));
        if v.get("dtype").and_then(|d| d.as_str()) != Some("F32") {
            return Err(bad("is not F32"));
        }
        let shape: Vec<usize> = v
            .get("shape")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .ok_or_else(|| bad("has no shape"))?;
        let offsets: [u64; 2] = v
            .get("data_offsets")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .ok_or_else(|| bad("has no data offsets"))?;
        let (start, end) = (8 + n + offsets[0], 8 + n + offsets[1]);
        let values = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64));
        if end < start
            || end > file_len
            || values.and_then(|v| v.checked_mul(4)) != Some(end - start)
        {
            return Err(bad(&format!(
                "bytes {start}..{end} of {file_len} do not hold shape {shape:?} (the file is truncated or damaged)"
            )));
        }
        entries.push(Entry { name, shape, start });
    }
    entries.sort_by_key(|e| e.start);
    Ok((entries, metadata))
}

/// Reads the tensors named `prefix` + a slot's name from an f32
/// safetensors file straight into `flat` (in `slots` order), one read per
/// tensor in file order; a tensor missing, extra or of another shape is
/// an error listing every difference.
/// The tensors named `prefix` + a slot's name, in file order, each with
/// where its bytes start and its slot; an error unless they are exactly
/// the model's (names and shapes).
fn matched<'s>(
    path: &Path,
    entries: &[Entry],
    slots: &'s [Slot],
    prefix: &str,
) -> Result<Vec<(u64, &'s Slot)>, CheckpointError> {
    let shapes: BTreeMap<String, Vec<usize>> = entries
        .iter()
        .filter_map(|e| {
            e.name
                .strip_prefix(prefix)
                .map(|n| (n.to_string(), e.shape.clone()))
        })
        .collect();
    let diff = layout_mismatch(&shapes, slots);
    if !diff.is_empty() {
        return Err(CheckpointError::Invalid {
            path: path.to_path_buf(),
            message: format!("tensors differ from the model:\n  {}", diff.join("\n  ")),
        });
    }
    let by_name: HashMap<&str, &Slot> = slots.iter().map(|s| (s.name.as_str(), s)).collect();
    Ok(entries
        .iter()
        .filter_map(|e| {
            let slot = e.name.strip_prefix(prefix).and_then(|n| by_name.get(n))?;
            Some((e.start, *slot))
        })
        .collect())
}

fn read_flat_into(
    path: &Path,
    f: &mut std::fs::File,
    entries: &[Entry],
    slots: &[Slot],
    prefix: &str,
    flat: &mut [f32],
) -> Result<(), CheckpointError> {
    let total = slots.last().map_or(0, |s| s.offset + s.len);
    if flat.len() != total {
        return Err(CheckpointError::Invalid {
            path: path.to_path_buf(),
            message: format!(
                "a buffer of {} values for a model of {total} parameters",
                flat.len()
            ),
        });
    }
    for (start, slot) in matched(path, entries, slots, prefix)? {
        let dest =
            bytemuck::cast_slice_mut::<f32, u8>(&mut flat[slot.offset..slot.offset + slot.len]);
        f.seek(std::io::SeekFrom::Start(start))
            .and_then(|_| f.read_exact(dest))
            .map_err(io_err(path))?;
    }
    Ok(())
}

/// The tensors of one kind in a checkpoint file — the weights of
/// `model.safetensors`, or one moment of `optimizer.safetensors` — read
/// one at a time, in file order, into one buffer reused for each: for
/// moving them on into other memory (a device's) without a host copy of
/// the whole state first.
#[derive(Debug)]
pub struct TensorReader<'s> {
    path: PathBuf,
    file: std::fs::File,
    order: std::vec::IntoIter<(u64, &'s Slot)>,
    buf: Vec<f32>,
    metadata: HashMap<String, String>,
}

/// Which tensors of a checkpoint a [`TensorReader`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Weights,
    FirstMoments,
    SecondMoments,
}

impl<'s> TensorReader<'s> {
    /// Opens `kind`'s file in checkpoint `dir` and checks its tensors are
    /// the model's (names and shapes), reading only the header.
    pub fn open(dir: &Path, slots: &'s [Slot], kind: Kind) -> Result<Self, CheckpointError> {
        let (file, prefix) = match kind {
            Kind::Weights => (MODEL_FILE, ""),
            Kind::FirstMoments => (OPTIMIZER_FILE, "exp_avg."),
            Kind::SecondMoments => (OPTIMIZER_FILE, "exp_avg_sq."),
        };
        let path = dir.join(file);
        let mut file = std::fs::File::open(&path).map_err(io_err(&path))?;
        let (entries, metadata) = read_header(&path, &mut file)?;
        let order = matched(&path, &entries, slots, prefix)?.into_iter();
        Ok(TensorReader {
            path,
            file,
            order,
            buf: Vec::new(),
            metadata,
        })
    }

    /// The next tensor's slot and values; None after the last.
    pub fn next_tensor(&mut self) -> Result<Option<(&'s Slot, &[f32])>, CheckpointError> {
        let Some((start, slot)) = self.order.next() else {
            return Ok(None);
        };
        self.buf.resize(slot.len, 0.0);
        self.file
            .seek(std::io::SeekFrom::Start(start))
            .and_then(|_| {
                self.file
                    .read_exact(bytemuck::cast_slice_mut::<f32, u8>(&mut self.buf))
            })
            .map_err(io_err(&self.path))?;
        Ok(Some((slot, &self.buf)))
    }

    /// The update count an `optimizer.safetensors` records.
    pub fn optimizer_step(&self) -> Result<u64, CheckpointError> {
        optimizer_step(&self.path, &self.metadata)
    }
}

fn optimizer_step(path: &Path, metadata: &HashMap<String, String>) -> Result<u64, CheckpointError> {
    metadata
        .get("step")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| CheckpointError::Invalid {
            path: path.to_path_buf(),
            message: "no `step` in the metadata".into(),
        })
}

/// Names and shapes of the tensors of a safetensors file (header only).
pub fn tensor_shapes(path: &Path) -> Result<BTreeMap<String, Vec<usize>>, CheckpointError> {
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(io_err(path))?;
    let n = u64::from_le_bytes(len) as usize;
    let invalid = |m: String| CheckpointError::Invalid {
        path: path.to_path_buf(),
        message: m,
    };
    if n > 100 << 20 {
        return Err(invalid(format!(
            "header of {n} bytes: not a safetensors file"
        )));
    }
    let mut header = vec![0u8; n];
    f.read_exact(&mut header).map_err(io_err(path))?;
    let json: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| invalid(format!("bad safetensors header: {e}")))?;
    Ok(json
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(k, v)| {
            let shape = v
                .get("shape")
                .and_then(|s| s.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_u64())
                        .map(|x| x as usize)
                        .collect()
                })
                .unwrap_or_default();
            (k, shape)
        })
        .collect())
}

/// How the tensors of a file differ from a model layout: one line per
/// missing, unexpected or differently shaped tensor (empty = they match).
pub fn layout_mismatch(shapes: &BTreeMap<String, Vec<usize>>, slots: &[Slot]) -> Vec<String> {
    let mut out = Vec::new();
    for s in slots {
        match shapes.get(&s.name) {
            None => out.push(format!(
                "{} {:?}: missing from the checkpoint",
                s.name, s.shape
            )),
            Some(shape) if *shape != s.shape => out.push(format!(
                "{}: checkpoint {:?}, model {:?}",
                s.name, shape, s.shape
            )),
            Some(_) => {}
        }
    }
    for (name, shape) in shapes {
        if !slots.iter().any(|s| &s.name == name) {
            out.push(format!(
                "{name} {shape:?}: in the checkpoint, not in the model"
            ));
        }
    }
    out
}

/// The tensors of `model.safetensors`: each slot of the flat weights under
/// its nanoGPT name; and the file's metadata.
type Tensors<'a> = Vec<(String, Vec<usize>, &'a [f32])>;

pub(super) fn model_tensors<'a>(
    slots: &[Slot],
    weights: &'a [f32],
) -> (Tensors<'a>, HashMap<String, String>) {
    let (cuts, meta) = model_cuts(slots);
    (cut_out(&cuts, &[weights]), meta)
}

/// The metadata of `model.safetensors`.
fn model_metadata() -> HashMap<String, String> {
    HashMap::from([("format".to_string(), "pt".to_string())])
}

/// The metadata of `optimizer.safetensors` after `step` updates.
fn optimizer_metadata(step: u64) -> HashMap<String, String> {
    HashMap::from([("step".to_string(), step.to_string())])
}

/// The tensors of `optimizer.safetensors`: AdamW moments as
/// `exp_avg.<name>` and `exp_avg_sq.<name>` (PyTorch's names), the update
/// count as metadata.
pub(super) fn optimizer_tensors<'a>(
    slots: &[Slot],
    m: &'a [f32],
    v: &'a [f32],
    step: u64,
) -> (Tensors<'a>, HashMap<String, String>) {
    let (cuts, meta) = optimizer_cuts(slots, step);
    (cut_out(&cuts, &[m, v]), meta)
}

/// Each cut's values, taken from the whole flat buffers `sources`.
fn cut_out<'a>(cuts: &[Cut], sources: &[&'a [f32]]) -> Tensors<'a> {
    cuts.iter()
        .map(|c| {
            (
                c.name.clone(),
                c.shape.clone(),
                &sources[c.source][c.values.clone()],
            )
        })
        .collect()
}

/// The tensors of `model.safetensors` as cuts of the weights (buffer 0).
pub fn model_cuts(slots: &[Slot]) -> (Vec<Cut>, HashMap<String, String>) {
    let cuts = slots
        .iter()
        .map(|s| Cut {
            name: s.name.clone(),
            shape: s.shape.clone(),
            source: 0,
            values: s.offset..s.offset + s.len,
        })
        .collect();
    (cuts, model_metadata())
}

/// The tensors of `optimizer.safetensors` as cuts of the first (buffer 0)
/// and second (buffer 1) moments, after `step` updates.
pub fn optimizer_cuts(slots: &[Slot], step: u64) -> (Vec<Cut>, HashMap<String, String>) {
    let mut cuts = Vec::new();
    for s in slots {
        for (source, prefix) in [(0, "exp_avg."), (1, "exp_avg_sq.")] {
            cuts.push(Cut {
                name: format!("{prefix}{}", s.name),
                shape: s.shape.clone(),
                source,
                values: s.offset..s.offset + s.len,
            });
        }
    }
    (cuts, optimizer_metadata(step))
}

/// Writes this rank's part `part` of `model.safetensors` ([`write_part`]):
/// `weights` holds the weights of `part`.
pub fn write_model_part(
    dir: &Path,
    slots: &[Slot],
    part: Range<usize>,
    weights: &[f32],
) -> Result<(), CheckpointError> {
    let (cuts, meta) = model_cuts(slots);
    write_part(&dir.join(MODEL_FILE), &cuts, meta, part, &[weights])
}

/// Writes this rank's part `part` of `optimizer.safetensors`
/// ([`write_part`]): `m` and `v` hold the moments of `part`.
pub fn write_optimizer_part(
    dir: &Path,
    slots: &[Slot],
    part: Range<usize>,
    m: &[f32],
    v: &[f32],
    step: u64,
) -> Result<(), CheckpointError> {
    let (cuts, meta) = optimizer_cuts(slots, step);
    write_part(&dir.join(OPTIMIZER_FILE), &cuts, meta, part, &[m, v])
}

/// Writes `model.safetensors` from flat weights; returns its sha256.
pub fn write_model(dir: &Path, slots: &[Slot], weights: &[f32]) -> Result<String, CheckpointError> {
    let (tensors, meta) = model_tensors(slots, weights);
    write_tensors(&dir.join(MODEL_FILE), &tensors, meta)
}

/// Writes `optimizer.safetensors` from the flat moments; returns its sha256.
pub fn write_optimizer(
    dir: &Path,
    slots: &[Slot],
    m: &[f32],
    v: &[f32],
    step: u64,
) -> Result<String, CheckpointError> {
    let (tensors, meta) = optimizer_tensors(slots, m, v, step);
    write_tensors(&dir.join(OPTIMIZER_FILE), &tensors, meta)
}

/// Reads `model.safetensors` straight into `weights` (a flat buffer in
/// `slots` order); a layout difference is an error listing the tensors
/// that differ.
pub fn read_model_into(
    dir: &Path,
    slots: &[Slot],
    weights: &mut [f32],
) -> Result<(), CheckpointError> {
    let path = dir.join(MODEL_FILE);
    let mut f = std::fs::File::open(&path).map_err(io_err(&path))?;
    let (entries, _) = read_header(&path, &mut f)?;
    read_flat_into(&path, &mut f, &entries, slots, "", weights)
}

/// [`read_model_into`] a new buffer.
pub fn read_model(dir: &Path, slots: &[Slot]) -> Result<Vec<f32>, CheckpointError> {
    let mut weights = vec![0f32; slots.last().map_or(0, |s| s.offset + s.len)];
    read_model_into(dir, slots, &mut weights)?;
    Ok(weights)
}

/// Reads `optimizer.safetensors` straight into the first and second
/// moments `m` and `v`; returns the update count.
pub fn read_optimizer_into(
    dir: &Path,
    slots: &[Slot],
    m: &mut [f32],
    v: &mut [f32],
) -> Result<u64, CheckpointError> {
    let path = dir.join(OPTIMIZER_FILE);
    let mut f = std::fs::File::open(&path).map_err(io_err(&path))?;
    let (entries, meta) = read_header(&path, &mut f)?;
    read_flat_into(&path, &mut f, &entries, slots, "exp_avg.", m)?;
    read_flat_into(&path, &mut f, &entries, slots, "exp_avg_sq.", v)?;
    optimizer_step(&path, &meta)
}

/// [`read_optimizer_into`] new buffers: first moments, second moments,
/// update count.
pub fn read_optimizer(
    dir: &Path,
    slots: &[Slot],
) -> Result<(Vec<f32>, Vec<f32>, u64), CheckpointError> {
    let n = slots.last().map_or(0, |s| s.offset + s.len);
    let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
    let step = read_optimizer_into(dir, slots, &mut m, &mut v)?;
    Ok((m, v, step))
}
