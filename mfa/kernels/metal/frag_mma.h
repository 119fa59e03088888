// Tile layer, fragment family for CUDA: mma.sync.m16n8k16 (bf16/f16 operands, fp32 accumulate).
//
// A warp owns an M x N fp32 accumulator as (M/16) x (N/8) fragments of 16x8.  Lane l holds
// rows g = l/4 and g + 8, columns 2q and 2q + 1 (q = l % 4) of each fragment, so the four
// lanes 4g..4g+3 share a row: row reductions shuffle by 1 and 2.  Operands come from shared
// memory through ldmatrix (row-major; .trans for the K x N operand); an accumulator is reused
// as the A operand of the next product in registers (the FlashAttention-2 P·V trick).
namespace mfa {

enum : int { kFragRows = 16 };
// Lane masks whose shuffles reach the four lanes that share an accumulator row.
enum : int { kRowXor0 = 1, kRowXor1 = 2 };

struct LaneCoord {
  int lane, r, c;  // lane, and the (row, col) of its first element in every fragment
};

MFA_FUNC LaneCoord lane_coord(int lane) {
  LaneCoord lc;
  lc.lane = lane;
  lc.r = lane / 4;
  lc.c = 2 * (lane % 4);
  return lc;
}

// M x N fp32 accumulator of one warp; element i of this lane is v[i].
template <int M, int N>
struct Acc {
  enum : int { FM = M / 16, FN = N / 8, SIZE = FM * FN * 4 };
  float v[SIZE];
  MFA_FUNC static int row(LaneCoord lc, int i) { return 16 * (i / 4 / FN) + lc.r + 8 * (i % 4 / 2); }
  MFA_FUNC static int col(LaneCoord lc, int i) { return 8 * (i / 4 % FN) + lc.c + i % 2; }
  // Index into RowVec<M> of the row that element i lies in.
  MFA_FUNC static int slot(int i) { return 2 * (i / 4 / FN) + i % 4 / 2; }
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
  MFA_FUNC static int row(LaneCoord lc, int s) { return 16 * (s / 2) + 8 * (s % 2) + lc.r; }
  // True for the one lane of each row group that writes per-row results.
  MFA_FUNC static bool writer(LaneCoord lc) { return lc.c == 0; }
};

// A warp's M x N tile of threadgroup memory seen in its accumulator layout (tile.h): 16-bit
// tiles (PAIRS) are read by ldmatrix into registers, other types element by element.
template <int M, int N, int TRANS, typename T, int PAIRS = sizeof(T) == 2>
struct AccTile;

// 16-bit tiles: one ldmatrix.x4 per 16 x 16 block, the four 8 x 8 matrices being accumulator
// fragments (fi, fj) and (fi, fj + 1), rows 0-7 then 8-15 of each: register i/2 holds elements i
// and i + 1 (even i) as they lie in the accumulator.  Rows of the tile (columns with TRANS) are
// 16-byte aligned: ld a multiple of 8, src at a multiple of 8 elements.
template <int M, int N, int TRANS, typename T>
struct AccTile<M, N, TRANS, T, 1> {
  unsigned v[Acc<M, N>::SIZE / 2];
  MFA_FUNC void load(MFA_TG const T* src, int ld, LaneCoord lc) {
    static_assert(N % 16 == 0, "16-bit accumulator tiles load 16 x 16 blocks");
    const int l = lc.lane;
    MFA_UNROLL
    for (int fi = 0; fi < M / 16; ++fi) {
      MFA_UNROLL
      for (int fj = 0; fj < N / 8; fj += 2) {
        MFA_THR unsigned* r = v + (fi * (N / 8) + fj) * 2;
        if (TRANS)  // the stored rows are the accumulator's columns
          mfa_ldmatrix_x4_trans(r, src + (8 * fj + l % 8 + 8 * (l / 16)) * ld + 16 * fi + 8 * (l / 8 % 2));
        else
          mfa_ldmatrix_x4(r, src + (16 * fi + l % 8 + 8 * (l / 8 % 2)) * ld + 8 * fj + 8 * (l / 16));
      }
    }
  }
  MFA_FUNC float get(int i) const { return mfa_unpack2<T>(v[i / 2], i % 2); }
};

template <int M, int N>
MFA_FUNC void row_max(MFA_THR const Acc<M, N>& a, MFA_THR RowVec<M>& out) {
  MFA_UNROLL
  for (int s = 0; s < M / 8; ++s) {
    float m = -MFA_INF;
    MFA_UNROLL
    for (int fj = 0; fj < N / 8; ++fj) {
      const float* f = a.v + ((s / 2) * (N / 8) + fj) * 4 + 2 * (s % 2);
      m = mfa_fmaxf(m, mfa_fmaxf(f[0], f[1]));
    }
    m = mfa_fmaxf(m, mfa_shfl_xor(m, 1));
    m = mfa_fmaxf(m, mfa_shfl_xor(m, 2));
    out.v[s] = m;
  }
}

template <int M, int N>
MFA_FUNC void row_sum(MFA_THR const Acc<M, N>& a, MFA_THR RowVec<M>& out) {
  MFA_UNROLL
  for (int s = 0; s < M / 8; ++s) {
    float t = 0.0f;
    MFA_UNROLL
    for (int fj = 0; fj < N / 8; ++fj) {
      const float* f = a.v + ((s / 2) * (N / 8) + fj) * 4 + 2 * (s % 2);
      t += f[0] + f[1];
    }
    t += mfa_shfl_xor(t, 1);
    t += mfa_shfl_xor(t, 2);
    out.v[s] = t;
  }
}

// The A operand of one k-step: M/16 fragments of 16 x 16 (4 registers each).
template <int M>
struct AFrags {
  unsigned f[M / 16][4];
};

// A fragments of k-step kk of a row-major M x K tile in shared memory.
template <int M, typename T>
MFA_FUNC void load_a_shared(MFA_THR AFrags<M>& fa, MFA_TG const T* a, int lda, int kk, int l) {
  MFA_UNROLL
  for (int fi = 0; fi < M / 16; ++fi) mfa_ldmatrix_x4(fa.f[fi], a + (16 * fi + l % 16) * lda + 16 * kk + 8 * (l / 16));
}

// B fragments of k-step kk, columns 8·fj .. 8·fj + 15, of a row-major K x N tile in shared memory.
// matrices: (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15)
template <typename T>
MFA_FUNC void load_b_kn(MFA_THR unsigned* fb, MFA_TG const T* b, int ldb, int kk, int fj, int l) {
  mfa_ldmatrix_x4_trans(fb, b + (16 * kk + l % 8 + 8 * (l / 8 % 2)) * ldb + 8 * fj + 8 * (l / 16));
}

// Accumulator fragments (fi, fj) and (fi, fj + 1) += fa[fi] · fb, for every fi.
template <int M, int N, typename T>
MFA_FUNC void mma_column_pair(MFA_THR Acc<M, N>& c, MFA_THR const AFrags<M>& fa, MFA_THR const unsigned* fb, int fj) {
  MFA_UNROLL
  for (int fi = 0; fi < M / 16; ++fi) {
    mfa_mma16816<T>(c.v + (fi * (N / 8) + fj) * 4, fa.f[fi], fb);
    mfa_mma16816<T>(c.v + (fi * (N / 8) + fj + 1) * 4, fa.f[fi], fb + 2);
  }
}

// c (M x N) += a (M x K, row-major in shared memory) * B, with B = b^T for b (N x K) row-major
// (BT = 1) or B = b (K x N) row-major (BT = 0).  Rows must be 16-byte aligned (ld a multiple of
// 8 elements).
template <int K, int BT, int M, int N, typename T>
MFA_FUNC void mma_shared(MFA_THR Acc<M, N>& c, MFA_TG const T* a, int lda, MFA_TG const T* b, int ldb, LaneCoord lc) {
  static_assert(N % 16 == 0 && K % 16 == 0, "shared-memory products need N and K multiples of 16");
  const int l = lc.lane;
  MFA_UNROLL
  for (int kk = 0; kk < K / 16; ++kk) {
    AFrags<M> fa;
    load_a_shared(fa, a, lda, kk, l);
    MFA_UNROLL
    for (int fj = 0; fj < N / 8; fj += 2) {
      unsigned fb[4];
      if (BT)  // matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
        mfa_ldmatrix_x4(fb, b + (8 * fj + l % 8 + 8 * (l / 16)) * ldb + 16 * kk + 8 * (l / 8 % 2));
      else
        load_b_kn(fb, b, ldb, kk, fj, l);
      mma_column_pair<M, N, T>(c, fa, fb, fj);
    }
  }
}

// The A fragment (4 registers) of k-step kk, fragment row fi, of an M x K accumulator rounded to
// T: accumulator fragments (fi, 2kk) and (fi, 2kk+1) are its k halves.  RESIDUAL = 1 packs the
// rounding residuals instead (the low part of a float32 accumulator split in two T parts).
template <typename T, int RESIDUAL, int M, int K>
MFA_FUNC void pack_a(MFA_THR unsigned* fa, MFA_THR const Acc<M, K>& p, int fi, int kk) {
  const float* lo = p.v + (fi * (K / 8) + 2 * kk) * 4;
  const float* hi = lo + 4;
  float x[8] = {lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]};
  if (RESIDUAL) {
    MFA_UNROLL
    for (int e = 0; e < 8; ++e) x[e] -= mfa_round<T>(x[e]);
  }
  MFA_UNROLL
  for (int r = 0; r < 4; ++r) fa[r] = mfa_pack2<T>(x[2 * r], x[2 * r + 1]);
}

// c (M x N) += p (M x K accumulator of this warp, rounded to T) * b, b (K x N) row-major.
// SPLIT = 1 keeps p to about float32 accuracy: p = hi + lo with hi, lo in T, two products.
template <int K, int SPLIT = 0, int M, int N, typename T>
MFA_FUNC void mma_ab(MFA_THR Acc<M, N>& c, MFA_THR const Acc<M, K>& p, MFA_TG const T* b, int ldb,
                     LaneCoord lc) {
  static_assert(N % 16 == 0 && K % 16 == 0, "mma_ab needs N and K multiples of 16");
  const int l = lc.lane;
  MFA_UNROLL
  for (int kk = 0; kk < K / 16; ++kk) {
    AFrags<M> fa, fr;
    MFA_UNROLL
    for (int fi = 0; fi < M / 16; ++fi) {
      pack_a<T, 0>(fa.f[fi], p, fi, kk);
      if (SPLIT) pack_a<T, 1>(fr.f[fi], p, fi, kk);
    }
    MFA_UNROLL
    for (int fj = 0; fj < N / 8; fj += 2) {
      unsigned fb[4];
      load_b_kn(fb, b, ldb, kk, fj, l);
      mma_column_pair<M, N, T>(c, fa, fb, fj);
      if (SPLIT) mma_column_pair<M, N, T>(c, fr, fb, fj);
    }
  }
}

}  // namespace mfa
