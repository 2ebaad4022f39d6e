//! The safetensors crate's own writer and reader: the reference the
//! streaming [`super::write_tensors`] and the direct reads are held to in
//! tests and measured against in the bench. Not part of the format's API
//! (`#[doc(hidden)]`): only the tests and `bench` use it.

use super::*;

/// A flat `f32` buffer's slice as a safetensors view.
struct F32View<'a> {
    shape: &'a [usize],
    data: &'a [f32],
}

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.data.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.data.len() * 4
    }
}

/// [`write_tensors`](super::write_tensors) through the safetensors
/// crate: serialise, fsync, then hash by reading the file back.
pub fn write_tensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, &[f32])],
    metadata: HashMap<String, String>,
) -> Result<String, CheckpointError> {
    let views = tensors
        .iter()
        .map(|(n, s, d)| (n.clone(), F32View { shape: s, data: d }));
    safetensors::tensor::serialize_to_file(views, Some(metadata), path).map_err(|e| {
        CheckpointError::Invalid {
            path: path.to_path_buf(),
            message: format!("cannot write: {e}"),
        }
    })?;
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err(path))?;
    sha256_file(path)
}

/// [`write_model`](super::write_model) through the safetensors crate.
pub fn write_model(dir: &Path, slots: &[Slot], weights: &[f32]) -> Result<String, CheckpointError> {
    let (tensors, meta) = model_tensors(slots, weights);
    write_tensors(&dir.join(MODEL_FILE), &tensors, meta)
}

/// [`write_optimizer`](super::write_optimizer) through the
/// safetensors crate.
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

/// Every tensor of an f32 safetensors file, and its metadata, through
/// the safetensors crate (the whole file read into memory first).
pub fn read_tensors(
    path: &Path,
) -> Result<(Vec<NamedTensor>, HashMap<String, String>), CheckpointError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let invalid = |m: String| CheckpointError::Invalid {
        path: path.to_path_buf(),
        message: m,
    };
    let (_, meta) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| invalid(format!("not a safetensors file: {e}")))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| invalid(format!("not a safetensors file: {e}")))?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(invalid(format!(
                "tensor {name} is {:?}, expected F32",
                view.dtype()
            )));
        }
        let data = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.push(NamedTensor {
            name,
            shape: view.shape().to_vec(),
            data,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((out, meta.metadata().clone().unwrap_or_default()))
}
