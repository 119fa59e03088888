// Tile layer, fragment family for Metal: 8x8 simdgroup matrices (fp32 operands, fp32 accumulate).
//
// A warp (simdgroup) owns an M x N fp32 accumulator as (M/8) x (N/8) fragments.  Each lane
// holds two adjacent elements per fragment, at (row, col) and (row, col + 1) with
//   row = (lane/4 & 4) + (lane/2) % 4,   col = (lane/4 & 2) * 2 + (lane % 2) * 2,
// so the four lanes {l, l^1, l^8, l^9} share a row: row reductions shuffle by 1 and 8.
// Operands are read from threadgroup memory and widened to float, as MLX's steel attention does.
namespace mfa {

enum : int { kFragRows = 8 };
// Lane masks whose shuffles reach the four lanes that share an accumulator row.
enum : int { kRowXor0 = 1, kRowXor1 = 8 };

struct LaneCoord {
  int lane, r, c;  // lane, and the (row, col) of its first element in every fragment
};

MFA_FUNC LaneCoord lane_coord(int lane) {
  LaneCoord lc;
  lc.lane = lane;
  lc.r = (lane / 4 & 4) + (lane / 2) % 4;
  lc.c = (lane / 4 & 2) * 2 + (lane % 2) * 2;
  return lc;
}

// M x N fp32 accumulator of one warp; element i of this lane is v[i].
template <int M, int N>
struct Acc {
  enum : int { FM = M / 8, FN = N / 8, SIZE = FM * FN * 2 };
  float v[SIZE];
  MFA_FUNC static int row(LaneCoord lc, int i) { return 8 * (i / 2 / FN) + lc.r; }
  MFA_FUNC static int col(LaneCoord lc, int i) { return 8 * (i / 2 % FN) + lc.c + i % 2; }
  // Index into RowVec<M> of the row that element i lies in.
  MFA_FUNC static int slot(int i) { return i / 2 / FN; }
  MFA_FUNC void zero() {
    MFA_UNROLL
    for (int i = 0; i < SIZE; ++i) v[i] = 0.0f;
  }
};

// One value per row of an M-row accumulator, for the rows this lane holds.
template <int M>
struct RowVec {
  enum : int { SIZE = M / 8 };
  float v[SIZE];
  MFA_FUNC static int row(LaneCoord lc, int s) { return 8 * s + lc.r; }
  // True for the one lane of each row group that writes per-row results.
  MFA_FUNC static bool writer(LaneCoord lc) { return lc.c == 0; }
};

// A warp's M x N tile of threadgroup memory seen in its accumulator layout (tile.h); this family
// reads it element by element (PAIRS = 0).
template <int M, int N, int TRANS, typename T, int PAIRS = 0>
struct AccTile;

template <int M, int N>
MFA_FUNC void row_max(MFA_THR const Acc<M, N>& a, MFA_THR RowVec<M>& out) {
  MFA_UNROLL
  for (int fi = 0; fi < M / 8; ++fi) {
    float m = -MFA_INF;
    MFA_UNROLL
    for (int j = 0; j < 2 * (N / 8); ++j) m = mfa_fmaxf(m, a.v[fi * 2 * (N / 8) + j]);
    m = mfa_fmaxf(m, mfa_shfl_xor(m, 1));
    m = mfa_fmaxf(m, mfa_shfl_xor(m, 8));
    out.v[fi] = m;
  }
}

template <int M, int N>
MFA_FUNC void row_sum(MFA_THR const Acc<M, N>& a, MFA_THR RowVec<M>& out) {
  MFA_UNROLL
  for (int fi = 0; fi < M / 8; ++fi) {
    float s = 0.0f;
    MFA_UNROLL
    for (int j = 0; j < 2 * (N / 8); ++j) s += a.v[fi * 2 * (N / 8) + j];
    s += mfa_shfl_xor(s, 1);
    s += mfa_shfl_xor(s, 8);
    out.v[fi] = s;
  }
}

// c[fi][fj] += a * b on one fragment, through a simdgroup matrix multiply.
MFA_FUNC void frag_mma(MFA_THR float* c, MFA_THR const simdgroup_float8x8& a,
                       MFA_THR const simdgroup_float8x8& b) {
  simdgroup_float8x8 acc;
  acc.thread_elements()[0] = c[0];
  acc.thread_elements()[1] = c[1];
  simdgroup_multiply_accumulate(acc, a, b, acc);
  c[0] = acc.thread_elements()[0];
  c[1] = acc.thread_elements()[1];
}

// The A operand of one k-step: M/8 fragments of 8 x 8.
template <int M>
struct AFrags {
  simdgroup_float8x8 f[M / 8];
};

// A fragments of k-step kk of a row-major M x K tile in threadgroup memory (widened to float).
template <int M, typename T>
MFA_FUNC void load_a_shared(MFA_THR AFrags<M>& fa, MFA_TG const T* a, int lda, int kk, LaneCoord lc) {
  MFA_UNROLL
  for (int fi = 0; fi < M / 8; ++fi) {
    MFA_TG const T* p = a + (8 * fi + lc.r) * lda + 8 * kk + lc.c;
    fa.f[fi].thread_elements()[0] = float(p[0]);
    fa.f[fi].thread_elements()[1] = float(p[1]);
  }
}

// The B fragment of k-step kk, columns 8·fj .. 8·fj + 7, of a row-major K x N threadgroup tile.
template <typename T>
MFA_FUNC void load_b_kn(MFA_THR simdgroup_float8x8& fb, MFA_TG const T* b, int ldb, int kk, int fj, LaneCoord lc) {
  MFA_TG const T* q = b + (8 * kk + lc.r) * ldb + 8 * fj + lc.c;
  fb.thread_elements()[0] = float(q[0]);
  fb.thread_elements()[1] = float(q[1]);
}

// Accumulator fragments (fi, fj) += fa[fi] · fb, for every fi.
template <int M, int N>
MFA_FUNC void mma_column(MFA_THR Acc<M, N>& c, MFA_THR const AFrags<M>& fa, MFA_THR const simdgroup_float8x8& fb,
                         int fj) {
  MFA_UNROLL
  for (int fi = 0; fi < M / 8; ++fi) frag_mma(c.v + (fi * (N / 8) + fj) * 2, fa.f[fi], fb);
}

// c (M x N) += a (M x K, row-major in threadgroup memory) * B, with B = b^T for b (N x K)
// row-major (BT = 1) or B = b (K x N) row-major (BT = 0).
template <int K, int BT, int M, int N, typename T>
MFA_FUNC void mma_shared(MFA_THR Acc<M, N>& c, MFA_TG const T* a, int lda, MFA_TG const T* b, int ldb, LaneCoord lc) {
  MFA_UNROLL
  for (int kk = 0; kk < K / 8; ++kk) {
    AFrags<M> fa;
    load_a_shared(fa, a, lda, kk, lc);
    MFA_UNROLL
    for (int fj = 0; fj < N / 8; ++fj) {
      simdgroup_float8x8 fb;
      if (BT) {
        // fragment element (k, n) = b[n][k]: this lane's are (lc.r, lc.c) and (lc.r, lc.c + 1)
        MFA_TG const T* p = b + (8 * fj + lc.c) * ldb + 8 * kk + lc.r;
        fb.thread_elements()[0] = float(p[0]);
        fb.thread_elements()[1] = float(p[ldb]);
      } else {
        load_b_kn(fb, b, ldb, kk, fj, lc);
      }
      mma_column(c, fa, fb, fj);
    }
  }
}

// c (M x N) += p (M x K accumulator of this warp) * b, b (K x N) row-major in threadgroup memory.
// p stays float32 here, so SPLIT (see frag_mma.h) changes nothing.
template <int K, int SPLIT = 0, int M, int N, typename T>
MFA_FUNC void mma_ab(MFA_THR Acc<M, N>& c, MFA_THR const Acc<M, K>& p, MFA_TG const T* b, int ldb,
                     LaneCoord lc) {
  MFA_UNROLL
  for (int kk = 0; kk < K / 8; ++kk) {
    AFrags<M> fa;
    MFA_UNROLL
    for (int fi = 0; fi < M / 8; ++fi) {
      fa.f[fi].thread_elements()[0] = p.v[(fi * (K / 8) + kk) * 2];
      fa.f[fi].thread_elements()[1] = p.v[(fi * (K / 8) + kk) * 2 + 1];
    }
    MFA_UNROLL
    for (int fj = 0; fj < N / 8; ++fj) {
      simdgroup_float8x8 fb;
      load_b_kn(fb, b, ldb, kk, fj, lc);
      mma_column(c, fa, fb, fj);
    }
  }
}

}  // namespace mfa
