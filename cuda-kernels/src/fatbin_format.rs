// The container format of a CUDA fatbin, as far as this crate reads it:
// build.rs checks the fatbin nvcc made with it (through include!, hence no
// inner doc comment here), and a test checks FATBIN.
//
// A fatbin is one or more containers, each a 16-byte header (u32 magic
// 0xBA55ED50, u16 version, u16 header size, u64 size of the entries that
// follow) and entries, each a header (u16 kind: 1 PTX, 2 ELF cubin; u16;
// u32 header size; u32 padded payload size; ...; u32 SM architecture at
// byte 28; u64 flags at byte 40) followed by its payload. (The layout as
// cuobjdump reads it; NVIDIA does not document it.)

/// An entry's kind: PTX text (possibly compressed).
pub const FATBIN_PTX: u16 = 1;
/// An entry's kind: an ELF cubin of SASS.
pub const FATBIN_ELF: u16 = 2;

/// One entry of a fatbin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FatbinEntry {
    /// [`FATBIN_PTX`], [`FATBIN_ELF`] or another kind.
    pub kind: u16,
    /// The SM architecture (90 for sm_90 / compute_90).
    pub arch: u32,
    /// Where its payload starts in the fatbin.
    pub offset: usize,
    /// Its payload's length (padded).
    pub len: usize,
}

/// The entries of every container of `bytes`, in order; stops at the
/// first thing that is not a well-formed container.
pub fn fatbin_entries(bytes: &[u8]) -> Vec<FatbinEntry> {
    let u16_at = |at: usize| {
        bytes
            .get(at..at.checked_add(2)?)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        bytes
            .get(at..at.checked_add(4)?)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |at: usize| Some(u64::from(u32_at(at)?) | (u64::from(u32_at(at + 4)?) << 32));
    let mut entries = Vec::new();
    let mut container = 0usize;
    while u32_at(container) == Some(0xBA55_ED50) {
        let (Some(header), Some(size)) = (u16_at(container + 6), u64_at(container + 8)) else {
            break;
        };
        let Some(end) = usize::try_from(size)
            .ok()
            .and_then(|s| (container + usize::from(header)).checked_add(s))
            .filter(|&e| e <= bytes.len())
        else {
            break;
        };
        let mut at = container + usize::from(header);
        while at + 64 <= end {
            let (Some(kind), Some(entry_header), Some(payload), Some(arch)) =
                (u16_at(at), u32_at(at + 4), u32_at(at + 8), u32_at(at + 28))
            else {
                break;
            };
            let offset = at + entry_header as usize;
            if entry_header < 64 || offset + payload as usize > end {
                break;
            }
            entries.push(FatbinEntry {
                kind,
                arch,
                offset,
                len: payload as usize,
            });
            at = offset + payload as usize;
        }
        container = end;
    }
    entries
}
