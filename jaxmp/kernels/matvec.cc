// A few rows times a weight matrix, on every CPU thread XLA has: the decode step's matmuls.
//
// y[m, n] = scale[n] * sum_k x[m, k] * w[k, n]      (w laid out [K, N]: a Dense kernel)
// y[m, n] = scale[n] * sum_k x[m, k] * w[n, k]      (w laid out [N, K]: a tied embedding table)
// rows[r, :] = table[ids[r], :]                     (JaxmpTakeRows: an embedding lookup, bytes as stored)
//
// x and y are float32; w is float32, bfloat16, float16, int8 or float8_e4m3fn and is read as stored,
// converted to float32 in registers (products are exact in fp32; sums accumulate in fp32). Why this
// exists: XLA:CPU multiplies a batch-1 row in a single-threaded loop and converts 8-bit or 16-bit
// weights into float32 copies before a dot, so decoding read 4-byte weights on one core. The work is
// split into tasks (column blocks, and slices of K where there are few blocks); the calling thread and
// XLA's intra-op pool take tasks from a shared counter until none are left. jaxmp/cpu_matvec.py calls it.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxRows = 4;       // rows of x per pass over w (register blocking)
constexpr int64_t kColumns = 2048;    // [K, N] layout: output columns per task (kMaxRows x kColumns fp32 in L1)
constexpr int64_t kRowsPerTask = 512; // [N, K] layout: outputs per task
constexpr int64_t kPrefetchRows = 4;  // [K, N] layout, 8/16-bit w: rows fetched ahead (the hardware
                                      // prefetcher follows strided row segments too late; ~1.6x measured)
constexpr int64_t kLanes = 64;        // [N, K] layout: partial sums per dot (four 16-wide accumulators)

inline float ToFloat(float v) { return v; }
inline float ToFloat(int8_t v) { return static_cast<float>(v); }
inline float ToFloat(_Float16 v) { return static_cast<float>(v); }
struct BF16 { uint16_t bits; };
inline float ToFloat(BF16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
struct E4M3 { uint8_t bits; };
// float8_e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities, 0x7f/0xff are NaN.
inline float ToFloat(E4M3 v) {
  const uint32_t sign = (v.bits & 0x80u) << 24, exponent = (v.bits >> 3) & 0xfu, mantissa = v.bits & 0x7u;
  float magnitude;
  if (exponent == 0) {
    magnitude = static_cast<float>(mantissa) * (1.0f / 512.0f);  // subnormal: mantissa * 2^-9
  } else if (exponent == 0xf && mantissa == 0x7) {
    magnitude = __builtin_nanf("");
  } else {
    uint32_t u = ((exponent + 120u) << 23) | (mantissa << 20);
    std::memcpy(&magnitude, &u, sizeof magnitude);
  }
  uint32_t u;
  std::memcpy(&u, &magnitude, sizeof u);
  u |= sign;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Partial sums over w's rows k0 <= k < k1 of y[:, n0:n1] for w laid out [K, N], into out[m, n - n0]
// (stride `width`). Reads each row segment of w once, contiguously.
template <int M, typename W>
void PanelKN(const float* x, const W* w, int64_t K, int64_t N, int64_t k0, int64_t k1, int64_t n0, int64_t n1,
             float* out) {
  const int64_t width = n1 - n0;
  float acc[M][kColumns] = {};
  for (int64_t k = k0; k < k1; ++k) {
    const W* w_k = w + k * N + n0;
    if (sizeof(W) < 4 && k + kPrefetchRows < K) {  // fp32 rows stream at a core's bandwidth without it
      const char* ahead = reinterpret_cast<const char*>(w_k + kPrefetchRows * N);
      for (int64_t byte = 0; byte < width * static_cast<int64_t>(sizeof(W)); byte += 64) __builtin_prefetch(ahead + byte);
    }
    float x_k[M];
    for (int m = 0; m < M; ++m) x_k[m] = x[m * K + k];
    for (int64_t j = 0; j < width; ++j) {
      const float w_kj = ToFloat(w_k[j]);
      for (int m = 0; m < M; ++m) acc[m][j] += x_k[m] * w_kj;
    }
  }
  for (int m = 0; m < M; ++m) std::memcpy(out + m * width, acc[m], width * sizeof(float));
}

// y[:, n0:n1] for w laid out [N, K]: each output is a dot of a contiguous row of w with a row of x.
template <int M, typename W>
void RowsNK(const float* x, const W* w, const float* scale, float* y, int64_t K, int64_t N, int64_t n0,
            int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const W* w_n = w + n * K;
    float lanes[M][kLanes] = {};
    int64_t k = 0;
    for (; k + kLanes <= K; k += kLanes)
      for (int64_t i = 0; i < kLanes; ++i) {
        const float w_nk = ToFloat(w_n[k + i]);
        for (int m = 0; m < M; ++m) lanes[m][i] += x[m * K + k + i] * w_nk;
      }
    for (int m = 0; m < M; ++m) {
      // Halving sums (a chain of kLanes scalar adds would cost more than the row's multiplies).
      for (int64_t half = kLanes / 2; half >= 1; half /= 2)
        for (int64_t i = 0; i < half; ++i) lanes[m][i] += lanes[m][i + half];
      float total = lanes[m][0];
      for (int64_t i = k; i < K; ++i) total += x[m * K + i] * ToFloat(w_n[i]);
      y[m * N + n] = total * scale[n];
    }
  }
}

// Runs body(block) for every block < blocks on the calling thread and the pool's threads. The state
// is shared so that a pool task starting after the last block finished (and the handler returned)
// finds no block and touches nothing else.
template <typename Body>
void ParallelBlocks(ffi::ThreadPool& pool, int64_t blocks, Body body) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> finished{0};
  };
  auto state = std::make_shared<State>();
  auto drain = [state, blocks, body] {
    for (int64_t b; (b = state->next.fetch_add(1)) < blocks;) {
      body(b);
      state->finished.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), blocks - 1);
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([drain] { drain(); });
  drain();
  while (state->finished.load(std::memory_order_acquire) < blocks) std::this_thread::yield();
}

// [K, N] layout: tasks are (column block, slice of K) pairs, enough of them for every thread; each
// writes its partial sums to `partial`, which are then added up and scaled.
template <int M, typename W>
void RunKN(ffi::ThreadPool& pool, const float* x, const W* w, const float* scale, float* y, int64_t K,
           int64_t N) {
  const int64_t column_blocks = (N + kColumns - 1) / kColumns;
  const int64_t wanted_tasks = 4 * (pool.num_threads() + 1);
  const int64_t k_slices = std::clamp<int64_t>(wanted_tasks / column_blocks, 1, std::max<int64_t>(K / 64, 1));
  const int64_t k_step = (K + k_slices - 1) / k_slices;
  // Reused across calls: a fresh buffer this size is an mmap and munmap per call, and the munmap stops
  // every thread to flush its TLB.
  thread_local std::vector<float> partial;
  if (partial.size() < static_cast<size_t>(k_slices * M * N)) partial.resize(k_slices * M * N);
  float* const scratch = partial.data();  // a thread_local named inside a task would be the task thread's
  ParallelBlocks(pool, column_blocks * k_slices, [&](int64_t task) {
    const int64_t block = task / k_slices, slice = task % k_slices;
    const int64_t n0 = block * kColumns, n1 = std::min(N, n0 + kColumns);
    const int64_t k0 = slice * k_step, k1 = std::min(K, k0 + k_step);
    PanelKN<M>(x, w, K, N, k0, k1, n0, n1, scratch + slice * M * N + M * n0);
  });
  for (int64_t block = 0; block < column_blocks; ++block) {
    const int64_t n0 = block * kColumns, width = std::min(N, n0 + kColumns) - n0;
    for (int m = 0; m < M; ++m)
      for (int64_t j = 0; j < width; ++j) {
        float total = 0.0f;
        for (int64_t slice = 0; slice < k_slices; ++slice) total += scratch[slice * M * N + M * n0 + m * width + j];
        y[m * N + n0 + j] = total * scale[n0 + j];
      }
  }
}

template <int M, typename W>
void RunNK(ffi::ThreadPool& pool, const float* x, const W* w, const float* scale, float* y, int64_t K,
           int64_t N) {
  ParallelBlocks(pool, (N + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task) {
    const int64_t n0 = task * kRowsPerTask;
    RowsNK<M>(x, w, scale, y, K, N, n0, std::min(N, n0 + kRowsPerTask));
  });
}

template <typename W>
void Run(ffi::ThreadPool& pool, const float* x, const void* w_data, const float* scale, float* y, int64_t M,
         int64_t K, int64_t N, bool w_is_n_by_k) {
  const W* w = static_cast<const W*>(w_data);
  // Groups of kMaxRows rows, each a pass over w (a prompt of 8-bit weights: still cheaper than the
  // float copy of w that XLA's dot makes).
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    const float* x_rows = x + m0 * K;
    float* y_rows = y + m0 * N;
    auto group = [&](auto rows) {
      constexpr int R = decltype(rows)::value;
      if (w_is_n_by_k) {
        RunNK<R>(pool, x_rows, w, scale, y_rows, K, N);
      } else {
        RunKN<R>(pool, x_rows, w, scale, y_rows, K, N);
      }
    };
    switch (std::min(kMaxRows, M - m0)) {
      case 1: group(std::integral_constant<int, 1>{}); break;
      case 2: group(std::integral_constant<int, 2>{}); break;
      case 3: group(std::integral_constant<int, 3>{}); break;
      default: group(std::integral_constant<int, 4>{}); break;
    }
  }
}

ffi::Error Matvec(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                  ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, bool w_is_n_by_k) {
  const auto x_dims = x.dimensions(), w_dims = w.dimensions();
  if (x_dims.size() != 2 || w_dims.size() != 2) return ffi::Error::InvalidArgument("matvec: x and w must be 2-D");
  const int64_t M = x_dims[0], K = x_dims[1];
  const int64_t N = w_is_n_by_k ? w_dims[0] : w_dims[1];
  if ((w_is_n_by_k ? w_dims[1] : w_dims[0]) != K || scale.element_count() != N)
    return ffi::Error::InvalidArgument("matvec: shapes of x, w and scale do not agree");
  const float* xs = x.typed_data();
  const float* ss = scale.typed_data();
  float* ys = y->typed_data();
  switch (w.element_type()) {
    case ffi::F32: Run<float>(pool, xs, w.untyped_data(), ss, ys, M, K, N, w_is_n_by_k); break;
    case ffi::BF16: Run<BF16>(pool, xs, w.untyped_data(), ss, ys, M, K, N, w_is_n_by_k); break;
    case ffi::F16: Run<_Float16>(pool, xs, w.untyped_data(), ss, ys, M, K, N, w_is_n_by_k); break;
    case ffi::S8: Run<int8_t>(pool, xs, w.untyped_data(), ss, ys, M, K, N, w_is_n_by_k); break;
    case ffi::F8E4M3FN: Run<E4M3>(pool, xs, w.untyped_data(), ss, ys, M, K, N, w_is_n_by_k); break;
    default: return ffi::Error::InvalidArgument("matvec: w must be float32, bfloat16, float16, int8 or float8_e4m3fn");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxmpMatvec, Matvec,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, K]
                                  .Arg<ffi::AnyBuffer>()         // w [K, N] or [N, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale [N]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [M, N]
                                  .Attr<bool>("w_is_n_by_k"));

namespace {

// Copies rows of a table in any dtype. XLA:CPU gathers a 16-bit float table in float32 and keeps that
// converted copy of the whole table for a decode loop; this reads only the rows asked for. Ids outside
// [0, V) are clamped, as XLA's gather clamps them.
ffi::Error TakeRows(ffi::Buffer<ffi::S32> ids, ffi::AnyBuffer table, ffi::Result<ffi::AnyBuffer> rows) {
  const auto dims = table.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("take_rows: the table must be 2-D");
  const int64_t V = dims[0], row_bytes = table.size_bytes() / std::max<int64_t>(V, 1);
  const char* source = static_cast<const char*>(table.untyped_data());
  char* target = static_cast<char*>(rows->untyped_data());
  const int32_t* id = ids.typed_data();
  for (int64_t r = 0; r < static_cast<int64_t>(ids.element_count()); ++r) {
    const int64_t row = std::clamp<int64_t>(id[r], 0, V - 1);
    std::memcpy(target + r * row_bytes, source + row * row_bytes, row_bytes);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxmpTakeRows, TakeRows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()  // ids [R]
                                  .Arg<ffi::AnyBuffer>()         // table [V, D]
                                  .Ret<ffi::AnyBuffer>());       // rows [R, D], the table's dtype
