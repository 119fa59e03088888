// Tile layer, wgmma part of the CUDA fragment family (sm_90a): B tiles in the 128-byte swizzle
// layout, read by the tensor cores straight from shared memory (no ldmatrix, no B registers).
//
// A ROWS x COLS tile (ROWS in 8s, COLS in 64s, 2-byte T) is stored as COLS/64 column blocks, each
// ROWS rows of 128 bytes; the 16-byte chunk c of row r within its block lies at chunk
// c ^ (r % 8) of the row (tiles start 1024-byte aligned, so this is the swizzle wgmma applies to
// its address bits 4..6 from bits 7..9):
//   byte (c / 8) · ROWS · 128 + r · 128 + ((c % 8) ^ (r % 8)) · 16.
// Each 8 consecutive threads of a copy fill one row: no bank conflicts there, nor in wgmma's
// reads.  The same tile is the k-major B of a·bᵀ (rows = n, columns = k) and the n-major B of p·b
// (rows = k, columns = n).  A warpgroup (4 consecutive warps) issues each wgmma; each warp owns 16
// consecutive rows (Acc<16, N>, the mma.sync layout that wgmma's accumulator shares), so its A
// operand is its own mma.sync A fragments and its accumulator slice is its own.  A warp of
// 16·FM rows (the forward's mma_abt and mma_ab) issues FM wgmmas a k-step, one per 16-row block:
// A comes from registers, so the rows a wgmma's warps bring need not be adjacent.
namespace mfa {

template <>
struct BTile<1> {
  // Copy a ROWS x COLS tile into the layout with all NT threads, 16 bytes per copy, consecutive
  // threads on consecutive chunks of a row; rows >= rows_valid are zero-filled and not read.
  template <int ROWS, int COLS, int NT, typename T>
  MFA_FUNC static void copy_async(MFA_TG T* dst, int, MFA_DEV const T* src, int lds, int rows_valid, int tid) {
    static_assert(ROWS % 8 == 0 && COLS % 64 == 0 && sizeof(T) == 2, "swizzled tiles: rows in 8s, 64-column blocks");
    MFA_TG unsigned char* bytes = reinterpret_cast<MFA_TG unsigned char*>(dst);
    MFA_UNROLL
    for (int step = 0; step < Chunks<ROWS, COLS, NT, T>::STEPS; ++step) {
      int r, e;
      if (!Chunks<ROWS, COLS, NT, T>::at(step, tid, r, e)) continue;
      const bool valid = r < rows_valid;
      const int c = e / 8;
      mfa_copy16(bytes + (c / 8) * ROWS * 128 + r * 128 + ((c % 8) ^ (r % 8)) * 16, src + (valid ? r * lds + e : 0),
                 valid);
    }
  }

  // cp.async writes reach wgmma's reads (the async proxy) only through a proxy fence.
  MFA_FUNC static void publish() { mfa_proxy_fence(); }

  // A fragments of k-steps g .. g+KG-1 of this warp's 16 rows of a (row-major in shared memory).
  template <int KG, typename T>
  MFA_FUNC static void load_a(MFA_THR unsigned (&fa)[KG][4], MFA_TG const T* a, int lda, int g, LaneCoord lc) {
    MFA_UNROLL
    for (int kk = 0; kk < KG; ++kk) {
      AFrags<16> f;
      load_a_shared(f, a, lda, g + kk, lc.lane);
      MFA_UNROLL
      for (int r = 0; r < 4; ++r) fa[kk][r] = f.f[0][r];
    }
  }

  // Issue c (16 x N) += fa · bᵀ over k-steps g .. g+KG-1 (g a multiple of 4) of an N x K tile b:
  // k-major B, k-step g + kk starts 32·kk bytes into the rows of column block g / 4.
  template <int KG, int N, typename T>
  MFA_FUNC static void issue_abt(MFA_THR float* c, MFA_THR unsigned (&fa)[KG][4], MFA_TG const T* b, int g) {
    MFA_TG const unsigned char* base = reinterpret_cast<MFA_TG const unsigned char*>(b) + (g / 4) * N * 128;
    MFA_UNROLL
    for (int kk = 0; kk < KG; ++kk) {
      MFA_UNROLL
      for (int n = 0; n < N / 64; ++n) mfa_wgmma_n64<T, 0>(c + 32 * n, fa[kk], base + 32 * kk + 64 * 128 * n, 16, 1024);
    }
  }

  // Issue c (16 x N) += fa · b over the K/16 k-steps of a K x N tile b: n-major B, k-step kk
  // starts at row 16·kk, column block n at K·128 bytes per block.
  template <int K, int N, typename T>
  MFA_FUNC static void issue_ab(MFA_THR float* c, MFA_THR unsigned (&fa)[K / 16][4], MFA_TG const T* b) {
    MFA_TG const unsigned char* base = reinterpret_cast<MFA_TG const unsigned char*>(b);
    MFA_UNROLL
    for (int kk = 0; kk < K / 16; ++kk) {
      MFA_UNROLL
      for (int n = 0; n < N / 64; ++n)
        mfa_wgmma_n64<T, 1>(c + 32 * n, fa[kk], base + 16 * 128 * kk + K * 128 * n, K * 128, 1024);
    }
  }

  // c (M x N) += a (M x K rows of this warp, row-major in shared memory) · bᵀ, b an N x K tile,
  // in groups of up to 4 k-steps (one 64-column block of b), whose A fragments stay live until
  // the group's wait; M = 16·FM: FM products a k-step, each 16-row block into its accumulator block.
  template <int K, int M, int N, typename T>
  MFA_FUNC static void mma_abt(MFA_THR Acc<M, N>& c, MFA_TG const T* a, int lda, MFA_TG const T* b, int,
                               LaneCoord lc) {
    static_assert(M % 16 == 0 && N % 64 == 0 && K % 64 == 0, "wgmma products: rows in 16s per warp, N and K in 64s");
    constexpr int FM = M / 16;
    MFA_UNROLL
    for (int g = 0; g < K / 16; g += 4) {
      unsigned fa[FM][4][4];
      MFA_UNROLL
      for (int fi = 0; fi < FM; ++fi) load_a<4>(fa[fi], a + 16 * fi * lda, lda, g, lc);
      mfa_wgmma_fence();
      MFA_UNROLL
      for (int fi = 0; fi < FM; ++fi) issue_abt<4, N, T>(c.v + fi * (N / 2), fa[fi], b, g);
      mfa_wgmma_commit_wait();
      mfa_fence_regs<Acc<M, N>::SIZE>(c.v);
      mfa_fence_regs<16 * FM>(&fa[0][0][0]);
    }
  }

  // c1 += a1 · b1ᵀ and c2 += a2 · b2ᵀ, independent products in flight together (K = 64: one
  // group of k-steps each; larger K runs them one after the other).
  template <int K, int M, int N, typename T>
  MFA_FUNC static void mma_abt2(MFA_THR Acc<M, N>& c1, MFA_TG const T* a1, MFA_TG const T* b1, MFA_THR Acc<M, N>& c2,
                                MFA_TG const T* a2, MFA_TG const T* b2, int lda, LaneCoord lc) {
    if (K != 64) {
      mma_abt<K>(c1, a1, lda, b1, 0, lc);
      mma_abt<K>(c2, a2, lda, b2, 0, lc);
      return;
    }
    unsigned fa1[4][4], fa2[4][4];
    load_a<4>(fa1, a1, lda, 0, lc);
    load_a<4>(fa2, a2, lda, 0, lc);
    mfa_wgmma_fence();
    issue_abt<4, N, T>(c1.v, fa1, b1, 0);
    issue_abt<4, N, T>(c2.v, fa2, b2, 0);
    mfa_wgmma_commit_wait();
    mfa_fence_regs<Acc<M, N>::SIZE>(c1.v);
    mfa_fence_regs<Acc<M, N>::SIZE>(c2.v);
    mfa_fence_regs<16>(&fa1[0][0]);
    mfa_fence_regs<16>(&fa2[0][0]);
  }

  // c (M x N) += p (M x K accumulator of this warp, rounded to T; SPLIT = 1 adds its rounding
  // residual in a second product) · b, b a K x N tile; M = 16·FM: each 16-row block of p into
  // its accumulator block.
  template <int K, int SPLIT, int M, int N, typename T>
  MFA_FUNC static void mma_ab(MFA_THR Acc<M, N>& c, MFA_THR const Acc<M, K>& p, MFA_TG const T* b, int,
                              LaneCoord) {
    static_assert(M % 16 == 0 && N % 64 == 0 && K % 16 == 0, "wgmma products: rows in 16s per warp, N in 64s");
    constexpr int FM = M / 16;
    unsigned fa[FM][K / 16][4], fr[SPLIT ? FM : 1][K / 16][4];
    MFA_UNROLL
    for (int fi = 0; fi < FM; ++fi) {
      MFA_UNROLL
      for (int kk = 0; kk < K / 16; ++kk) {
        pack_a<T, 0>(fa[fi][kk], p, fi, kk);
        if (SPLIT) pack_a<T, 1>(fr[SPLIT ? fi : 0][kk], p, fi, kk);
      }
    }
    mfa_wgmma_fence();
    MFA_UNROLL
    for (int fi = 0; fi < FM; ++fi) {
      issue_ab<K, N, T>(c.v + fi * (N / 2), fa[fi], b);
      if (SPLIT) issue_ab<K, N, T>(c.v + fi * (N / 2), fr[SPLIT ? fi : 0], b);
    }
    mfa_wgmma_commit_wait();
    mfa_fence_regs<Acc<M, N>::SIZE>(c.v);
    mfa_fence_regs<4 * (K / 16) * FM>(&fa[0][0][0]);
    if (SPLIT) mfa_fence_regs<4 * (K / 16) * FM>(&fr[0][0][0]);
  }

  // c1 += p1 · b1 and c2 += p2 · b2 (as mma_ab, SPLIT = 0), independent products in flight together.
  template <int K, int M, int N, typename T>
  MFA_FUNC static void mma_ab2(MFA_THR Acc<M, N>& c1, MFA_THR const Acc<M, K>& p1, MFA_TG const T* b1,
                               MFA_THR Acc<M, N>& c2, MFA_THR const Acc<M, K>& p2, MFA_TG const T* b2, int,
                               LaneCoord) {
    static_assert(M == 16 && N % 64 == 0 && K % 16 == 0, "wgmma products: 16 rows per warp, N in 64s");
    unsigned fa1[K / 16][4], fa2[K / 16][4];
    MFA_UNROLL
    for (int kk = 0; kk < K / 16; ++kk) {
      pack_a<T, 0>(fa1[kk], p1, 0, kk);
      pack_a<T, 0>(fa2[kk], p2, 0, kk);
    }
    mfa_wgmma_fence();
    issue_ab<K, N, T>(c1.v, fa1, b1);
    issue_ab<K, N, T>(c2.v, fa2, b2);
    mfa_wgmma_commit_wait();
    mfa_fence_regs<Acc<M, N>::SIZE>(c1.v);
    mfa_fence_regs<Acc<M, N>::SIZE>(c2.v);
    mfa_fence_regs<4 * (K / 16)>(&fa1[0][0]);
    mfa_fence_regs<4 * (K / 16)>(&fa2[0][0]);
  }

  // dst[c·ld + r] = a(r, c) as T (2-byte; ld and dst 16-byte aligned): stmatrix .trans stores
  // four 8x8 matrices of the accumulator a lane-row at a time, the 8 rows of a fragment half
  // becoming 8 consecutive elements of a row of dst.
  template <typename T, int M, int N>
  MFA_FUNC static void store_transposed(MFA_THR const Acc<M, N>& a, MFA_TG T* dst, int ld, LaneCoord lc) {
    static_assert(sizeof(T) == 2 && N % 16 == 0, "stmatrix: 2-byte elements, fragment columns in pairs");
    const int m = lc.lane / 8, i = lc.lane % 8;  // this lane addresses row i of matrix m
    MFA_UNROLL
    for (int fi = 0; fi < M / 16; ++fi) {
      MFA_UNROLL
      for (int fj = 0; fj < N / 8; fj += 2) {
        // matrices: rows 0-7 and 8-15 of fragment (fi, fj), then of (fi, fj + 1)
        const float* f = a.v + (fi * (N / 8) + fj) * 4;
        const unsigned r[4] = {mfa_pack2<T>(f[0], f[1]), mfa_pack2<T>(f[2], f[3]), mfa_pack2<T>(f[4], f[5]),
                               mfa_pack2<T>(f[6], f[7])};
        mfa_stmatrix_x4_trans(r, dst + (8 * (fj + m / 2) + i) * ld + 16 * fi + 8 * (m % 2));
      }
    }
  }
};

}  // namespace mfa
