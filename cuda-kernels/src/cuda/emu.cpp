// The emulator (see emu.h): a launch's blocks one after another, the
// threads of a block as ucontext fibers scheduled round-robin, barriers for
// __syncthreads and for warp operations, deadlock detection.
//
// All state is per OS thread (thread_local): Rust runs tests in parallel
// threads, and each launch runs entirely on the thread that calls it.

#include "emu.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

// Built with STRIDE_EMU_VALGRIND (build.rs: env STRIDE_EMU_VALGRIND=1), the
// fibers' stacks are registered with Valgrind, so that memcheck can run the
// tests and tell a switch between fibers from a huge stack frame.
#if defined(STRIDE_EMU_VALGRIND)
#include <valgrind/valgrind.h>
#define STRIDE_STACK_REGISTER(start, end) VALGRIND_STACK_REGISTER(start, end)
#define STRIDE_STACK_DEREGISTER(id) VALGRIND_STACK_DEREGISTER(id)
#else
#define STRIDE_STACK_REGISTER(start, end) 0u
#define STRIDE_STACK_DEREGISTER(id) ((void)(id))
#endif

namespace stride_emu {
namespace {

// Each fiber's stack. Kernels keep their data in registers-sized locals
// and shared memory; 64 KiB leaves room for the C library's math calls.
constexpr size_t kStackBytes = 64 * 1024;
constexpr unsigned kWarp = 32;
// Bytes after the dynamic shared memory, all-ones, checked after every
// block: a kernel that writes past its shared memory fails its launch
// instead of corrupting the heap.
constexpr size_t kSharedGuard = 1024;

enum class State { Ready, WaitBlock, WaitWarp, Done, Failed };

struct Fiber {
  ucontext_t context;
  dim3 idx;
  unsigned linear; // x + y·bx + z·bx·by, as the GPU numbers threads
  State state;
  const char *file; // where it waits
  int line;
};

enum class WarpOp { None, Sync, Shuffle };

struct Warp {
  unsigned lanes;     // 32, or fewer in a last partial warp
  unsigned full_mask; // the mask naming every lane of this warp
  unsigned arrived;
  // The operation in progress: every lane must call the same one.
  WarpOp op;
  Shuffle kind;
  const char *file;
  int line;
  uint32_t slots[kWarp];
};

struct Launch {
  const char *name;
  dim3 grid, block, block_idx;
  unsigned threads;
  Fiber *fibers;
  unsigned *order; // the fibers in the order of the current pass
  Warp *warps;
  unsigned warp_count;
  unsigned done;
  // __syncthreads in progress.
  unsigned block_arrived;
  const char *block_file;
  int block_line;
  unsigned char *shared;
  uint64_t shared_bytes;
  Fiber *current;
  ucontext_t scheduler;
  void (*body)(void *);
  void *context;
  // A misuse found inside a fiber; the scheduler stops the launch.
  int failure;
  char failure_message[sizeof(stride_error_t::message)];
};

thread_local Launch *tl_launch = nullptr;

// The order fibers and blocks run in (stride_emu_set_schedule): on the GPU
// nothing orders them, so a kernel whose result depends on the order has a
// race; running it in other orders shows that.
thread_local int tl_schedule = STRIDE_EMU_IN_ORDER;
thread_local uint64_t tl_seed = 0;

uint64_t next_random(uint64_t &state) {
  // splitmix64
  state += 0x9e3779b97f4a7c15ull;
  uint64_t z = state;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// A permutation of 0 .. n − 1 (n < 2⁶³) that needs no table: a bijection
// of the next power of two (odd multiply, add, xor-shift, all modulo it),
// walked past the values ≥ n.
struct BlockOrder {
  uint64_t n, mask, mul, add;
  int shift;
  uint64_t next; // position in 0 .. mask
  BlockOrder(uint64_t count, int schedule, uint64_t &state)
      : n(count), mask(1), mul(1), add(0), shift(64), next(0) {
    while (mask < n) {
      mask <<= 1;
    }
    mask -= 1;
    if (schedule == STRIDE_EMU_SHUFFLED) {
      mul = next_random(state) | 1u;
      add = next_random(state);
      shift = 1 + (int)(next_random(state) % 7);
    }
  }
  uint64_t map(uint64_t i) const {
    uint64_t x = (i * mul + add) & mask;
    if (shift < 64) {
      x ^= x >> shift;
    }
    return x;
  }
  // The next block's linear index, in the schedule's order.
  uint64_t take(int schedule) {
    if (schedule == STRIDE_EMU_REVERSED) {
      return n - 1 - next++;
    }
    if (schedule != STRIDE_EMU_SHUFFLED) {
      return next++;
    }
    for (;;) {
      uint64_t x = map(next++);
      if (x < n) {
        return x;
      }
    }
  }
};

Launch &current_launch() { return *tl_launch; }

// Back to the scheduler; returns when the scheduler resumes this fiber.
void yield(Launch &l) {
  Fiber *self = l.current;
  swapcontext(&self->context, &l.scheduler);
}

// Ends the launch with a misuse error, from inside a fiber. Never returns.
[[noreturn]] void fail(Launch &l, const char *format, ...)
    __attribute__((format(printf, 2, 3)));
void fail(Launch &l, const char *format, ...) {
  va_list ap;
  va_start(ap, format);
  vsnprintf(l.failure_message, sizeof l.failure_message, format, ap);
  va_end(ap);
  l.failure = STRIDE_EMU_MISUSE;
  l.current->state = State::Failed;
  swapcontext(&l.current->context, &l.scheduler);
  // The scheduler never resumes a failed fiber.
  abort();
}

bool same_site(const char *file_a, int line_a, const char *file_b, int line_b) {
  return line_a == line_b && strcmp(file_a, file_b) == 0;
}

void fiber_entry() {
  Launch &l = current_launch();
  l.body(l.context);
  // Returning resumes uc_link: the scheduler.
  current_launch().current->state = State::Done;
  current_launch().done++;
}

Warp &warp_of(Launch &l, const Fiber &f) { return l.warps[f.linear / kWarp]; }

// Waits until every lane of the warp has arrived (the arrival that
// completes the barrier releases the others and goes on). With `ends_op`,
// the completing lane also ends the warp's operation, before any lane can
// start the next one.
void warp_barrier(Launch &l, Warp &w, bool ends_op, const char *file,
                  int line) {
  Fiber &self = *l.current;
  w.arrived++;
  if (w.arrived == w.lanes) {
    w.arrived = 0;
    if (ends_op) {
      w.op = WarpOp::None;
    }
    unsigned first = (self.linear / kWarp) * kWarp;
    for (unsigned t = first; t < first + w.lanes; t++) {
      if (l.fibers[t].state == State::WaitWarp) {
        l.fibers[t].state = State::Ready;
      }
    }
    return;
  }
  self.state = State::WaitWarp;
  self.file = file;
  self.line = line;
  yield(l);
}

// The start of a warp operation: the mask must name exactly the warp's
// lanes, and every lane must be at the same operation.
void begin_warp_op(Launch &l, Warp &w, WarpOp op, Shuffle kind, unsigned mask,
                   const char *file, int line) {
  const char *what = op == WarpOp::Sync ? "__syncwarp" : "a warp shuffle";
  if (mask != w.full_mask) {
    fail(l,
         "%s at %s:%d: mask 0x%08x, but only whole-warp operations are "
         "emulated (this warp's lanes are 0x%08x)",
         what, file, line, mask, w.full_mask);
  }
  // Lanes arrive for the first phase only while no phase is half done.
  if (w.op == WarpOp::None) {
    w.op = op;
    w.kind = kind;
    w.file = file;
    w.line = line;
  } else if (w.op != op || w.kind != kind ||
             !same_site(w.file, w.line, file, line)) {
    fail(l,
         "divergent warp: thread %u is at %s (%s:%d) while another lane of "
         "its warp is at %s:%d",
         l.current->linear, what, file, line, w.file, w.line);
  }
}

int bad_launch(stride_error_t *error, const char *name, const char *why,
               unsigned long long value, unsigned long long limit) {
  return set_error(error, STRIDE_EMU_BAD_LAUNCH,
                   "%s: invalid launch: %s is %llu (at most %llu on an H100)",
                   name, why, value, limit);
}

int check_config(const char *name, const stride_launch_t &c,
                 stride_error_t *error) {
  for (int i = 0; i < 3; i++) {
    if (c.grid[i] == 0 || c.block[i] == 0) {
      return set_error(error, STRIDE_EMU_BAD_LAUNCH,
                       "%s: invalid launch: grid (%u, %u, %u), block "
                       "(%u, %u, %u): every size must be at least 1",
                       name, c.grid[0], c.grid[1], c.grid[2], c.block[0],
                       c.block[1], c.block[2]);
    }
  }
  if (c.grid[0] > 0x7fffffffu) {
    return bad_launch(error, name, "grid.x", c.grid[0], 0x7fffffffu);
  }
  if (c.grid[1] > 65535u || c.grid[2] > 65535u) {
    return bad_launch(error, name, "grid.y or grid.z",
                      c.grid[1] > c.grid[2] ? c.grid[1] : c.grid[2], 65535u);
  }
  if (c.block[0] > 1024u || c.block[1] > 1024u) {
    return bad_launch(error, name, "block.x or block.y",
                      c.block[0] > c.block[1] ? c.block[0] : c.block[1], 1024u);
  }
  if (c.block[2] > 64u) {
    return bad_launch(error, name, "block.z", c.block[2], 64u);
  }
  unsigned long long threads =
      (unsigned long long)c.block[0] * c.block[1] * c.block[2];
  if (threads > STRIDE_EMU_MAX_THREADS) {
    return bad_launch(error, name, "the number of threads per block", threads,
                      STRIDE_EMU_MAX_THREADS);
  }
  if (c.shared_bytes > STRIDE_EMU_MAX_SHARED_BYTES) {
    return bad_launch(error, name, "the dynamic shared memory in bytes",
                      c.shared_bytes, STRIDE_EMU_MAX_SHARED_BYTES);
  }
  return STRIDE_EMU_OK;
}

// The deadlock report: where the threads that cannot go on wait.
int report_deadlock(Launch &l, stride_error_t *error) {
  char text[sizeof error->message];
  int used = snprintf(text, sizeof text,
                      "%s: deadlock in block (%u, %u, %u): ", l.name,
                      l.block_idx.x, l.block_idx.y, l.block_idx.z);
  // Group the waiting threads by what they wait at, in thread order.
  bool *reported = static_cast<bool *>(calloc(l.threads, sizeof(bool)));
  for (unsigned t = 0; t < l.threads && used < (int)sizeof text; t++) {
    const Fiber &f = l.fibers[t];
    if (reported == nullptr || reported[t] || f.state == State::Done) {
      continue;
    }
    unsigned count = 0;
    unsigned first_warp = f.linear / kWarp;
    bool warp = f.state == State::WaitWarp;
    for (unsigned u = t; u < l.threads; u++) {
      const Fiber &g = l.fibers[u];
      if (!reported[u] && g.state == f.state &&
          same_site(g.file, g.line, f.file, f.line) &&
          (!warp || g.linear / kWarp == first_warp)) {
        reported[u] = true;
        count++;
      }
    }
    if (warp) {
      used += snprintf(text + used, sizeof text - used,
                       "%u thread(s) of warp %u wait at a warp operation "
                       "(%s:%d); ",
                       count, first_warp, f.file, f.line);
    } else {
      used += snprintf(text + used, sizeof text - used,
                       "%u thread(s) wait at __syncthreads (%s:%d); ", count,
                       f.file, f.line);
    }
  }
  free(reported);
  if (used < (int)sizeof text) {
    snprintf(text + used, sizeof text - used,
             "%u of %u thread(s) have returned, so the barrier cannot "
             "complete (a barrier in divergent code?)",
             l.done, l.threads);
  }
  return set_error(error, STRIDE_EMU_DEADLOCK, "%s", text);
}

// Thread t's fiber, ready to start the kernel on `stack`. (A function of
// its own: getcontext returns twice in principle, though this context is
// only ever entered through makecontext's entry point.)
__attribute__((noinline)) bool init_fiber(Launch &l, unsigned t, char *stack) {
  Fiber &f = l.fibers[t];
  f.linear = t;
  f.idx = dim3{t % l.block.x, (t / l.block.x) % l.block.y,
               t / (l.block.x * l.block.y)};
  f.state = State::Ready;
  f.file = "";
  f.line = 0;
  if (getcontext(&f.context) != 0) {
    return false;
  }
  f.context.uc_stack.ss_sp = stack;
  f.context.uc_stack.ss_size = kStackBytes;
  f.context.uc_link = &l.scheduler;
  makecontext(&f.context, fiber_entry, 0);
  return true;
}

// Runs one block to its end; returns an error code.
int run_block(Launch &l, stride_error_t *error, char *stacks, size_t stride) {
  l.done = 0;
  l.block_arrived = 0;
  l.block_file = nullptr;
  for (unsigned w = 0; w < l.warp_count; w++) {
    Warp &warp = l.warps[w];
    warp.arrived = 0;
    warp.op = WarpOp::None;
  }
  // Shared memory starts undefined on the GPU: all-ones bytes are NaN as
  // f32 and bf16, so a read before any write shows in the results.
  memset(l.shared, 0xff, l.shared_bytes + kSharedGuard);
  for (unsigned t = 0; t < l.threads; t++) {
    if (!init_fiber(l, t, stacks + t * stride)) {
      return set_error(error, STRIDE_EMU_RESOURCES, "%s: getcontext failed",
                       l.name);
    }
  }
  for (unsigned t = 0; t < l.threads; t++) {
    l.order[t] = tl_schedule == STRIDE_EMU_REVERSED ? l.threads - 1 - t : t;
  }
  for (;;) {
    if (tl_schedule == STRIDE_EMU_SHUFFLED) {
      // A new order for every pass (Fisher-Yates).
      for (unsigned t = l.threads - 1; t > 0; t--) {
        unsigned u = (unsigned)(next_random(tl_seed) % (t + 1));
        unsigned keep = l.order[t];
        l.order[t] = l.order[u];
        l.order[u] = keep;
      }
    }
    bool ran = false;
    for (unsigned k = 0; k < l.threads; k++) {
      Fiber &f = l.fibers[l.order[k]];
      if (f.state != State::Ready) {
        continue;
      }
      ran = true;
      l.current = &f;
      swapcontext(&l.scheduler, &f.context);
      l.current = nullptr;
      if (l.failure != STRIDE_EMU_OK) {
        return set_error(error, l.failure, "%s: block (%u, %u, %u): %s",
                         l.name, l.block_idx.x, l.block_idx.y, l.block_idx.z,
                         l.failure_message);
      }
    }
    if (l.done == l.threads) {
      for (size_t i = 0; i < kSharedGuard; i++) {
        if (l.shared[l.shared_bytes + i] != 0xff) {
          return set_error(error, STRIDE_EMU_MISUSE,
                           "%s: block (%u, %u, %u) wrote past its %llu bytes "
                           "of dynamic shared memory (at byte %llu)",
                           l.name, l.block_idx.x, l.block_idx.y,
                           l.block_idx.z, (unsigned long long)l.shared_bytes,
                           (unsigned long long)(l.shared_bytes + i));
        }
      }
      return STRIDE_EMU_OK;
    }
    if (!ran) {
      return report_deadlock(l, error);
    }
  }
}

} // namespace

const dim3 &thread_idx() { return current_launch().current->idx; }
const dim3 &block_idx() { return current_launch().block_idx; }
const dim3 &block_dim() { return current_launch().block; }
const dim3 &grid_dim() { return current_launch().grid; }
unsigned char *dynamic_shared() { return current_launch().shared; }

void sync_block(const char *file, int line) {
  Launch &l = current_launch();
  Fiber &self = *l.current;
  if (l.block_arrived == 0) {
    l.block_file = file;
    l.block_line = line;
  } else if (!same_site(l.block_file, l.block_line, file, line)) {
    fail(l,
         "divergent __syncthreads: thread %u is at %s:%d while others wait "
         "at %s:%d",
         self.linear, file, line, l.block_file, l.block_line);
  }
  l.block_arrived++;
  if (l.block_arrived == l.threads) {
    l.block_arrived = 0;
    for (unsigned t = 0; t < l.threads; t++) {
      if (l.fibers[t].state == State::WaitBlock) {
        l.fibers[t].state = State::Ready;
      }
    }
    return;
  }
  self.state = State::WaitBlock;
  self.file = file;
  self.line = line;
  yield(l);
}

void sync_warp(unsigned mask, const char *file, int line) {
  Launch &l = current_launch();
  Warp &w = warp_of(l, *l.current);
  begin_warp_op(l, w, WarpOp::Sync, Shuffle::Index, mask, file, line);
  warp_barrier(l, w, true, file, line);
}

uint32_t shuffle_bits(Shuffle kind, unsigned mask, uint32_t bits, int arg,
                      const char *file, int line) {
  Launch &l = current_launch();
  Fiber &self = *l.current;
  Warp &w = warp_of(l, self);
  begin_warp_op(l, w, WarpOp::Shuffle, kind, mask, file, line);
  if (arg < 0 || arg >= (int)kWarp) {
    fail(l, "warp shuffle at %s:%d: lane argument %d (only 0..31 is emulated)",
         file, line, arg);
  }
  unsigned lane = self.linear % kWarp;
  w.slots[lane] = bits;
  // Phase 1: every lane has written its value.
  warp_barrier(l, w, false, file, line);
  unsigned source = lane;
  switch (kind) {
  case Shuffle::Xor:
    source = lane ^ (unsigned)arg;
    break;
  case Shuffle::Down:
    // Past the end of the warp a lane keeps its own value.
    source = lane + (unsigned)arg < kWarp ? lane + (unsigned)arg : lane;
    break;
  case Shuffle::Index:
    source = (unsigned)arg;
    break;
  }
  if (source >= w.lanes) {
    fail(l,
         "warp shuffle at %s:%d: lane %u reads lane %u, which this partial "
         "warp of %u lanes does not have",
         file, line, lane, source, w.lanes);
  }
  uint32_t result = w.slots[source];
  // Phase 2: every lane has read, so the slots may be written again.
  warp_barrier(l, w, true, file, line);
  return result;
}

int set_error(stride_error_t *error, int code, const char *format, ...) {
  if (error != nullptr) {
    error->code = code;
    va_list ap;
    va_start(ap, format);
    vsnprintf(error->message, sizeof error->message, format, ap);
    va_end(ap);
  }
  return code;
}

int launch(const char *name, const stride_launch_t *config,
           void (*body)(void *), void *context, stride_error_t *error) {
  if (error != nullptr) {
    error->code = STRIDE_EMU_OK;
    error->message[0] = '\0';
  }
  if (config == nullptr) {
    return set_error(error, STRIDE_EMU_BAD_LAUNCH, "%s: no launch config",
                     name);
  }
  int code = check_config(name, *config, error);
  if (code != STRIDE_EMU_OK) {
    return code;
  }
  if (tl_launch != nullptr) {
    return set_error(error, STRIDE_EMU_MISUSE,
                     "%s: launched from inside a kernel", name);
  }

  Launch l{};
  l.name = name;
  l.grid = dim3{config->grid[0], config->grid[1], config->grid[2]};
  l.block = dim3{config->block[0], config->block[1], config->block[2]};
  l.threads = l.block.x * l.block.y * l.block.z;
  l.warp_count = (l.threads + kWarp - 1) / kWarp;
  l.shared_bytes = config->shared_bytes;
  l.body = body;
  l.context = context;

  // Stacks once per launch, reused by every block; a guard page under each
  // turns an overflow into a fault instead of silent corruption.
  const size_t page = (size_t)sysconf(_SC_PAGESIZE);
  const size_t stride = kStackBytes + page;
  const size_t mapped = stride * l.threads;
  void *region = mmap(nullptr, mapped, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (region == MAP_FAILED) {
    return set_error(error, STRIDE_EMU_RESOURCES,
                     "%s: no memory for %u fiber stacks", name, l.threads);
  }
  char *base = static_cast<char *>(region);
  unsigned *stack_ids = static_cast<unsigned *>(calloc(l.threads, sizeof(unsigned)));
  for (unsigned t = 0; t < l.threads; t++) {
    // Layout per fiber: [guard page | stack]; stacks grow down into it.
    char *stack = base + t * stride;
    mprotect(stack, page, PROT_NONE);
    if (stack_ids != nullptr) {
      stack_ids[t] = STRIDE_STACK_REGISTER(stack + page, stack + stride);
    }
  }
  l.fibers = static_cast<Fiber *>(calloc(l.threads, sizeof(Fiber)));
  l.order = static_cast<unsigned *>(calloc(l.threads, sizeof(unsigned)));
  l.warps = static_cast<Warp *>(calloc(l.warp_count, sizeof(Warp)));
  l.shared = static_cast<unsigned char *>(aligned_alloc(
      128, (l.shared_bytes + kSharedGuard + 127) / 128 * 128));
  if (l.fibers == nullptr || l.order == nullptr || l.warps == nullptr ||
      l.shared == nullptr) {
    code = set_error(error, STRIDE_EMU_RESOURCES, "%s: out of memory", name);
  } else {
    for (unsigned w = 0; w < l.warp_count; w++) {
      unsigned lanes = l.threads - w * kWarp;
      lanes = lanes < kWarp ? lanes : kWarp;
      l.warps[w].lanes = lanes;
      l.warps[w].full_mask =
          lanes == kWarp ? 0xffffffffu : ((1u << lanes) - 1u);
    }
    tl_launch = &l;
    const uint64_t blocks = (uint64_t)l.grid.x * l.grid.y * l.grid.z;
    BlockOrder order(blocks, tl_schedule, tl_seed);
    for (uint64_t b = 0; b < blocks && code == STRIDE_EMU_OK; b++) {
      const uint64_t i = order.take(tl_schedule);
      l.block_idx = dim3{(unsigned)(i % l.grid.x),
                         (unsigned)(i / l.grid.x % l.grid.y),
                         (unsigned)(i / ((uint64_t)l.grid.x * l.grid.y))};
      code = run_block(l, error, base + page, stride);
    }
    tl_launch = nullptr;
  }
  free(l.shared);
  free(l.warps);
  free(l.order);
  free(l.fibers);
  if (stack_ids != nullptr) {
    for (unsigned t = 0; t < l.threads; t++) {
      STRIDE_STACK_DEREGISTER(stack_ids[t]);
    }
    free(stack_ids);
  }
  munmap(region, mapped);
  return code;
}

} // namespace stride_emu

extern "C" void stride_emu_set_schedule(int schedule, uint64_t seed) {
  stride_emu::tl_schedule = schedule;
  stride_emu::tl_seed = seed;
}
