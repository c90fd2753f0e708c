// Selective scan (Mamba-1 SSM) on CPU, forward and backward, and the window correction of
// chunk-limited scans (further down), for modules/selective_scan.py.
//
// h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,   y_t = C_t . h_t   (per channel d)
//
// Written by hand because no maintained package has a CPU selective scan (mamba-ssm is CUDA only)
// and torch.compile cannot keep a state in registers across a loop over time. Compiled on first
// use by the system C++ compiler (selective_scan.py) and called through ctypes with raw pointers
// to contiguous tensors, so no Python or torch headers are needed.
//
// Work item: one batch row and TILE channels. Its state (N, TILE) lives in a small buffer while
// the loop runs over time, so the (B, L, D, N) decays never reach memory. The forward pass saves
// the state every BLOCK frames; the backward pass recomputes each block from its saved state and
// runs the adjoint backwards through it. Shapes: u, delta, grad_y, du, ddelta (B, L, D);
// A_t (N, D) (A transposed); B, C, dB, dC (B, L, N); states h0, h_final, grad_h0 (B, D, N);
// picked (B, K, N, D): the states after frames first, first + stride, ... (stride 0: none);
// checkpoints (B, ceil(L / BLOCK), N, D), or null without a backward pass. D must be a multiple
// of TILE. delta >= 0 and A <= 0 (decays <= 1): the caller checks shapes and signs.
//
// Threads: OpenMP when the compiler has it (the team comes from the thread pool torch uses, see
// selective_scan.py), else std::thread. Each thread takes a contiguous range of work items.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int64_t TILE = 16;   // channels per work item: one AVX-512 register of floats
constexpr int64_t BLOCK = 32;  // frames between saved states
constexpr int64_t PREFETCH = 8;  // frames ahead: a tile's rows are D floats apart, a new page
                                 // every few frames, which hardware prefetchers do not follow

// 2^x without a library call, so that the compiler vectorizes the loops that use it
// (std::exp only vectorizes with -ffast-math and glibc's libmvec). 2^x = 2^k * 2^f with k the
// nearest integer and |f| <= 1/2: adding 1.5 * 2^mantissa + bias rounds x and leaves k + bias in
// the low bits, which a shift moves into the exponent field; 2^f by a polynomial accurate to the
// type's precision. x <= 0 here (decays <= 1); below the normal range k + bias = 0 gives 0.
// (Clamping x from above too doubles the cost: GCC turns the two clamps into mask juggling.)
template <typename T> struct Exp2Traits;
template <> struct Exp2Traits<float> {
  using Bits = uint32_t;
  static constexpr float limit = 127.0f, shifter = 12582912.0f + 127.0f;
  static constexpr int mantissa = 23;
  static inline float poly(float f) {  // minimax fit of 2^f on [-1/2, 1/2], error < 1e-7;
    // Estrin's scheme: a shorter dependency chain than Horner's
    const float f2 = f * f;
    const float p01 = 6.9314718e-1f * f + 1.0f, p23 = 5.5503286e-2f * f + 2.4022646e-1f;
    const float p45 = 1.3399931e-3f * f + 9.6184891e-3f;
    const float p46 = 1.5345812e-4f * f2 + p45;
    return (p46 * f2 + p23) * f2 + p01;
  }
};
template <> struct Exp2Traits<double> {
  using Bits = uint64_t;
  static constexpr double limit = 1023.0, shifter = 6755399441055744.0 + 1023.0;
  static constexpr int mantissa = 52;
  static inline double poly(double f) {  // exp(f ln 2), Taylor series to r^13: error < 1e-17
    const double r = f * 0.6931471805599453;
    double p = 1.0;
    for (int k = 13; k >= 1; --k) p = 1.0 + p * r / k;  // 1 + r (1 + r/2 (1 + r/3 (...)))
    return p;
  }
};

template <typename T>
inline T exp2_approx(T x) {
  using E = Exp2Traits<T>;
  x = x < -E::limit ? -E::limit : x;  // NaN passes through
  const T shifted = x + E::shifter;
  const T f = x - (shifted - E::shifter);
  const auto bits = __builtin_bit_cast(typename E::Bits, shifted) << E::mantissa;
  return E::poly(f) * __builtin_bit_cast(T, bits);
}

constexpr double LOG2E = 1.4426950408889634;

template <typename T>
struct Scan {
  const T *u, *delta, *A_t, *B, *C;
  int64_t batch, length, dim, state, stride, first;

  int64_t blocks() const { return (length + BLOCK - 1) / BLOCK; }
  int64_t picked() const { return stride && first < length ? (length - 1 - first) / stride + 1 : 0; }
  // Index of the returned state after frame t, or -1.
  int64_t picked_index(int64_t t) const {
    return stride && t >= first && (t - first) % stride == 0 ? (t - first) / stride : -1;
  }
  int64_t row(int64_t b, int64_t t) const { return b * length + t; }

  // One frame for one tile: the state h (N, TILE) advanced in place. Forward pass: the output y_t
  // (TILE) in out. Backward pass (recomputing a block): decays (N, TILE), decayed = decays * h_t-1,
  // and lanes_c (N, TILE) += h_t * dy_t, the per-lane terms of dC.
  template <bool backward_pass>
  void step(int64_t b, int64_t t, int64_t d0, T* h, T* out, const T* grad_y = nullptr,
            T* decays = nullptr, T* decayed = nullptr, T* lanes_c = nullptr) const {
    const T* __restrict dl = delta + row(b, t) * dim + d0;
    const T* __restrict x = u + row(b, t) * dim + d0;
    T input[TILE], dl_log2e[TILE], y[TILE] = {};
    for (int64_t i = 0; i < TILE; ++i) {
      input[i] = dl[i] * x[i];
      dl_log2e[i] = dl[i] * T(LOG2E);
    }
    for (int64_t n = 0; n < state; ++n) {
      const T bn = B[row(b, t) * state + n], cn = C[row(b, t) * state + n];
      const T* __restrict an = A_t + n * dim + d0;
#pragma omp simd
      for (int64_t i = 0; i < TILE; ++i) {
        const T decay = exp2_approx(dl_log2e[i] * an[i]);
        const T kept = decay * h[n * TILE + i];
        const T updated = kept + input[i] * bn;
        h[n * TILE + i] = updated;
        if constexpr (backward_pass) {
          decays[n * TILE + i] = decay;
          decayed[n * TILE + i] = kept;
          lanes_c[n * TILE + i] += updated * grad_y[row(b, t) * dim + d0 + i];
        } else {
          y[i] += updated * cn;
        }
      }
    }
    if constexpr (!backward_pass) std::memcpy(out, y, sizeof(y));
  }

  void forward(int64_t b, int64_t d0, const T* h0, T* y, T* h_final, T* checkpoints, T* picked_states,
               T* h) const {
    load_state(h0 + b * dim * state, h, d0);
    for (int64_t t = 0; t < length; ++t) {
      if (checkpoints && t % BLOCK == 0)
        store_columns(h, checkpoints + (b * blocks() + t / BLOCK) * state * dim, d0);
      if (t + PREFETCH < length) {
        __builtin_prefetch(u + row(b, t + PREFETCH) * dim + d0);
        __builtin_prefetch(delta + row(b, t + PREFETCH) * dim + d0);
        __builtin_prefetch(y + row(b, t + PREFETCH) * dim + d0, 1);
      }
      step<false>(b, t, d0, h, y + row(b, t) * dim + d0);
      const int64_t k = picked_index(t);
      if (k >= 0) store_columns(h, picked_states + (b * picked() + k) * state * dim, d0);
    }
    store_state(h, h_final + b * dim * state, d0);
  }

  // Rows d0..d0+TILE of a (D, N) state -> (N, TILE) tile, and back.
  void load_state(const T* source, T* h, int64_t d0) const {
    for (int64_t n = 0; n < state; ++n)
      for (int64_t i = 0; i < TILE; ++i) h[n * TILE + i] = source[(d0 + i) * state + n];
  }

  void store_state(const T* h, T* target, int64_t d0) const {
    for (int64_t n = 0; n < state; ++n)
      for (int64_t i = 0; i < TILE; ++i) target[(d0 + i) * state + n] = h[n * TILE + i];
  }

  // Columns d0..d0+TILE of an (N, D) state (checkpoints, picked states) <-> (N, TILE) tile.
  void load_columns(const T* source, T* h, int64_t d0) const {
    for (int64_t n = 0; n < state; ++n)
      std::memcpy(h + n * TILE, source + n * dim + d0, TILE * sizeof(T));
  }

  void store_columns(const T* h, T* target, int64_t d0) const {
    for (int64_t n = 0; n < state; ++n)
      std::memcpy(target + n * dim + d0, h + n * TILE, TILE * sizeof(T));
  }

  // Gradients for tiles [first_tile, end_tile) of batch row b, block by block from the end.
  // dA (N, D), dB, dC (B, L, N) are this thread's partial sums. Scratch: g, the adjoint
  // d loss / d h after the frame being processed (tiles, N, TILE); the recomputed state h; a
  // block's decays and decayed states (BLOCK, N, TILE); and the per-lane sums of dB and dC over
  // the tiles (BLOCK, N, TILE), reduced across lanes once per block rather than once per tile.
  void backward(int64_t b, int64_t first_tile, int64_t end_tile, const T* checkpoints,
                const T* grad_y, const T* grad_final, const T* grad_picked, T* du, T* ddelta,
                T* dA, T* dB, T* dC, T* grad_h0, T* scratch) const {
    const int64_t size = state * TILE;
    T* g_all = scratch;
    T* h = g_all + (end_tile - first_tile) * size;
    T* decays = h + size;
    T* decayed = decays + BLOCK * size;
    T* lanes_b = decayed + BLOCK * size;
    T* lanes_c = lanes_b + BLOCK * size;
    for (int64_t tile = first_tile; tile < end_tile; ++tile)
      load_state(grad_final + b * dim * state, g_all + (tile - first_tile) * size, tile * TILE);
    for (int64_t block = blocks() - 1; block >= 0; --block) {
      const int64_t start = block * BLOCK, frames = std::min(BLOCK, length - start);
      std::fill(lanes_b, lanes_b + 2 * BLOCK * size, T(0));  // lanes_b and lanes_c
      for (int64_t tile = first_tile; tile < end_tile; ++tile) {
        const int64_t d0 = tile * TILE;
        T* g = g_all + (tile - first_tile) * size;
        load_columns(checkpoints + (b * blocks() + block) * state * dim, h, d0);
        // Prefetch the lines of the next (tile, block) while this one computes.
        const bool last = tile + 1 == end_tile;
        const int64_t next_d0 = last ? first_tile * TILE : d0 + TILE;
        const int64_t next_start = last ? start - BLOCK : start;
        for (int64_t k = 0; k < frames; ++k) {
          if (next_start >= 0) {
            const int64_t at = row(b, next_start + k) * dim + next_d0;
            __builtin_prefetch(u + at);
            __builtin_prefetch(delta + at);
            __builtin_prefetch(grad_y + at);
            __builtin_prefetch(du + at, 1);
            __builtin_prefetch(ddelta + at, 1);
          }
          step<true>(b, start + k, d0, h, nullptr, grad_y, decays + k * size, decayed + k * size,
                     lanes_c + k * size);
        }
        for (int64_t k = frames - 1; k >= 0; --k)
          adjoint_step(b, start + k, d0, grad_y, grad_picked, decays + k * size,
                       decayed + k * size, g, lanes_b + k * size, du, ddelta, dA);
      }
      for (int64_t k = 0; k < frames; ++k)
        for (int64_t n = 0; n < state; ++n) {
          T sum_b = 0, sum_c = 0;
          for (int64_t i = 0; i < TILE; ++i) {
            sum_b += lanes_b[k * size + n * TILE + i];
            sum_c += lanes_c[k * size + n * TILE + i];
          }
          dB[row(b, start + k) * state + n] += sum_b;
          dC[row(b, start + k) * state + n] += sum_c;
        }
    }
    for (int64_t tile = first_tile; tile < end_tile; ++tile)
      store_state(g_all + (tile - first_tile) * size, grad_h0 + b * dim * state, tile * TILE);
  }

  // Frame t of one tile, backwards: g from d loss / d h_t (without y_t's part) to d loss / d h_{t-1}.
  void adjoint_step(int64_t b, int64_t t, int64_t d0, const T* grad_y, const T* grad_picked,
                    const T* decays, const T* decayed, T* g, T* lanes_b, T* du, T* ddelta,
                    T* dA) const {
    const T* __restrict dy = grad_y + row(b, t) * dim + d0;
    const T* __restrict dl = delta + row(b, t) * dim + d0;
    const T* __restrict x = u + row(b, t) * dim + d0;
    const int64_t picked_at = picked_index(t);
    if (picked_at >= 0)  // the state after frame t was returned too
      for (int64_t n = 0; n < state; ++n)
        for (int64_t i = 0; i < TILE; ++i)
          g[n * TILE + i] += grad_picked[((b * picked() + picked_at) * state + n) * dim + d0 + i];
    T input[TILE], grad_b[TILE] = {}, grad_delta[TILE] = {};
    for (int64_t i = 0; i < TILE; ++i) input[i] = dl[i] * x[i];
    for (int64_t n = 0; n < state; ++n) {
      const T bn = B[row(b, t) * state + n], cn = C[row(b, t) * state + n];
      const T* __restrict an = A_t + n * dim + d0;
      T* __restrict dA_n = dA + n * dim + d0;
      const int64_t at = n * TILE;
#pragma omp simd
      for (int64_t i = 0; i < TILE; ++i) {
        const T gi = g[at + i] + dy[i] * cn;  // d loss / d h_t
        const T grad_log_decay = gi * decayed[at + i];
        grad_b[i] += gi * bn;
        grad_delta[i] += grad_log_decay * an[i];
        dA_n[i] += grad_log_decay * dl[i];
        lanes_b[at + i] += gi * input[i];
        g[at + i] = gi * decays[at + i];
      }
    }
    for (int64_t i = 0; i < TILE; ++i) {
      du[row(b, t) * dim + d0 + i] = grad_b[i] * dl[i];
      ddelta[row(b, t) * dim + d0 + i] = grad_delta[i] + grad_b[i] * x[i];
    }
  }
};

// Runs work(first, end, thread) on contiguous ranges of items 0..items-1, one per thread.
template <typename Work>
void parallel(int64_t items, int64_t threads, Work work) {
  threads = std::max<int64_t>(1, std::min(threads, items));
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
  {
    const int64_t thread = omp_get_thread_num(), team = omp_get_num_threads();
    work(items * thread / team, items * (thread + 1) / team, thread);
  }
#else
  auto range = [&](int64_t thread) {
    work(items * thread / threads, items * (thread + 1) / threads, thread);
  };
  std::vector<std::thread> pool;
  for (int64_t thread = 1; thread < threads; ++thread) pool.emplace_back(range, thread);
  range(0);
  for (auto& worker : pool) worker.join();
#endif
}

// Calls work(b, first_tile, end_tile) for the batch rows met by items [first, end) of
// batch * tiles items.
template <typename Work>
void for_rows(int64_t first, int64_t end, int64_t tiles, Work work) {
  for (int64_t item = first; item < end;) {
    const int64_t b = item / tiles, stop = std::min(end, (b + 1) * tiles);
    work(b, item % tiles, item % tiles + stop - item);
    item = stop;
  }
}

template <typename T>
void forward(const T* u, const T* delta, const T* A_t, const T* B, const T* C, const T* h0, T* y,
             T* h_final, T* checkpoints, T* picked, int64_t batch, int64_t length, int64_t dim,
             int64_t state, int64_t stride, int64_t first, int64_t threads) {
  const Scan<T> scan{u, delta, A_t, B, C, batch, length, dim, state, stride, first};
  const int64_t tiles = dim / TILE;
  parallel(batch * tiles, threads, [&](int64_t first_item, int64_t end_item, int64_t) {
    std::vector<T> h(state * TILE);
    for (int64_t item = first_item; item < end_item; ++item)
      scan.forward(item / tiles, item % tiles * TILE, h0, y, h_final, checkpoints, picked, h.data());
  });
}

// dA (threads, N, D), dB and dC (threads, B, L, N) must be zero: one partial sum per thread.
template <typename T>
void backward(const T* u, const T* delta, const T* A_t, const T* B, const T* C, const T* checkpoints,
              const T* grad_y, const T* grad_final, const T* grad_picked, T* du, T* ddelta, T* dA,
              T* dB, T* dC, T* grad_h0, int64_t batch, int64_t length, int64_t dim, int64_t state,
              int64_t stride, int64_t first, int64_t threads) {
  const Scan<T> scan{u, delta, A_t, B, C, batch, length, dim, state, stride, first};
  const int64_t tiles = dim / TILE;
  parallel(batch * tiles, threads, [&](int64_t first_item, int64_t end_item, int64_t thread) {
    std::vector<T> scratch((std::min(tiles, end_item - first_item) + 4 * BLOCK + 1) * state * TILE);
    for_rows(first_item, end_item, tiles, [&](int64_t b, int64_t first_tile, int64_t end_tile) {
      scan.backward(b, first_tile, end_tile, checkpoints, grad_y, grad_final, grad_picked, du,
                    ddelta, dA + thread * state * dim, dB + thread * batch * length * state,
                    dC + thread * batch * length * state, grad_h0, scratch.data());
    });
  });
}

// Window correction for chunk-limited scans (Mamba._windowed_scan): the part of the state that
// entered before a chunk's window, decayed to each frame of the chunk, read out by C:
//   corr_t[d] = sum_n C_t[n] exp(A[d, n] span_t[d]) H_c[n, d],   c = t / chunk,
// with span_t the step sizes summed since the window start and H_c the full scan's state there.
// Fused so that the (B, L, D, N) decays and products never reach memory. Work item: one batch
// row and one chunk (all channels), so that each frame's dC is reduced over all tiles at once.
// Shapes: span, corr, grad_corr, dspan (B, L, D); C, dC (B, L, N); A_t (N, D); H and dH
// (B, count, N, D), the scan's picked states, of which chunk c uses number first + c (dH is only
// written there). span >= 0, A <= 0.
template <typename T>
struct Correction {
  const T *span, *A_t, *C, *H;
  int64_t batch, length, dim, state, chunk, first, count;

  int64_t chunks() const { return (length + chunk - 1) / chunk; }
  int64_t row(int64_t b, int64_t t) const { return b * length + t; }
  int64_t at(int64_t b, int64_t c) const { return (b * count + first + c) * state * dim; }
  int64_t chunk_end(int64_t c) const { return std::min(length, (c + 1) * chunk); }

  // The frame's step sums as exponents of 2 (exp2_approx), for channels d0..d0+TILE.
  void scaled_span(int64_t b, int64_t t, int64_t d0, T* scaled) const {
    for (int64_t i = 0; i < TILE; ++i) scaled[i] = span[row(b, t) * dim + d0 + i] * T(LOG2E);
  }

  void forward(int64_t b, int64_t c, T* corr) const {
    for (int64_t t = c * chunk; t < chunk_end(c); ++t)
      for (int64_t d0 = 0; d0 < dim; d0 += TILE) {
        T scaled[TILE], out[TILE] = {};
        scaled_span(b, t, d0, scaled);
        for (int64_t n = 0; n < state; ++n) {
          const T cn = C[row(b, t) * state + n];
          const T* __restrict an = A_t + n * dim + d0;
          const T* __restrict hn = H + at(b, c) + n * dim + d0;
#pragma omp simd
          for (int64_t i = 0; i < TILE; ++i) out[i] += cn * exp2_approx(scaled[i] * an[i]) * hn[i];
        }
        std::memcpy(corr + row(b, t) * dim + d0, out, sizeof(out));
      }
  }

  // dA (N, D) is this thread's partial sum; lanes (N, TILE) scratch.
  void backward(int64_t b, int64_t c, const T* grad_corr, T* dspan, T* dA, T* dC, T* dH,
                T* lanes) const {
    std::fill(dH + at(b, c), dH + at(b, c) + state * dim, T(0));
    for (int64_t t = c * chunk; t < chunk_end(c); ++t) {
      std::fill(lanes, lanes + state * TILE, T(0));
      for (int64_t d0 = 0; d0 < dim; d0 += TILE) {
        const T* __restrict sp = span + row(b, t) * dim + d0;
        const T* __restrict dy = grad_corr + row(b, t) * dim + d0;
        T scaled[TILE], grad_span[TILE] = {};
        scaled_span(b, t, d0, scaled);
        for (int64_t n = 0; n < state; ++n) {
          const T cn = C[row(b, t) * state + n];
          const T* __restrict an = A_t + n * dim + d0;
          const T* __restrict hn = H + at(b, c) + n * dim + d0;
          T* __restrict dhn = dH + at(b, c) + n * dim + d0;
          T* __restrict dA_n = dA + n * dim + d0;
          T* __restrict lane = lanes + n * TILE;
#pragma omp simd
          for (int64_t i = 0; i < TILE; ++i) {
            const T decay = exp2_approx(scaled[i] * an[i]);
            const T decayed = decay * hn[i], weight = dy[i] * cn;
            const T grad_exponent = weight * decayed;  // d loss / d (A span)
            lane[i] += dy[i] * decayed;
            dhn[i] += weight * decay;
            grad_span[i] += grad_exponent * an[i];
            dA_n[i] += grad_exponent * sp[i];
          }
        }
        std::memcpy(dspan + row(b, t) * dim + d0, grad_span, sizeof(grad_span));
      }
      for (int64_t n = 0; n < state; ++n) {
        T sum = 0;
        for (int64_t i = 0; i < TILE; ++i) sum += lanes[n * TILE + i];
        dC[row(b, t) * state + n] = sum;
      }
    }
  }
};

template <typename T>
void correction_forward(const T* span, const T* A_t, const T* C, const T* H, T* corr,
                        int64_t batch, int64_t length, int64_t dim, int64_t state, int64_t chunk,
                        int64_t first, int64_t count, int64_t threads) {
  const Correction<T> op{span, A_t, C, H, batch, length, dim, state, chunk, first, count};
  parallel(batch * op.chunks(), threads, [&](int64_t first_item, int64_t end_item, int64_t) {
    for (int64_t item = first_item; item < end_item; ++item)
      op.forward(item / op.chunks(), item % op.chunks(), corr);
  });
}

// dA (threads, N, D) must be zero: one partial sum per thread. dH has H's layout.
template <typename T>
void correction_backward(const T* span, const T* A_t, const T* C, const T* H, const T* grad_corr,
                         T* dspan, T* dA, T* dC, T* dH, int64_t batch, int64_t length,
                         int64_t dim, int64_t state, int64_t chunk, int64_t first, int64_t count,
                         int64_t threads) {
  const Correction<T> op{span, A_t, C, H, batch, length, dim, state, chunk, first, count};
  parallel(batch * op.chunks(), threads, [&](int64_t first_item, int64_t end_item, int64_t thread) {
    std::vector<T> lanes(state * TILE);
    for (int64_t item = first_item; item < end_item; ++item)
      op.backward(item / op.chunks(), item % op.chunks(), grad_corr, dspan,
                  dA + thread * state * dim, dC, dH, lanes.data());
  });
}

}  // namespace

#define SCAN_EXPORTS(T, suffix)                                                                   \
  extern "C" void scan_forward_##suffix(const T* u, const T* delta, const T* A_t, const T* B,     \
                                        const T* C, const T* h0, T* y, T* h_final,                \
                                        T* checkpoints, T* picked, int64_t batch, int64_t length, \
                                        int64_t dim, int64_t state, int64_t stride,               \
                                        int64_t first, int64_t threads) {                         \
    forward(u, delta, A_t, B, C, h0, y, h_final, checkpoints, picked, batch, length, dim, state,  \
            stride, first, threads);                                                              \
  }                                                                                               \
  extern "C" void scan_backward_##suffix(                                                         \
      const T* u, const T* delta, const T* A_t, const T* B, const T* C, const T* checkpoints,     \
      const T* grad_y, const T* grad_final, const T* grad_picked, T* du, T* ddelta, T* dA, T* dB, \
      T* dC, T* grad_h0, int64_t batch, int64_t length, int64_t dim, int64_t state,               \
      int64_t stride, int64_t first, int64_t threads) {                                           \
    backward(u, delta, A_t, B, C, checkpoints, grad_y, grad_final, grad_picked, du, ddelta, dA,   \
             dB, dC, grad_h0, batch, length, dim, state, stride, first, threads);                 \
  }

SCAN_EXPORTS(float, f32)
SCAN_EXPORTS(double, f64)

#define CORRECTION_EXPORTS(T, suffix)                                                             \
  extern "C" void correction_forward_##suffix(                                                    \
      const T* span, const T* A_t, const T* C, const T* H, T* corr, int64_t batch,                \
      int64_t length, int64_t dim, int64_t state, int64_t chunk, int64_t first, int64_t count,    \
      int64_t threads) {                                                                          \
    correction_forward(span, A_t, C, H, corr, batch, length, dim, state, chunk, first, count,     \
                       threads);                                                                  \
  }                                                                                               \
  extern "C" void correction_backward_##suffix(                                                   \
      const T* span, const T* A_t, const T* C, const T* H, const T* grad_corr, T* dspan, T* dA,   \
      T* dC, T* dH, int64_t batch, int64_t length, int64_t dim, int64_t state, int64_t chunk,     \
      int64_t first, int64_t count, int64_t threads) {                                            \
    correction_backward(span, A_t, C, H, grad_corr, dspan, dA, dC, dH, batch, length, dim, state, \
                        chunk, first, count, threads);                                            \
  }

CORRECTION_EXPORTS(float, f32)
CORRECTION_EXPORTS(double, f64)

// The sizes the caller needs for its buffers (D padded to TILE, checkpoints every BLOCK frames).
extern "C" int64_t scan_tile() { return TILE; }
extern "C" int64_t scan_block() { return BLOCK; }
