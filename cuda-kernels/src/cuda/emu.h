// The CPU emulator of CUDA launches (emu.cpp), as seen by the kernels
// (through portable.cuh) and by Rust (the C ABI at the top; src/ffi.rs
// mirrors it).
//
// A launch runs every block of the grid, one after another, on the calling
// OS thread. Inside a block every CUDA thread is a fiber (ucontext) with a
// stack of its own; the fibers run round-robin and switch only where a
// thread waits: at __syncthreads (for the whole block) and at warp
// operations (for the lanes of its warp: 32, or fewer in a last partial
// warp). A barrier completes when every thread it names has arrived; a
// thread that has returned never arrives, so a barrier in divergent code
// cannot complete. When no fiber can run and some have not finished, the
// launch stops with a deadlock error that names where the threads wait.
// Errors never abort the process: they come back as a code and a message.

#pragma once

#include <stddef.h>
#include <stdint.h>

#include <utility>

extern "C" {

// Grid and block sizes (x, y, z) and the dynamic shared memory in bytes.
typedef struct {
  uint32_t grid[3];
  uint32_t block[3];
  uint64_t shared_bytes;
} stride_launch_t;

// The kernel's arguments as cuLaunchKernel takes them: values[i] points at
// argument i; sizes[i] is its size in bytes (checked against the kernel's
// parameter types).
typedef struct {
  void *const *values;
  const uint64_t *sizes;
  uint64_t count;
} stride_args_t;

enum {
  STRIDE_EMU_OK = 0,
  // The launch configuration is not valid on an H100 (sizes, shared memory).
  STRIDE_EMU_BAD_LAUNCH = 1,
  // Every live thread waits on a barrier that cannot complete.
  STRIDE_EMU_DEADLOCK = 2,
  // A barrier or warp operation used in a way the emulator does not
  // implement or CUDA leaves undefined (divergent barriers, partial masks,
  // reading a lane that does not exist).
  STRIDE_EMU_MISUSE = 3,
  // The argument list does not match the kernel's parameters.
  STRIDE_EMU_BAD_ARGS = 4,
  // Memory for the fibers' stacks or the shared memory could not be had.
  STRIDE_EMU_RESOURCES = 5,
};

typedef struct {
  int32_t code;
  char message[508];
} stride_error_t;

// The order in which a launch runs its blocks and, in every pass of a
// block's scheduler, its fibers: in order (block and thread numbers
// rising, the default), reversed, or shuffled (a new pseudo-random order
// for every pass, from `seed`). For this OS thread's launches from now on.
enum {
  STRIDE_EMU_IN_ORDER = 0,
  STRIDE_EMU_REVERSED = 1,
  STRIDE_EMU_SHUFFLED = 2,
};
void stride_emu_set_schedule(int schedule, uint64_t seed);

// H100 limits the emulator enforces.
#define STRIDE_EMU_MAX_THREADS 1024u
#define STRIDE_EMU_MAX_SHARED_BYTES (227u * 1024u)

} // extern "C"

namespace stride_emu {

struct dim3 {
  unsigned x, y, z;
};

// The current fiber's thread index and its block's geometry.
const dim3 &thread_idx();
const dim3 &block_idx();
const dim3 &block_dim();
const dim3 &grid_dim();
unsigned char *dynamic_shared();

void sync_block(const char *file, int line);
void sync_warp(unsigned mask, const char *file, int line);

enum class Shuffle { Xor, Down, Index };
uint32_t shuffle_bits(Shuffle kind, unsigned mask, uint32_t bits, int arg,
                      const char *file, int line);

// Overloads, not a template: a shuffle of any other type does not compile.
inline float shuffle(Shuffle kind, unsigned mask, float value, int arg,
                     const char *file, int line) {
  uint32_t bits;
  __builtin_memcpy(&bits, &value, sizeof bits);
  bits = shuffle_bits(kind, mask, bits, arg, file, line);
  __builtin_memcpy(&value, &bits, sizeof bits);
  return value;
}
inline int shuffle(Shuffle kind, unsigned mask, int value, int arg,
                   const char *file, int line) {
  return (int)shuffle_bits(kind, mask, (uint32_t)value, arg, file, line);
}
inline unsigned shuffle(Shuffle kind, unsigned mask, unsigned value, int arg,
                        const char *file, int line) {
  return shuffle_bits(kind, mask, value, arg, file, line);
}

// Runs `body(context)` as every thread of every block of `launch`.
int launch(const char *name, const stride_launch_t *launch,
           void (*body)(void *), void *context, stride_error_t *error);

// Sets `error` (code and formatted message); returns the code.
int set_error(stride_error_t *error, int code, const char *format, ...)
    __attribute__((format(printf, 3, 4)));

template <class... A> struct KernelCall {
  void (*kernel)(A...);
  void *const *values;

  template <size_t... I> void run(std::index_sequence<I...>) const {
    kernel(*static_cast<A *>(values[I])...);
  }
  static void body(void *self) {
    static_cast<const KernelCall *>(self)->run(std::index_sequence_for<A...>{});
  }
};

// The launcher behind STRIDE_EMU_LAUNCHER: checks the argument list against
// the kernel's parameter types, then runs the kernel in the emulator. Every
// thread receives its own copy of the arguments, as on the GPU.
template <class... A>
int launch_kernel(const char *name, const stride_launch_t *launch_config,
                  const stride_args_t *args, stride_error_t *error,
                  void (*kernel)(A...)) {
  static_assert(sizeof...(A) > 0, "kernels take arguments");
  constexpr uint64_t sizes[] = {sizeof(A)...};
  if (args == nullptr || args->count != sizeof...(A)) {
    return set_error(error, STRIDE_EMU_BAD_ARGS,
                     "%s takes %zu arguments, %llu were given", name,
                     sizeof...(A),
                     args ? (unsigned long long)args->count : 0ull);
  }
  for (size_t i = 0; i < sizeof...(A); i++) {
    if (args->sizes[i] != sizes[i] || args->values[i] == nullptr) {
      return set_error(error, STRIDE_EMU_BAD_ARGS,
                       "%s: argument %zu is %llu bytes, the kernel takes %llu",
                       name, i, (unsigned long long)args->sizes[i],
                       (unsigned long long)sizes[i]);
    }
  }
  KernelCall<A...> call{kernel, args->values};
  return stride_emu::launch(name, launch_config, &KernelCall<A...>::body,
                            &call, error);
}

} // namespace stride_emu
