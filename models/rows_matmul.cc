// jaxspec: y[M, N] = x[M, K] . w[N, K]^T in fp32 for a few rows M (decode batches, speculative trees),
// an XLA FFI handler for the CPU backend (models/cpu_kernels.py builds, loads and calls it).
//
// Why: XLA:CPU runs one row as a bandwidth-bound mat-vec, but 2-32 rows as a GEMM that packs weight panels
// and reaches a fraction of the memory bandwidth, so verifying a 9-token tree cost ~4 decode steps. Here
// every weight row is read from memory once for all M rows: a block of kRows weight rows is multiplied
// with up to kCols rows of x at a time in vector registers (x stays in cache).
//
// Numerics: y[m, n] accumulates x[m, k] * w[n, k] in the same order whatever M is and whichever block row m
// falls in (16 lane sums over k, then the lanes in order, then the tail of K), so a row's result does not
// depend on the other rows: a decode step and a verification give bit-identical logits for the same input.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64)));  // 16 fp32 lanes: one AVX-512 register, two AVX2 ones
constexpr int64_t kLanes = 16;
constexpr int kRows = 4;  // weight rows per block
constexpr int kCols = 6;  // x rows per block: 4 x 6 accumulators + 4 weight vectors + 1 x vector in registers
constexpr int64_t kChunk = 64;  // weight rows per unit of work shared between threads

inline v16 load(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <int MB, int NB>
inline void block(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t m0, int64_t n0) {
  v16 acc[MB][NB] = {};
  const int64_t Kv = K - K % kLanes;
  for (int64_t k = 0; k < Kv; k += kLanes) {
    v16 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = load(w + (n0 + j) * K + k);
    for (int i = 0; i < MB; ++i) {
      const v16 xv = load(x + (m0 + i) * K + k);
      for (int j = 0; j < NB; ++j) acc[i][j] += xv * wv[j];
    }
  }
  for (int i = 0; i < MB; ++i) {
    for (int j = 0; j < NB; ++j) {
      float s = 0.0f;
      for (int l = 0; l < kLanes; ++l) s += acc[i][j][l];
      for (int64_t k = Kv; k < K; ++k) s += x[(m0 + i) * K + k] * w[(n0 + j) * K + k];
      y[(m0 + i) * N + n0 + j] = s;
    }
  }
}

template <int NB>
void all_rows(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n0) {
  int64_t m = 0;
  for (; m + kCols <= M; m += kCols) block<kCols, NB>(x, w, y, K, N, m, n0);
  switch (M - m) {
    case 1: block<1, NB>(x, w, y, K, N, m, n0); break;
    case 2: block<2, NB>(x, w, y, K, N, m, n0); break;
    case 3: block<3, NB>(x, w, y, K, N, m, n0); break;
    case 4: block<4, NB>(x, w, y, K, N, m, n0); break;
    case 5: block<5, NB>(x, w, y, K, N, m, n0); break;
    default: break;
  }
}

void weight_rows(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t lo,
                 int64_t hi) {
  int64_t n = lo;
  for (; n + kRows <= hi; n += kRows) all_rows<kRows>(x, w, y, M, K, N, n);
  for (; n < hi; ++n) all_rows<1>(x, w, y, M, K, N, n);
}

// Work shared by the calling thread and helpers from XLA's intra-op pool: chunks are claimed from a counter,
// so the caller never waits on a helper that has not started (a pool busy with other ops cannot deadlock
// it), and a helper that starts after the last chunk is claimed touches nothing but this heap object.
struct Job {
  const float* x;
  const float* w;
  float* y;
  int64_t M, K, N, chunks;
  std::atomic<int64_t> next{0}, done{0};

  void run() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      weight_rows(x, w, y, M, K, N, c * kChunk, std::min(N, (c + 1) * kChunk));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error RowsMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (wd.size() != 2 || xd.size() < 1 || xd.back() != wd[1]) {
    return ffi::Error::InvalidArgument("jaxspec_rows_matmul: expected x [..., K] and w [N, K]");
  }
  const int64_t K = wd[1], N = wd[0];
  const int64_t M = K == 0 ? 0 : x.element_count() / K;
  if (M == 0 || N == 0) return ffi::Error::Success();
  auto job = std::make_shared<Job>();
  job->x = x.typed_data();
  job->w = w.typed_data();
  job->y = y->typed_data();
  job->M = M;
  job->K = K;
  job->N = N;
  job->chunks = (N + kChunk - 1) / kChunk;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), job->chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([job] { job->run(); });
  job->run();
  while (job->done.load(std::memory_order_acquire) < job->chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxspec_rows_matmul, RowsMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
