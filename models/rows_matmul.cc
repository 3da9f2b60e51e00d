// jaxspec's CPU kernels, XLA FFI handlers for the CPU backend (models/cpu_kernels.py builds, loads and calls
// them), all fp32:
//   jaxspec_rows_matmul   y[M, N] = x[M, K] . w[N, K]^T for a few rows M (decode batches, speculative trees);
//   jaxspec_cache_scores  the decode attention's scores against one layer's cache slots, read in place;
//   jaxspec_cache_values  its weighted sum of that layer's cached values.
//
// Why: XLA:CPU runs one row as a bandwidth-bound mat-vec, but 2-32 rows as a GEMM that packs weight panels
// and reaches a fraction of the memory bandwidth, so verifying a 9-token tree cost ~4 decode steps. Here
// every weight row is read from memory once for all M rows: a block of kRows weight rows is multiplied
// with up to kCols rows of x at a time in vector registers (x stays in cache). Decode attention is the same
// shape with the cached keys as weight rows (and head_dim, 64-128, as K), where XLA:CPU's dots read the cache
// at ~2 GB/s; the attention kernels also take the whole-model cache buffer and a layer index, since slicing
// a layer out for a custom call would copy it.
//
// Numerics: y[m, n] accumulates x[m, k] * w[n, k] in the same order whatever M is and whichever block row m
// falls in (kLanes lane sums over k, then the lanes in order, then the tail of K; the scores of 16-key tiles
// fold the lanes by a fixed tree instead), so a row's result does not depend on the other rows: a decode
// step and a verification give bit-identical logits for the same input. For that every vector
// multiply-add is `madd`: one fused instruction where the CPU has FMA, written out, and the library is built
// with -ffp-contract=off, so that the compiler fuses nothing on its own (GCC's default contraction fused
// the same statement in some block shapes and not in others, and rows came out different by M).
//
// Register blocking follows the instruction set the library is built for (-march=native): with AVX-512
// (32 registers of 16 floats) a block is 4 weight rows x 6 rows of x; with AVX2 (16 registers of 8 floats)
// 6 x 2 of 8-lane vectors (six weight rows streamed at once reached XLA's mat-vec bandwidth on an AMD EPYC,
// four did not), since the AVX-512 blocking spills there and ran at a fifth of the bandwidth (docs/results.md,
// "The kernel on an AVX2 host"). The attention kernels keep 16-lane tiles on both.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <type_traits>

#if defined(__FMA__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64)));  // 16 fp32 lanes: one AVX-512 register, two AVX2 ones
constexpr int64_t kTile = 16;  // the attention kernels' lanes (and keys per score tile)
constexpr int kAttnCols = 6;   // query rows per value block: 6 x 4 accumulators of 16 lanes
#ifdef __AVX512F__
constexpr int64_t kLanes = 16;  // the matmul's lanes: one register
constexpr int kRows = 4;        // weight rows per block
constexpr int kCols = 6;        // x rows per block: 4 x 6 accumulators + 4 weight vectors + 1 x vector
#else
constexpr int64_t kLanes = 8;   // one AVX2 register
constexpr int kRows = 6;        // six weight streams: 6 x 2 accumulators + 6 weight vectors; x comes from L1
constexpr int kCols = 2;
#endif
typedef float vm __attribute__((vector_size(4 * kLanes)));  // the matmul's vector
constexpr int64_t kChunk = 16 * kRows;  // weight rows per unit of work shared between threads
constexpr int64_t kKeyChunk = 64;       // cache slots per unit of the attention kernels

template <class V = v16>
inline V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// a * b + c lane by lane, rounded once with FMA (else twice, the same way in every block shape).
template <class V>
inline V madd(V a, V b, V c) {
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64) return (V)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#endif
#if defined(__FMA__)
  if constexpr (sizeof(V) == 32) return (V)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
  if constexpr (sizeof(V) % 32 == 0) {  // a 16-lane vector without AVX-512: its 8-lane halves
    constexpr int parts = sizeof(V) / 32;
    __m256 pa[parts], pb[parts], pc[parts];
    std::memcpy(pa, &a, sizeof a);
    std::memcpy(pb, &b, sizeof b);
    std::memcpy(pc, &c, sizeof c);
    for (int i = 0; i < parts; ++i) pc[i] = _mm256_fmadd_ps(pa[i], pb[i], pc[i]);
    V out;
    std::memcpy(&out, pc, sizeof out);
    return out;
  }
#endif
  return a * b + c;
}

template <int MB, int NB>
inline void block(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t m0, int64_t n0) {
  vm acc[MB][NB] = {};
  const int64_t Kv = K - K % kLanes;
  for (int64_t k = 0; k < Kv; k += kLanes) {
    vm wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = load<vm>(w + (n0 + j) * K + k);
    for (int i = 0; i < MB; ++i) {
      const vm xv = load<vm>(x + (m0 + i) * K + k);
      for (int j = 0; j < NB; ++j) acc[i][j] = madd(xv, wv[j], acc[i][j]);
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

// f(m0, std::integral_constant<int, MB>()) for the row blocks of M rows: C at a time, then the rest.
template <int C, class F>
inline void row_blocks(int64_t M, F f) {
  static_assert(C >= 1 && C <= 6, "remainders up to 5 rows");
  int64_t m = 0;
  for (; m + C <= M; m += C) f(m, std::integral_constant<int, C>());
  switch (M - m) {
    case 1: f(m, std::integral_constant<int, 1>()); break;
    case 2: if constexpr (C > 2) f(m, std::integral_constant<int, 2>()); break;
    case 3: if constexpr (C > 3) f(m, std::integral_constant<int, 3>()); break;
    case 4: if constexpr (C > 4) f(m, std::integral_constant<int, 4>()); break;
    case 5: if constexpr (C > 5) f(m, std::integral_constant<int, 5>()); break;
    default: break;
  }
}

template <int NB>
void all_rows(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n0) {
  row_blocks<kCols>(M, [&](int64_t m, auto mb) { block<decltype(mb)::value, NB>(x, w, y, K, N, m, n0); });
}

void weight_rows(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t lo,
                 int64_t hi) {
  int64_t n = lo;
  for (; n + kRows <= hi; n += kRows) all_rows<kRows>(x, w, y, M, K, N, n);
  for (; n < hi; ++n) all_rows<1>(x, w, y, M, K, N, n);
}

// Work shared by the calling thread and helpers from XLA's intra-op pool: units are claimed from a counter,
// so the caller never waits on a helper that has not started (a pool busy with other ops cannot deadlock
// it), and a helper that starts after the last unit is claimed touches nothing but this heap object.
struct Job {
  int64_t units;
  std::function<void(int64_t)> unit;
  std::atomic<int64_t> next{0}, done{0};

  void run() {
    for (int64_t u; (u = next.fetch_add(1, std::memory_order_relaxed)) < units;) {
      unit(u);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

void parallel(ffi::ThreadPool& pool, int64_t units, std::function<void(int64_t)> unit) {
  auto job = std::make_shared<Job>();
  job->units = units;
  job->unit = std::move(unit);
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), units) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([job] { job->run(); });
  job->run();
  while (job->done.load(std::memory_order_acquire) < units) std::this_thread::yield();
}

// y[b] = x[b] . w[b]^T for `batch` independent problems, in units of (problem, kChunk weight rows).
void batched_rows(ffi::ThreadPool& pool, const float* x, const float* w, float* y, int64_t batch, int64_t M,
                  int64_t K, int64_t N) {
  const int64_t chunks = (N + kChunk - 1) / kChunk;
  parallel(pool, batch * chunks, [=](int64_t u) {
    const int64_t b = u / chunks, c = u % chunks;
    weight_rows(x + b * M * K, w + b * N * K, y + b * M * N, M, K, N, c * kChunk, std::min(N, (c + 1) * kChunk));
  });
}

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
  batched_rows(pool, x.typed_data(), w.typed_data(), y->typed_data(), 1, M, K, N);
  return ffi::Error::Success();
}

// The cache half of decode attention. `q [P, M, D]` are P = batch x kv-heads groups of M query rows; `kv` is
// a cache buffer whose trailing dims are [P, S, D] (leading dims, e.g. layers, flattened into an index);
// `at` (int32 scalar) picks the [P, S, D] block that is read, so a layer of the whole-model buffer is read in
// place (slicing it out for a custom call would copy it).
struct CacheBlock {
  const float* data;
  int64_t P, S, D;
};

ffi::ErrorOr<CacheBlock> cache_block(const ffi::Buffer<ffi::F32>& kv, const ffi::Buffer<ffi::S32>& at,
                                     int64_t P, int64_t D) {
  const auto kd = kv.dimensions();
  if (kd.size() < 3 || kd.back() != D || at.element_count() != 1) {
    return ffi::Unexpected(ffi::Error::InvalidArgument("jaxspec attention: expected kv [..., P, S, D]"));
  }
  const int64_t S = kd[kd.size() - 2];
  int64_t lead = 1;
  for (size_t i = 0; i + 3 < kd.size(); ++i) lead *= kd[i];
  if (kd[kd.size() - 3] != P) {
    return ffi::Unexpected(ffi::Error::InvalidArgument("jaxspec attention: kv groups differ from q's"));
  }
  const int64_t index = at.typed_data()[0];
  if (index < 0 || index >= lead) {
    return ffi::Unexpected(ffi::Error::InvalidArgument("jaxspec attention: block index out of range"));
  }
  return CacheBlock{kv.typed_data() + index * P * S * D, P, S, D};
}

// Sums of 16 vectors, lane j of the result = the sum of a[j]'s lanes, by a fixed tree of shuffles and adds
// (15 vector adds for 16 sums: the lane-by-lane sum of `block` costs a chain of 15 scalar adds a sum).
#define JX_SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
inline v16 fold_pair8(v16 a, v16 b) {  // [a folded to 8 | b folded to 8]
  return JX_SHUF(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
         JX_SHUF(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}
inline v16 fold_pair4(v16 a, v16 b) {  // 8-lane groups folded to 4
  return JX_SHUF(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
         JX_SHUF(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
}
inline v16 fold_pair2(v16 a, v16 b) {  // 4-lane groups folded to 2
  return JX_SHUF(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
         JX_SHUF(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
}
inline v16 fold_pair1(v16 a, v16 b) {  // 2-lane groups folded to 1
  return JX_SHUF(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         JX_SHUF(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}
#undef JX_SHUF

inline v16 sum16(const v16* a) {
  v16 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i) b[i] = fold_pair8(a[2 * i], a[2 * i + 1]);
  for (int i = 0; i < 4; ++i) c[i] = fold_pair4(b[2 * i], b[2 * i + 1]);
  for (int i = 0; i < 2; ++i) d[i] = fold_pair2(c[2 * i], c[2 * i + 1]);
  return fold_pair1(d[0], d[1]);
}

// s[m, t0:t0+16] for every row m of q [M, D] against 16 keys k[t0:t0+16, D], D a multiple of 16: the keys
// (16 x D floats) stay in L1 while each row is multiplied with them. A score's sum runs over d in lanes, then
// the fixed tree of sum16, so it does not depend on M or on the other rows.
void score_tile(const float* q, const float* k, float* s, int64_t M, int64_t D, int64_t S, int64_t t0) {
  for (int64_t m = 0; m < M; ++m) {
    v16 acc[kTile] = {};
    for (int64_t d = 0; d < D; d += kTile) {
      const v16 qv = load(q + m * D + d);
      for (int j = 0; j < kTile; ++j) acc[j] = madd(qv, load(k + (t0 + j) * D + d), acc[j]);
    }
    const v16 out = sum16(acc);
    std::memcpy(s + m * S + t0, &out, sizeof out);
  }
}

// s[p, m, t] = q[p, m, :] . k[p, t, :], in units of (group p, kKeyChunk keys): 16 keys at a time by
// `score_tile` where D is a multiple of 16, the rest (and other D) by the small-row matmul's blocks.
ffi::Error CacheScores(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                       ffi::Buffer<ffi::S32> at, ffi::ResultBuffer<ffi::F32> s) {
  const auto qd = q.dimensions();
  if (qd.size() != 3) return ffi::Error::InvalidArgument("jaxspec_cache_scores: expected q [P, M, D]");
  const int64_t P = qd[0], M = qd[1], D = qd[2];
  auto block = cache_block(k, at, P, D);
  if (!block.has_value()) return block.error();
  const int64_t S = block->S;
  if (P * M == 0 || S == 0) return ffi::Error::Success();
  const float* qp = q.typed_data();
  const float* kp = block->data;
  float* sp = s->typed_data();
  const int64_t chunks = (S + kKeyChunk - 1) / kKeyChunk;
  parallel(pool, P * chunks, [=](int64_t u) {
    const int64_t p = u / chunks, lo = (u % chunks) * kKeyChunk, hi = std::min(S, lo + kKeyChunk);
    const float *qq = qp + p * M * D, *kk = kp + p * S * D;
    float* ss = sp + p * M * S;
    int64_t t = lo;
    if (D % kTile == 0)
      for (; t + kTile <= hi; t += kTile) score_tile(qq, kk, ss, M, D, S, t);
    weight_rows(qq, kk, ss, M, D, S, t, hi);
  });
  return ffi::Error::Success();
}

// y[p, m0:m0+MB, d0:d0+16*DB] = sum over t, in order, of w[p, m, t] * v[p, t, d]: each value row is read once
// for MB weight rows; a row's sums do not depend on the other rows.
template <int MB, int DB>
inline void value_block(const float* w, const float* v, float* y, int64_t S, int64_t D, int64_t m0, int64_t d0) {
  v16 acc[MB][DB] = {};
  for (int64_t t = 0; t < S; ++t) {
    v16 vv[DB];
    for (int j = 0; j < DB; ++j) vv[j] = load(v + t * D + d0 + j * kTile);
    for (int i = 0; i < MB; ++i) {
      const v16 c = v16{} + w[(m0 + i) * S + t];  // broadcast
      for (int j = 0; j < DB; ++j) acc[i][j] = madd(c, vv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < DB; ++j) std::memcpy(y + (m0 + i) * D + d0 + j * kTile, &acc[i][j], sizeof(v16));
}

template <int DB>
void value_rows(const float* w, const float* v, float* y, int64_t M, int64_t S, int64_t D, int64_t d0) {
  row_blocks<kAttnCols>(M, [&](int64_t m, auto mb) { value_block<decltype(mb)::value, DB>(w, v, y, S, D, m, d0); });
}

ffi::Error CacheValues(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> v,
                       ffi::Buffer<ffi::S32> at, ffi::ResultBuffer<ffi::F32> y) {
  const auto wd = w.dimensions();
  const auto yd = y->dimensions();
  if (wd.size() != 3 || yd.size() != 3) return ffi::Error::InvalidArgument("jaxspec_cache_values: expected w [P, M, S]");
  const int64_t P = wd[0], M = wd[1], S = wd[2], D = yd[2];
  auto block = cache_block(v, at, P, D);
  if (!block.has_value()) return block.error();
  if (block->S != S) return ffi::Error::InvalidArgument("jaxspec_cache_values: weights and values differ in S");
  if (P * M * D == 0) return ffi::Error::Success();
  const float* wp = w.typed_data();
  const float* vp = block->data;
  float* yp = y->typed_data();
  constexpr int64_t kSpan = 4 * kTile;  // value columns per unit: 4 x 6 accumulators in registers
  const int64_t spans = (D + kSpan - 1) / kSpan;
  parallel(pool, P * spans, [=](int64_t u) {
    const int64_t p = u / spans, d0 = (u % spans) * kSpan, d1 = std::min(D, d0 + kSpan);
    const float* wq = wp + p * M * S;
    const float* vq = vp + p * S * D;
    float* yq = yp + p * M * D;
    int64_t d = d0;
    for (; d + kSpan <= d1; d += kSpan) value_rows<4>(wq, vq, yq, M, S, D, d);
    for (; d + kTile <= d1; d += kTile) value_rows<1>(wq, vq, yq, M, S, D, d);
    for (; d < d1; ++d)  // a head_dim that is not a multiple of 16: the last columns one by one
      for (int64_t m = 0; m < M; ++m) {
        float acc = 0.0f;
        for (int64_t t = 0; t < S; ++t) acc += wq[m * S + t] * vq[t * D + d];
        yq[m * D + d] = acc;
      }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxspec_rows_matmul, RowsMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The cache kernels' signature: (pool, q or weights, cache buffer, block index) -> result.
static auto cache_binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxspec_cache_scores, CacheScores, cache_binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxspec_cache_values, CacheValues, cache_binding());
