// CPU executor runtime: runs one kernel body per GPU thread as a fiber.
//
// A launch walks the threadgroups one after another.  Inside a threadgroup every thread is a
// fiber with its own stack; fibers run round-robin until they block at a barrier, so the body's
// code runs exactly as written for the GPU (SIMT, one thread at a time).  Three kinds of
// synchronisation are honoured:
//   - threadgroup barrier: every thread of the group must arrive;
//   - simdgroup (warp) barrier: every lane of the warp must arrive;
//   - warp collectives (shuffles, simdgroup MMA, ldmatrix): each lane publishes its operand into
//     a per-warp scratch slot, waits at a warp barrier, then reads the other lanes' operands.
//     Slots alternate between two buffers so one barrier per collective suffices: a lane can be
//     at most one collective ahead of the slowest lane of its warp.
// A thread that returns while others wait at a barrier, lanes waiting at different kinds of
// barrier, or a barrier that can never complete is reported as an error, not a hang.  So is a
// device access (an async copy's source, a store, an atomic add, a bulk reduction's destination)
// outside every buffer of the launch, or an async copy's destination outside the group's shared
// memory: the GPU would read or write out of bounds there.  Built with AddressSanitizer
// ($MFA_EMULATOR_SANITIZE=address, mfa/kernels/emulator.py), the context switches tell ASan
// which fiber stack runs, so that it also checks every plain load and store of a kernel body.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace emu {

constexpr int kWarp = 32;
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kScratchBytes = 64;  // per lane and slot: the largest collective operand

enum class State { Ready, AtGroupBarrier, AtWarpBarrier, Done };

struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes;  // bytes taken from src; the rest of `size` is zero-filled
  int size;   // bytes written to dst: 16, or 4 (mfa_copy4)
};

struct Fiber {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  char* stack = nullptr;
  State state = State::Ready;
  int tid = 0, warp = 0, lane = 0;
  unsigned collective = 0;                // number of warp collectives done (picks the slot)
  std::vector<AsyncCopy> pending;         // cp.async copies not yet completed
  std::vector<size_t> group_ends;         // committed async groups: end offsets into `pending`
  std::vector<std::function<void()>> wgmma_pending;  // wgmmas issued, not yet waited for
  std::vector<std::function<void()>> bulk_pending;   // bulk reductions issued, not yet waited for
  void* asan_fake_stack = nullptr;        // ASan builds: this fiber's fake stack while switched out
};

struct Group;

struct Range {
  const unsigned char* lo;
  size_t bytes;
};

struct Launch {
  std::function<void(int, int, int, int)> body;  // (group x, y, z, thread index)
  std::vector<Range> buffers;                     // the kernel's inputs and outputs
  std::string error;
};

struct Group {
  int nthreads = 0, nwarps = 0;
  int gx = 0, gy = 0, gz = 0;
  std::vector<Fiber> fibers;
  std::vector<unsigned char> smem;
  unsigned char* smem_base = nullptr;  // smem's 1024-byte aligned start
  size_t smem_bytes = 0;               // the bytes the kernel asked for
  bool smem_ready = false;
  std::vector<unsigned char> scratch;     // [warp][slot][lane][kScratchBytes]
  int done = 0;
  bool copies_early = false;  // $MFA_EMU_COPIES=early: async copies land at issue
  Launch* launch = nullptr;
  void* asan_fake_stack = nullptr;         // ASan builds: the scheduler's, while a fiber runs
  const void* sched_stack_bottom = nullptr;  // ASan builds: the scheduler's stack
  size_t sched_stack_size = 0;
#if defined(__x86_64__)
  void* sched_sp = nullptr;
#else
  ucontext_t sched_ctx;
#endif
};

inline thread_local Group* g_group = nullptr;
inline thread_local Fiber* g_fiber = nullptr;

// ---- context switch -------------------------------------------------------------------------

#if defined(__x86_64__)
extern "C" void mfa_emu_switch(void** save_sp, void* load_sp);
extern "C" void mfa_emu_trampoline();
asm(R"(
.text
.globl mfa_emu_switch
.hidden mfa_emu_switch
.type mfa_emu_switch,@function
mfa_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size mfa_emu_switch,.-mfa_emu_switch
.globl mfa_emu_trampoline
.hidden mfa_emu_trampoline
.type mfa_emu_trampoline,@function
mfa_emu_trampoline:
  movq %r12, %rdi
  callq *%r13
  ud2
.size mfa_emu_trampoline,.-mfa_emu_trampoline
)");
#endif

void fiber_main(Fiber* f);

// ASan builds: a context switch is announced before it happens (the stack about to run) and
// completed after it (on the new stack); elsewhere these do nothing.
inline void asan_switch_start(void** fake_stack_save, const void* bottom, size_t size) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(fake_stack_save, bottom, size);
#else
  (void)fake_stack_save, (void)bottom, (void)size;
#endif
}
inline void asan_switch_finish(void* fake_stack_save, const void** bottom_old, size_t* size_old) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(fake_stack_save, bottom_old, size_old);
#else
  (void)fake_stack_save, (void)bottom_old, (void)size_old;
#endif
}

inline void fiber_entry(Fiber* f) {
  asan_switch_finish(nullptr, &g_group->sched_stack_bottom, &g_group->sched_stack_size);
  fiber_main(f);
}

#if !defined(__x86_64__)
inline void fiber_entry_ucontext(unsigned hi, unsigned lo) {
  fiber_entry(reinterpret_cast<Fiber*>((uintptr_t(hi) << 32) | uintptr_t(lo)));
}
#endif

inline void fiber_init(Fiber& f) {
#if defined(__SANITIZE_ADDRESS__)
  // frames of the stack's previous fiber that never returned leave their redzones poisoned
  __asan_unpoison_memory_region(f.stack, kStackBytes);
#endif
  f.asan_fake_stack = nullptr;
#if defined(__x86_64__)
  // Stack image popped by mfa_emu_switch: mxcsr/fpu word, r15, r14, r13, r12, rbx, rbp, return.
  uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + kStackBytes) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = reinterpret_cast<uint64_t>(&mfa_emu_trampoline);     // return address: after the
                                                               // ret, rsp = top (16-aligned)
  *--sp = 0;                                                   // rbp
  *--sp = 0;                                                   // rbx
  *--sp = reinterpret_cast<uint64_t>(&f);                      // r12: argument
  *--sp = reinterpret_cast<uint64_t>(&fiber_entry);            // r13: entry
  *--sp = 0;                                                   // r14
  *--sp = 0;                                                   // r15
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  *--sp = uint64_t(mxcsr) | (uint64_t(fpucw) << 32);
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = nullptr;
  uintptr_t p = reinterpret_cast<uintptr_t>(&f);
  makecontext(&f.ctx, reinterpret_cast<void (*)()>(&fiber_entry_ucontext), 2, unsigned(p >> 32),
              unsigned(p & 0xffffffffu));
#endif
}

inline void switch_to_fiber(Group& g, Fiber& f) {
  g_fiber = &f;
  asan_switch_start(&g.asan_fake_stack, f.stack, kStackBytes);
#if defined(__x86_64__)
  mfa_emu_switch(&g.sched_sp, f.sp);
#else
  swapcontext(&g.sched_ctx, &f.ctx);
#endif
  asan_switch_finish(g.asan_fake_stack, nullptr, nullptr);
  g_fiber = nullptr;
}

inline void yield_to_scheduler() {
  Group& g = *g_group;
  Fiber& f = *g_fiber;
  asan_switch_start(&f.asan_fake_stack, g.sched_stack_bottom, g.sched_stack_size);
#if defined(__x86_64__)
  mfa_emu_switch(&f.sp, g.sched_sp);
#else
  swapcontext(&f.ctx, &g.sched_ctx);
#endif
  asan_switch_finish(f.asan_fake_stack, &g.sched_stack_bottom, &g.sched_stack_size);
}

// ---- errors ---------------------------------------------------------------------------------

inline void fail(const std::string& msg) {
  Group& g = *g_group;
  if (g.launch->error.empty()) {
    char where[96];
    std::snprintf(where, sizeof(where), " (threadgroup (%d, %d, %d), thread %d)", g.gx, g.gy,
                  g.gz, g_fiber ? g_fiber->tid : -1);
    g.launch->error = msg + where;
  }
}

// A fiber that hit an error parks forever; the scheduler sees the error and abandons the group.
[[noreturn]] inline void fail_and_park(const std::string& msg) {
  fail(msg);
  for (;;) {
    g_fiber->state = State::AtGroupBarrier;
    yield_to_scheduler();
  }
}

inline void fiber_main(Fiber* f) {
  Group& g = *g_group;
  g.launch->body(g.gx, g.gy, g.gz, f->tid);
  if (!f->pending.empty())
    fail("kernel returned with cp.async copies never waited for");
  if (!f->wgmma_pending.empty())
    fail("kernel returned with wgmma products never waited for");
  if (!f->bulk_pending.empty())
    fail("kernel returned with bulk reductions never waited for");
  f->state = State::Done;
  ++g.done;
  for (;;) yield_to_scheduler();
}

// ---- barriers -------------------------------------------------------------------------------

inline void group_barrier() {
  Fiber& f = *g_fiber;
  if (g_group->done > 0)
    fail_and_park("threadgroup barrier reached after other threads of the group returned");
  f.state = State::AtGroupBarrier;
  yield_to_scheduler();
}

inline void warp_barrier() {
  Fiber& f = *g_fiber;
  f.state = State::AtWarpBarrier;
  yield_to_scheduler();
}

// The 32 lanes' operands of one collective, read in place from the warp's scratch slot.
template <typename V>
struct Lanes {
  const unsigned char* base;
  V operator[](int lane) const {
    V v;
    std::memcpy(&v, base + size_t(lane) * kScratchBytes, sizeof(V));
    return v;
  }
};

// Publish `mine` to the lanes of this warp and return all 32 lanes' values (valid until the
// next-but-one collective of this warp).
template <typename V>
inline Lanes<V> warp_exchange(const V& mine) {
  static_assert(sizeof(V) <= kScratchBytes, "collective operand too large");
  Group& g = *g_group;
  Fiber& f = *g_fiber;
  unsigned slot = f.collective++ & 1u;
  unsigned char* base =
      g.scratch.data() + ((size_t(f.warp) * 2 + slot) * kWarp) * kScratchBytes;
  std::memcpy(base + size_t(f.lane) * kScratchBytes, &mine, sizeof(V));
  warp_barrier();
  return Lanes<V>{base};
}

inline int lane_id() { return g_fiber->lane; }

// ---- threadgroup memory ---------------------------------------------------------------------

// The group's shared memory, filled with 0xFF bytes (NaN) so reads of unwritten words show up;
// 1024-byte aligned, as the CUDA prelude declares it (wgmma's swizzle works on address bits).
inline unsigned char* shared_memory(size_t bytes) {
  Group& g = *g_group;
  if (!g.smem_ready) {
    g.smem.assign(bytes + 1024, 0xFF);
    uintptr_t p = reinterpret_cast<uintptr_t>(g.smem.data());
    g.smem_base = reinterpret_cast<unsigned char*>((p + 1023) & ~uintptr_t(1023));
    g.smem_bytes = bytes;
    g.smem_ready = true;
  } else if (bytes != g.smem_bytes) {
    fail_and_park("threads of one group asked for different shared memory sizes");
  }
  return g.smem_base;
}

// ---- bounds of device and shared accesses ---------------------------------------------------

inline bool inside(const void* p, size_t bytes, const unsigned char* lo, size_t size) {
  const unsigned char* a = static_cast<const unsigned char*>(p);
  return a >= lo && a + bytes <= lo + size;
}

// `bytes` of device memory at p lie in one buffer of the launch (else the thread fails and parks).
inline void check_device(const void* p, size_t bytes, const char* what) {
  for (const Range& r : g_group->launch->buffers)
    if (inside(p, bytes, r.lo, r.bytes)) return;
  char msg[160];
  std::snprintf(msg, sizeof(msg), "%s of %zu bytes at %p is outside every buffer of the launch", what, bytes, p);
  fail_and_park(msg);
}

// `bytes` of threadgroup memory at p lie in the group's shared memory.
inline void check_shared(const void* p, size_t bytes, const char* what) {
  const Group& g = *g_group;
  if (g.smem_ready && inside(p, bytes, g.smem_base, g.smem_bytes)) return;
  char msg[160];
  std::snprintf(msg, sizeof(msg), "%s of %zu bytes at offset %td is outside the %zu bytes of shared memory", what,
                bytes, static_cast<const unsigned char*>(p) - g.smem_base, g.smem_bytes);
  fail_and_park(msg);
}

// ---- async copies (cp.async semantics: data lands only at the matching wait) ----------------
// A copy may land anywhere between its issue and its wait.  By default it lands at the wait, so
// a read of the tile before that wait sees stale data; with $MFA_EMU_COPIES=early it lands at
// the issue, so a refill of a tile that a product in flight (wgmma, read at its wait) still
// reads shows up instead.

inline void async_copy(void* dst, const void* src, int src_bytes, int size) {
  check_shared(dst, size_t(size), "async copy destination");
  if (src_bytes > 0) check_device(src, size_t(src_bytes), "async copy source");
  if (g_group->copies_early) {
    unsigned char* d = static_cast<unsigned char*>(dst);
    std::memcpy(d, src, size_t(src_bytes));
    std::memset(d + src_bytes, 0, size_t(size - src_bytes));
    return;
  }
  g_fiber->pending.push_back({dst, src, src_bytes, size});
}

inline void async_commit() {
  g_fiber->group_ends.push_back(g_fiber->pending.size());
}

inline void async_wait(int keep_groups) {
  Fiber& f = *g_fiber;
  int ngroups = int(f.group_ends.size());
  if (ngroups <= keep_groups) return;
  size_t end = f.group_ends[ngroups - keep_groups - 1];
  for (size_t i = 0; i < end; ++i) {
    AsyncCopy& c = f.pending[i];
    unsigned char* d = static_cast<unsigned char*>(c.dst);
    std::memcpy(d, c.src, size_t(c.bytes));
    std::memset(d + c.bytes, 0, size_t(c.size - c.bytes));
  }
  f.pending.erase(f.pending.begin(), f.pending.begin() + long(end));
  f.group_ends.erase(f.group_ends.begin(), f.group_ends.begin() + (ngroups - keep_groups));
  for (size_t& e : f.group_ends) e -= end;
}

// ---- bulk reductions (cp.reduce.async.bulk: the source is read only at the wait) -------------

inline void bulk_add(float* dst, const float* src, int bytes) {
  if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) | uintptr_t(bytes)) % 16 != 0)
    fail("bulk reduction with an address or size that is not a multiple of 16 bytes");
  check_device(dst, size_t(bytes), "bulk reduction destination");
  check_shared(src, size_t(bytes), "bulk reduction source");
  g_fiber->bulk_pending.push_back([=]() {
    for (int e = 0; e < bytes / 4; ++e) dst[e] += src[e];
  });
}

inline void bulk_wait() {
  Fiber& f = *g_fiber;
  for (auto& add : f.bulk_pending) add();
  f.bulk_pending.clear();
}

// ---- scheduler ------------------------------------------------------------------------------

inline const char* state_name(State s) {
  switch (s) {
    case State::Ready: return "running";
    case State::AtGroupBarrier: return "at a threadgroup barrier";
    case State::AtWarpBarrier: return "at a simdgroup barrier or collective";
    case State::Done: return "returned";
  }
  return "?";
}

// Release the barrier sets that are complete; false when the group can make no progress.
inline bool release_barriers(Group& g) {
  bool progress = false;
  int at_group = 0;
  for (Fiber& f : g.fibers) at_group += f.state == State::AtGroupBarrier;
  if (at_group == g.nthreads) {
    for (Fiber& f : g.fibers) f.state = State::Ready;
    return true;
  }
  for (int w = 0; w < g.nwarps; ++w) {
    int at_warp = 0, done = 0;
    for (int l = 0; l < kWarp; ++l) {
      State s = g.fibers[w * kWarp + l].state;
      at_warp += s == State::AtWarpBarrier;
      done += s == State::Done;
    }
    if (at_warp == kWarp) {
      for (int l = 0; l < kWarp; ++l) g.fibers[w * kWarp + l].state = State::Ready;
      progress = true;
    } else if (at_warp > 0 && done > 0) {
      fail("a simdgroup collective was reached after other lanes of the simdgroup returned");
      return false;
    }
  }
  return progress;
}

inline void describe_deadlock(Group& g) {
  std::string msg = "deadlock: no barrier can complete;";
  for (int w = 0; w < g.nwarps; ++w) {
    int counts[4] = {0, 0, 0, 0};
    for (int l = 0; l < kWarp; ++l) counts[int(g.fibers[w * kWarp + l].state)]++;
    char buf[160];
    std::snprintf(buf, sizeof(buf), " warp %d: %d %s, %d %s, %d %s;", w, counts[1],
                  state_name(State::AtGroupBarrier), counts[2], state_name(State::AtWarpBarrier),
                  counts[3], state_name(State::Done));
    msg += buf;
  }
  fail(msg);
}

inline void run_group(Group& g) {
  g.done = 0;
  g.smem_ready = false;
  for (int t = 0; t < g.nthreads; ++t) {
    Fiber& f = g.fibers[t];
    f.state = State::Ready;
    f.collective = 0;
    f.pending.clear();
    f.group_ends.clear();
    f.wgmma_pending.clear();
    f.bulk_pending.clear();
    fiber_init(f);
  }
  while (g.launch->error.empty()) {
    bool ran = false;
    for (Fiber& f : g.fibers) {
      if (f.state != State::Ready) continue;
      switch_to_fiber(g, f);
      ran = true;
      if (!g.launch->error.empty()) return;
    }
    if (g.done == g.nthreads) return;
    if (!release_barriers(g) && !ran) {
      if (g.launch->error.empty()) describe_deadlock(g);
      return;
    }
  }
}

// Run `body(gx, gy, gz, tid)` for every thread of a grid of `groups` threadgroups of `threads`
// threads, whose device accesses must stay inside `buffers`.  Returns an empty string on
// success, else the first error.
inline std::string launch(const int groups[3], int threads, std::vector<Range> buffers,
                          std::function<void(int, int, int, int)> body) {
  Launch L;
  L.body = std::move(body);
  L.buffers = std::move(buffers);
  if (threads <= 0 || threads % kWarp != 0)
    return "threadgroup size " + std::to_string(threads) + " is not a positive multiple of 32";
  Group g;
  g.launch = &L;
  const char* copies = std::getenv("MFA_EMU_COPIES");
  g.copies_early = copies != nullptr && std::string(copies) == "early";
  g.nthreads = threads;
  g.nwarps = threads / kWarp;
  g.fibers.resize(size_t(threads));
  std::vector<char> stacks(size_t(threads) * kStackBytes);
  for (int t = 0; t < threads; ++t) {
    Fiber& f = g.fibers[t];
    f.tid = t;
    f.warp = t / kWarp;
    f.lane = t % kWarp;
    f.stack = stacks.data() + size_t(t) * kStackBytes;
  }
  g.scratch.assign(size_t(g.nwarps) * 2 * kWarp * kScratchBytes, 0);
  g_group = &g;
  for (int z = 0; z < groups[2] && L.error.empty(); ++z)
    for (int y = 0; y < groups[1] && L.error.empty(); ++y)
      for (int x = 0; x < groups[0] && L.error.empty(); ++x) {
        g.gx = x;
        g.gy = y;
        g.gz = z;
        run_group(g);
      }
  g_group = nullptr;
  return L.error;
}

}  // namespace emu
