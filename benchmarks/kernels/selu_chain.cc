// A research prototype, not part of the pipeline: the 100-layer SELU net's chain of 100x100 layers (the forward
// products with bias and SELU, the backward SELU gradients and input-gradient products) in hand-blocked AVX2/FMA
// code, with no TensorFlow executor in between, to price what a custom fused TensorFlow op could give.
// benchmarks/hand_kernel_chain.py builds it with g++, checks it against TensorFlow and times both side by side.
// Shapes are fixed: a batch of 32 rows; 100 columns padded with zeros to NP = 112 (7 blocks of 16).
#include <immintrin.h>
#include <Eigen/Dense>
#include <chrono>
#include <vector>
#include <cstring>
static const int NP = 112, BATCH = 32;
static const float kScale = 1.0507009873554805f, kAlpha = 1.6732632423543772f;
using Arr = Eigen::Map<Eigen::Array<float, Eigen::Dynamic, 1>>;

static inline void gemm(const float* A, int lda, int K, const float* B, float* C) {  // C = A*B, B is K x NP
  for (int i = 0; i < BATCH; i += 4) {
    for (int j = 0; j < NP; j += 16) {
      __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
      const float* a0 = A + (i + 0) * lda; const float* a1 = A + (i + 1) * lda;
      const float* a2 = A + (i + 2) * lda; const float* a3 = A + (i + 3) * lda;
      for (int k = 0; k < K; ++k) {
        __m256 b0 = _mm256_loadu_ps(B + k * NP + j), b1 = _mm256_loadu_ps(B + k * NP + j + 8);
        __m256 x = _mm256_broadcast_ss(a0 + k); c00 = _mm256_fmadd_ps(x, b0, c00); c01 = _mm256_fmadd_ps(x, b1, c01);
        x = _mm256_broadcast_ss(a1 + k); c10 = _mm256_fmadd_ps(x, b0, c10); c11 = _mm256_fmadd_ps(x, b1, c11);
        x = _mm256_broadcast_ss(a2 + k); c20 = _mm256_fmadd_ps(x, b0, c20); c21 = _mm256_fmadd_ps(x, b1, c21);
        x = _mm256_broadcast_ss(a3 + k); c30 = _mm256_fmadd_ps(x, b0, c30); c31 = _mm256_fmadd_ps(x, b1, c31);
      }
      _mm256_storeu_ps(C + (i + 0) * NP + j, c00); _mm256_storeu_ps(C + (i + 0) * NP + j + 8, c01);
      _mm256_storeu_ps(C + (i + 1) * NP + j, c10); _mm256_storeu_ps(C + (i + 1) * NP + j + 8, c11);
      _mm256_storeu_ps(C + (i + 2) * NP + j, c20); _mm256_storeu_ps(C + (i + 2) * NP + j + 8, c21);
      _mm256_storeu_ps(C + (i + 3) * NP + j, c30); _mm256_storeu_ps(C + (i + 3) * NP + j + 8, c31);
    }
  }
}

// W: L kernels, each 100 x NP (padded), Wt: their transposes, each 100 x NP (padded); b: L x NP.
// Runs `steps` chains; returns seconds. After the last one, copies the last layer's output to out_h and the
// input gradient at the first layer to out_dy (both BATCH x NP) when they are not null.
extern "C" double run_hand(int L, const float* W, const float* Wt, const float* b, const float* x0, int steps,
                           float* out_h, float* out_dy) {
  std::vector<float> h((L + 1) * BATCH * NP, 0.f), dy(BATCH * NP), d(BATCH * NP);
  auto t0 = std::chrono::steady_clock::now();
  for (int s = 0; s < steps; ++s) {
    std::memcpy(h.data(), x0, sizeof(float) * BATCH * NP);
    for (int l = 0; l < L; ++l) {
      float* out = h.data() + (l + 1) * BATCH * NP;
      gemm(h.data() + l * BATCH * NP, NP, 100, W + l * 100 * NP, out);
      Eigen::Map<Eigen::Array<float, BATCH, NP, Eigen::RowMajor>> z(out);
      Eigen::Map<const Eigen::Array<float, 1, NP>> bl(b + l * NP);
      z.rowwise() += bl;
      z = (z > 0).select(kScale * z, kScale * kAlpha * (z.exp() - 1.0f));
    }
    Eigen::Map<Eigen::Array<float, BATCH, NP, Eigen::RowMajor>> dY(dy.data()), D(d.data());
    dY = Eigen::Map<Eigen::Array<float, BATCH, NP, Eigen::RowMajor>>(h.data() + L * BATCH * NP) * 0.01f;
    for (int l = L - 1; l >= 0; --l) {
      Eigen::Map<Eigen::Array<float, BATCH, NP, Eigen::RowMajor>> o(h.data() + (l + 1) * BATCH * NP);
      D = (o > 0).select(dY * kScale, dY * (o + kScale * kAlpha));
      gemm(d.data(), NP, 100, Wt + l * 100 * NP, dy.data());
    }
  }
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (out_h) std::memcpy(out_h, h.data() + L * BATCH * NP, sizeof(float) * BATCH * NP);
  if (out_dy) std::memcpy(out_dy, dy.data(), sizeof(float) * BATCH * NP);
  return seconds;
}
