// Tile layer, common part: the products of shared tiles by name, cooperative copies between
// device and threadgroup memory, and stores of accumulators and per-row vectors.  Built on the
// prelude's dialect and on the fragment family included before it (frag_simdgroup.h or
// frag_mma.h), which supplies Acc, AFrags and mma_shared.
namespace mfa {

// c (M x N) += a (M x K) * b^T, a and b (N x K) row-major in threadgroup memory.
template <int K, int M, int N, typename T>
MFA_FUNC void mma_abt(MFA_THR Acc<M, N>& c, MFA_TG const T* a, int lda, MFA_TG const T* b, int ldb, LaneCoord lc) {
  mma_shared<K, 1>(c, a, lda, b, ldb, lc);
}

// c (M x N) += a (M x K) * b, a and b (K x N) row-major in threadgroup memory.
template <int K, int M, int N, typename T>
MFA_FUNC void mma_ab_shared(MFA_THR Acc<M, N>& c, MFA_TG const T* a, int lda, MFA_TG const T* b, int ldb,
                            LaneCoord lc) {
  mma_shared<K, 0>(c, a, lda, b, ldb, lc);
}

// The copy and the products of a B tile: a tile that the kernels only ever use as the B operand
// of products (K and V in the forward and dq kernels; Q and dO in the dk/dv kernel), kept in the
// layout those products read.  BTile<0>: row-major with padded rows, read by the fragment
// family's loads.  BTile<1> (frag_wgmma.h, CUDA only): 128-byte swizzled rows read by wgmma,
// for tiles whose warps own 16 consecutive rows each, 4 warps to a warpgroup.
template <int WG>
struct BTile;

// The 16-byte chunks of a ROWS x COLS tile of T shared out over NT threads: thread tid takes
// chunks tid, tid + NT, ... (consecutive threads on consecutive chunks of a row).
template <int ROWS, int COLS, int NT, typename T>
struct Chunks {
  enum : int { E = 16 / int(sizeof(T)), CPR = COLS / E, COUNT = ROWS * CPR, STEPS = (COUNT + NT - 1) / NT };
  static_assert(COLS % E == 0, "tile rows must be whole 16-byte chunks");
  // The row and first column of thread tid's chunk at `step`; false past the tile's end.
  MFA_FUNC static bool at(int step, int tid, MFA_THR int& r, MFA_THR int& e) {
    const int i = step * NT + tid;
    r = i / CPR;
    e = (i % CPR) * E;
    return COUNT % NT == 0 || i < COUNT;
  }
};

// Copy a ROWS x COLS tile (row stride lds) into threadgroup memory (row stride ldd) with all
// NT threads, 16 bytes per copy; rows >= rows_valid and columns >= cols_valid (a multiple of
// 16 bytes) are zero-filled and not read.  Asynchronous on CUDA: follow with mfa_async_commit()
// and mfa_async_wait<n>() before a barrier.
template <int ROWS, int COLS, int NT, typename T>
MFA_FUNC void copy_tile_async(MFA_TG T* dst, int ldd, MFA_DEV const T* src, int lds, int rows_valid,
                              int tid, int cols_valid = COLS) {
  MFA_UNROLL
  for (int step = 0; step < Chunks<ROWS, COLS, NT, T>::STEPS; ++step) {
    int r, e;
    if (!Chunks<ROWS, COLS, NT, T>::at(step, tid, r, e)) continue;
    const bool valid = r < rows_valid && e < cols_valid;
    mfa_copy16(dst + r * ldd + e, src + (valid ? r * lds + e : 0), valid);
  }
}

// Copy rows < rows_valid and columns < cols_valid (a multiple of 16 bytes) of a ROWS x COLS
// threadgroup tile (row stride lds) to device memory (row stride ldd) with all NT threads,
// 16 bytes per store: a warp writes whole rows.
template <int ROWS, int COLS, int NT, typename T>
MFA_FUNC void store_tile(MFA_DEV T* dst, int ldd, MFA_TG const T* src, int lds, int rows_valid, int tid,
                         int cols_valid = COLS) {
  MFA_UNROLL
  for (int step = 0; step < Chunks<ROWS, COLS, NT, T>::STEPS; ++step) {
    int r, e;
    if (!Chunks<ROWS, COLS, NT, T>::at(step, tid, r, e)) continue;
    if (r < rows_valid && e < cols_valid) mfa_store16(dst + r * ldd + e, src + r * lds + e);
  }
}

// A warp's M x N tile of threadgroup memory seen in its accumulator layout: after load(src, ld,
// lc), get(i) is element (Acc<M, N>::row(lc, i), Acc<M, N>::col(lc, i)) of the tile at src (row
// stride ld), or of its transpose with TRANS (src[col·ld + row]).  This form (PAIRS = 0) reads
// each element at get(); the fragment family may load some types ahead into registers (PAIRS).
template <int M, int N, int TRANS, typename T>
struct AccTile<M, N, TRANS, T, 0> {
  MFA_TG const T* src;
  int ld;
  LaneCoord lc;
  MFA_FUNC void load(MFA_TG const T* tile, int stride, LaneCoord c) { src = tile, ld = stride, lc = c; }
  MFA_FUNC float get(int i) const {
    const int r = Acc<M, N>::row(lc, i), c = Acc<M, N>::col(lc, i);
    return float(TRANS ? src[c * ld + r] : src[r * ld + c]);
  }
};

// Write a warp's accumulator into threadgroup memory (row stride ld), as T.
template <int M, int N, typename T>
MFA_FUNC void acc_to_shared(MFA_THR const Acc<M, N>& a, MFA_TG T* dst, int ld, LaneCoord lc) {
  MFA_UNROLL
  for (int i = 0; i < Acc<M, N>::SIZE; ++i) dst[Acc<M, N>::row(lc, i) * ld + Acc<M, N>::col(lc, i)] = static_cast<T>(a.v[i]);
}

// Add a warp's M x N accumulator to rows < rows_valid of float device memory dst (row stride N)
// by bulk reductions: the warp writes its rows into `stage` (float, row stride ld; rows and dst
// 16-byte aligned), then lane r adds row r.  Asynchronous on CUDA: the lanes call
// mfa_bulk_wait_read() before `stage` is written again and mfa_bulk_wait() before returning.
template <int M, int N>
MFA_FUNC void add_acc_rows_async(MFA_THR const Acc<M, N>& a, MFA_TG float* stage, int ld, MFA_DEV float* dst,
                                 int rows_valid, LaneCoord lc) {
  acc_to_shared(a, stage, ld, lc);
  mfa_bulk_fence();
  mfa_warp_sync();
  for (int r = lc.lane; r < M && r < rows_valid; r += 32) mfa_bulk_add(dst + r * N, stage + r * ld, N * 4);
  mfa_bulk_commit();
}

// Store an accumulator held by all NW warps (warp w owns rows w·M ..) as whole rows: each warp
// writes its rows into `stage` (a ROWS x N threadgroup tile, row stride ld), then all NT threads
// store rows < rows_valid to dst (row stride ldd) 16 bytes at a time.  Every thread calls it,
// after mfa_async_wait<0>() and once no warp reads `stage` any more.
template <int ROWS, int NT, int M, int N, typename T>
MFA_FUNC void store_acc_rows(MFA_THR const Acc<M, N>& a, MFA_TG T* stage, int ld, MFA_DEV T* dst, int ldd,
                             int rows_valid, int warp, int tid, LaneCoord lc) {
  mfa_barrier();  // every thread's copies into the stage have landed and none still reads it
  acc_to_shared(a, stage + warp * M * ld, ld, lc);
  mfa_barrier();
  store_tile<ROWS, N, NT>(dst, ldd, stage, ld, rows_valid, tid);
}

// Write rows < rows_valid of a warp's accumulator to device memory (row stride ld), as T.
template <int M, int N, typename T>
MFA_FUNC void store_acc(MFA_THR const Acc<M, N>& a, MFA_DEV T* dst, int ld, int rows_valid,
                        LaneCoord lc) {
  MFA_UNROLL
  for (int i = 0; i < Acc<M, N>::SIZE; ++i) {
    const int r = Acc<M, N>::row(lc, i);
    if (r < rows_valid) dst[r * ld + Acc<M, N>::col(lc, i)] = static_cast<T>(a.v[i]);
  }
}

// Write rows < rows_valid of a per-row vector (one lane per row writes).
template <int M>
MFA_FUNC void store_rows(MFA_THR const RowVec<M>& v, MFA_DEV float* dst, int rows_valid,
                         LaneCoord lc) {
  if (!RowVec<M>::writer(lc)) return;
  MFA_UNROLL
  for (int s = 0; s < RowVec<M>::SIZE; ++s) {
    const int r = RowVec<M>::row(lc, s);
    if (r < rows_valid) dst[r] = v.v[s];
  }
}

// Read rows < rows_valid of a per-row vector; other rows get `fill`.
template <int M>
MFA_FUNC void load_rows(MFA_THR RowVec<M>& v, MFA_DEV const float* src, int rows_valid, float fill,
                        LaneCoord lc) {
  MFA_UNROLL
  for (int s = 0; s < RowVec<M>::SIZE; ++s) {
    const int r = RowVec<M>::row(lc, s);
    v.v[s] = r < rows_valid ? src[r] : fill;
  }
}

// B tiles in the row-major padded layout of the fragment family's loads (row stride ld).
template <>
struct BTile<0> {
  // Copy a ROWS x COLS tile into the layout, as copy_tile_async.
  template <int ROWS, int COLS, int NT, typename T>
  MFA_FUNC static void copy_async(MFA_TG T* dst, int ldd, MFA_DEV const T* src, int lds, int rows_valid, int tid) {
    copy_tile_async<ROWS, COLS, NT>(dst, ldd, src, lds, rows_valid, tid);
  }
  // After the wait for a tile's copies and before the barrier that publishes it.
  MFA_FUNC static void publish() {}
  // c (M x N) += a (M x K, row-major in threadgroup memory) · bᵀ, b the N x K B tile.
  template <int K, int M, int N, typename T>
  MFA_FUNC static void mma_abt(MFA_THR Acc<M, N>& c, MFA_TG const T* a, int lda, MFA_TG const T* b, int ldb,
                               LaneCoord lc) {
    mfa::mma_abt<K>(c, a, lda, b, ldb, lc);
  }
  // c (M x N) += p (M x K accumulator, see mma_ab) · b, b the K x N B tile.
  template <int K, int SPLIT, int M, int N, typename T>
  MFA_FUNC static void mma_ab(MFA_THR Acc<M, N>& c, MFA_THR const Acc<M, K>& p, MFA_TG const T* b, int ldb,
                              LaneCoord lc) {
    mfa::mma_ab<K, SPLIT>(c, p, b, ldb, lc);
  }
  // Two independent products (BTile<1> has them in flight together); here one after the other.
  template <int K, int M, int N, typename T>
  MFA_FUNC static void mma_abt2(MFA_THR Acc<M, N>& c1, MFA_TG const T* a1, MFA_TG const T* b1, MFA_THR Acc<M, N>& c2,
                                MFA_TG const T* a2, MFA_TG const T* b2, int ld, LaneCoord lc) {
    mfa::mma_abt<K>(c1, a1, ld, b1, ld, lc);
    mfa::mma_abt<K>(c2, a2, ld, b2, ld, lc);
  }
  template <int K, int M, int N, typename T>
  MFA_FUNC static void mma_ab2(MFA_THR Acc<M, N>& c1, MFA_THR const Acc<M, K>& p1, MFA_TG const T* b1,
                               MFA_THR Acc<M, N>& c2, MFA_THR const Acc<M, K>& p2, MFA_TG const T* b2, int ld,
                               LaneCoord lc) {
    mfa::mma_ab<K, 0>(c1, p1, b1, ld, lc);
    mfa::mma_ab<K, 0>(c2, p2, b2, ld, lc);
  }
  // dst[c·ld + r] = a(r, c) as T: the transpose of this warp's accumulator, element by element.
  template <typename T, int M, int N>
  MFA_FUNC static void store_transposed(MFA_THR const Acc<M, N>& a, MFA_TG T* dst, int ld, LaneCoord lc) {
    MFA_UNROLL
    for (int i = 0; i < Acc<M, N>::SIZE; ++i)
      dst[Acc<M, N>::col(lc, i) * ld + Acc<M, N>::row(lc, i)] = static_cast<T>(a.v[i]);
  }
};

// The kernels' entry points to BTile<WG> (free functions, so that calls need no `template`
// disambiguator where WG is a template parameter, as in Metal).
template <int WG, int ROWS, int COLS, int NT, typename T>
MFA_FUNC void copy_b_tile_async(MFA_TG T* dst, int ldd, MFA_DEV const T* src, int lds, int rows_valid, int tid) {
  BTile<WG>::template copy_async<ROWS, COLS, NT>(dst, ldd, src, lds, rows_valid, tid);
}
template <int WG>
MFA_FUNC void publish_b_tiles() {
  BTile<WG>::publish();
}
template <int WG, int K, int M, int N, typename T>
MFA_FUNC void mma_abt_b(MFA_THR Acc<M, N>& c, MFA_TG const T* a, int lda, MFA_TG const T* b, int ldb, LaneCoord lc) {
  BTile<WG>::template mma_abt<K>(c, a, lda, b, ldb, lc);
}
template <int WG, int K, int SPLIT, int M, int N, typename T>
MFA_FUNC void mma_ab_b(MFA_THR Acc<M, N>& c, MFA_THR const Acc<M, K>& p, MFA_TG const T* b, int ldb, LaneCoord lc) {
  BTile<WG>::template mma_ab<K, SPLIT>(c, p, b, ldb, lc);
}
// c1 += a1·b1ᵀ and c2 += a2·b2ᵀ: two independent products (a rows of stride ld, B tiles).
template <int WG, int K, int M, int N, typename T>
MFA_FUNC void mma_abt_b2(MFA_THR Acc<M, N>& c1, MFA_TG const T* a1, MFA_TG const T* b1, MFA_THR Acc<M, N>& c2,
                         MFA_TG const T* a2, MFA_TG const T* b2, int ld, LaneCoord lc) {
  BTile<WG>::template mma_abt2<K>(c1, a1, b1, c2, a2, b2, ld, lc);
}
// c1 += p1·b1 and c2 += p2·b2: two independent products of accumulators by B tiles.
template <int WG, int K, int M, int N, typename T>
MFA_FUNC void mma_ab_b2(MFA_THR Acc<M, N>& c1, MFA_THR const Acc<M, K>& p1, MFA_TG const T* b1, MFA_THR Acc<M, N>& c2,
                        MFA_THR const Acc<M, K>& p2, MFA_TG const T* b2, int ld, LaneCoord lc) {
  BTile<WG>::template mma_ab2<K>(c1, p1, b1, c2, p2, b2, ld, lc);
}
// dst[c·ld + r] = a(r, c) as T, for this warp's accumulator (BTile<1>: by stmatrix; T 16-bit there).
template <int WG, typename T, int M, int N>
MFA_FUNC void acc_to_shared_transposed(MFA_THR const Acc<M, N>& a, MFA_TG T* dst, int ld, LaneCoord lc) {
  BTile<WG>::store_transposed(a, dst, ld, lc);
}

}  // namespace mfa
