//! After its first step, a fused-engine training step touches no new
//! memory: activations, gradients and scratch are allocated once and
//! reused, and the only allocations left — `gemm`'s per-product packing
//! buffers, sized by its cache blocking (≤ kc × n values) rather than by
//! the batch — come back from the heap the worker keeps (its malloc
//! settings, `stride_worker::alloc`). Checked by the process's minor page
//! faults, which count every page the kernel had to hand out; a counting
//! global allocator reports what was still allocated. One test in this
//! file, so that no other test allocates beside it.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use candle_core::Device;
use stride_job::config::{ConfigSource, RawConfig};
use stride_worker::collective::Solo;
use stride_worker::trainer::Trainer;

struct Counting;

static WATCHING: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);
static TOTAL: AtomicUsize = AtomicUsize::new(0);

fn note(size: usize) {
    if WATCHING.load(Ordering::Relaxed) {
        LARGEST.fetch_max(size, Ordering::Relaxed);
        TOTAL.fetch_add(size, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// wrapper only records sizes in atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Minor page faults of this process so far (/proc/self/stat, field 10).
fn minor_faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the parenthesised command name, which may hold spaces.
    let after = &stat[stat.rfind(')').expect("stat format") + 2..];
    after
        .split_whitespace()
        .nth(7)
        .and_then(|f| f.parse().ok())
        .expect("minflt")
}

#[test]
fn after_the_first_step_a_fused_step_touches_no_new_memory() {
    stride_worker::alloc::tune_malloc();
    let (b, t, c) = (16usize, 256usize, 256usize);
    let text = format!(
        "[model]\nn_layer = 2\nn_head = 4\nn_embd = {c}\nvocab_size = 1000\ncontext = {t}\n\
         [data]\nsynthetic_tokens = 100000\n\
         [train]\nglobal_batch = {}\nmicro_batch = {b}\nwarmup_steps = 0\n\
         [worker]\nengine = \"fused\"\n[cluster]\nworkers = 1\n",
        2 * b
    );
    let config = RawConfig::parse(&text, "t".into(), ConfigSource::File("t.toml".into()))
        .and_then(|r| r.resolve())
        .expect("config");
    let mut trainer = Trainer::new(&config, Box::new(Solo), 2, Device::Cpu).expect("trainer");
    let samples: Vec<u64> = (0..2 * b as u64).collect();
    trainer.step(&samples, 1e-3).expect("first step");
    trainer.evaluate(&samples[..b]).expect("first evaluation");

    let faults = minor_faults();
    WATCHING.store(true, Ordering::Relaxed);
    for _ in 0..3 {
        trainer.step(&samples, 1e-3).expect("step");
        trainer.evaluate(&samples[..b]).expect("evaluation");
    }
    WATCHING.store(false, Ordering::Relaxed);
    let faults = minor_faults() - faults;

    // One (B·T, C) f32 activation is 4 MiB = 1,024 pages; the model keeps
    // ~30 of them. Allocating even one per step would fault them in again.
    let activation_pages = b * t * c * 4 / 4096;
    println!(
        "3 steps + 3 evaluations after the first: {faults} minor page faults (one activation = {activation_pages} pages); largest allocation {} B, {} B allocated in all (gemm's packing buffers)",
        LARGEST.load(Ordering::Relaxed),
        TOTAL.load(Ordering::Relaxed)
    );
    assert!(
        faults < activation_pages as u64 / 8,
        "{faults} pages were newly touched during 3 steps (one activation is {activation_pages} pages)"
    );
}
