// The attention variants shared by the attention kernels: where a threadgroup's rows and keys
// lie (dense batch row or varlen sequence), which key tiles it visits (a band, or a block-sparse
// list with per-tile element bitmasks), and the dropout mask.
//
// Runtime sizes and flags come in the int32 `params` buffer, indexed by `Param`; the Python
// launcher (mfa/kernels/attention.py) writes them in this order.
namespace mfa {

enum Param : int {
  kH = 0,
  kHKV,
  kNQ,             // query rows per head in memory (the packed total for varlen)
  kNK,             // key rows per head in memory
  kLeft,           // band: i' - left <= j <= i' + right (kUnbounded: no bound)
  kRight,
  kHasSinks,
  kSlopesPerRow,   // slopes are (B, H) (dense) / (S, H) (varlen) rather than (H,)
  kDropThreshold,  // dropout: keep when 24 hash bits >= threshold
  kDropSeed,
  kBiasStrideB,    // bias (B|1, H|1, NQ|1, NK|1): element strides, 0 on broadcast axes
  kBiasStrideH,
  kBiasStrideQ,
  kBiasStrideK,
  kBiasUnique,     // each dbias entry has one writer: plain stores, else atomic adds
  kNumSeqs,        // varlen: S sequences
  kMaskB,          // block-sparse: the mask's batch and head extents (1 or B, 1 or H)
  kMaskH,
  kBatchLoop,      // B when each dq threadgroup runs every batch row (a bias shared by the batch
                   // with a per-element dbias: the rows' dS are summed in place), else 0
  kBiasZeroed,     // dbias was zero-filled by the launcher (tiles that are never visited)
  kBatchTotal,     // a batch loop's last row writes the sums in the bias's dtype (dbias_total)
  kNumParams
};

// How a threadgroup's share of dS reaches dbias.
enum DbiasWrite : int {
  kDbiasAtomic = 0,  // float32 atomic adds: other threadgroups write the same entries
  kDbiasStore,       // plain stores: this threadgroup is each entry's only writer
  kDbiasAdd,         // float32 read, add, write: the only writer, a batch row after the first
  kDbiasTotal,       // float32 read, add, then written to dbias_total: a batch loop's last row
};

// Whether a write covers every entry of the tiles it visits (masked ones get their zero).
MFA_FUNC bool dbias_writes_all(int write) { return write == kDbiasStore || write == kDbiasTotal; }

// The write of batch row b's dS: stores where each entry has one writer; in a batch loop
// (kBatchLoop), stores for the first row (adds when dbias was zero-filled), adds for the rest, the
// last one into dbias_total with kBatchTotal; else atomic adds.
MFA_FUNC int dbias_write(MFA_DEV const int* params, int b) {
  if (params[kBiasUnique] != 0) return kDbiasStore;
  if (params[kBatchLoop] == 0) return kDbiasAtomic;
  if (b + 1 == params[kBatchLoop] && params[kBatchTotal] != 0) return kDbiasTotal;
  return b == 0 && params[kBiasZeroed] == 0 ? kDbiasStore : kDbiasAdd;
}

// One sequence of the call, in local coordinates: query rows [0, nq) are rows q_lo.. of the
// packed arrays, keys [0, nk) are rows k_lo..; `tile` is this threadgroup's tile in it.
struct Segment {
  int q_lo, nq, k_lo, nk, seg, tile;
  bool valid;

  // Dense calls: the whole batch row b; the tile is the grid position.
  MFA_FUNC static Segment dense(int x, int b, int NQ, int NK) {
    Segment s;
    s.q_lo = 0;
    s.nq = NQ;
    s.k_lo = 0;
    s.nk = NK;
    s.seg = b;
    s.tile = x;
    s.valid = true;
    return s;
  }

  // Varlen: sched = [cu_q (S+1), cu_k (S+1), tiles (S)], tiles[s] = number of tiles (query or key
  // tiles, whichever the kernel walks) in sequences 0..s.  Grid position x is tile
  // x - tiles[s-1] of the first sequence s with tiles[s] > x; past the last tile, !valid.
  MFA_FUNC static Segment packed(int x, int S, MFA_DEV const int* sched) {
    MFA_DEV const int* cu_q = sched;
    MFA_DEV const int* cu_k = sched + S + 1;
    MFA_DEV const int* tiles = sched + 2 * (S + 1);
    int lo = 0, hi = S;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (tiles[mid] > x) hi = mid;
      else lo = mid + 1;
    }
    Segment s;
    s.valid = lo < S;
    const int i = s.valid ? lo : 0;
    s.seg = i;
    s.tile = x - (i > 0 ? tiles[i - 1] : 0);
    s.q_lo = cu_q[i];
    s.nq = cu_q[i + 1] - cu_q[i];
    s.k_lo = cu_k[i];
    s.nk = cu_k[i + 1] - cu_k[i];
    return s;
  }

  template <int VARLEN>
  MFA_FUNC static Segment of(int x, int b, MFA_DEV const int* params, MFA_DEV const int* sched) {
    return VARLEN ? packed(x, params[kNumSeqs], sched) : dense(x, b, params[kNQ], params[kNK]);
  }
};

// Block-sparse schedules (mfa/kernels/sparse.py): sched = [offsets (ROWS + 1), entries, order
// (ROWS)], the entries of list r at [offsets[r], offsets[r+1]), each `W` ints.  Forward and dq:
// one list per (mask batch, mask head, query tile), entries (key tile, partial); dk/dv: one per
// (mask batch, key/value head or 1, key tile), entries (group head, query tile, partial).
// `partial` indexes the element bitmask of a tile that is neither empty nor full, or is -1.
// `order` holds, per (mask batch, head), its tiles by decreasing list length.
template <int W>
struct TileList {
  MFA_DEV const int* entries;
  int count;

  MFA_FUNC static TileList at(MFA_DEV const int* sched, int rows, int r) {
    TileList l;
    l.entries = sched + (rows + 1) + W * sched[r];
    l.count = sched[r + 1] - sched[r];
    return l;
  }
  MFA_FUNC int get(int n, int field) const { return entries[W * n + field]; }
};

// The block-sparse lists of one (batch b, head h): row `row` of the (mask batch, mask head) rows
// of `tiles` lists each, `rows` lists in all.  `heads`: the heads of the kernel's grid (H; HKV in
// dk/dv, whose lists are per key/value head); a mask with one head (or batch) serves them all.
template <int W>
struct MaskRow {
  MFA_DEV const int* sched;
  int rows, row, tiles;

  MFA_FUNC static MaskRow of(MFA_DEV const int* sched, MFA_DEV const int* params, int b, int h, int heads,
                             int tiles) {
    const int mask_heads = params[kMaskH] > 1 ? heads : 1;
    MaskRow m;
    m.sched = sched;
    m.rows = params[kMaskB] * mask_heads * tiles;
    m.row = (params[kMaskB] > 1 ? b : 0) * mask_heads + (params[kMaskH] > 1 ? h : 0);
    m.tiles = tiles;
    return m;
  }
  // The tile that threadgroup `x` takes: by decreasing list length (sched's `order`), longest first.
  MFA_FUNC int ordered(int x) const { return sched[(rows + 1) + W * sched[rows] + row * tiles + x]; }
  // The list of tile `t`.
  MFA_FUNC TileList<W> list(int t) const { return TileList<W>::at(sched, rows, row * tiles + t); }
};

// Element (row, col) of partial tile `p` (ROWS x COLS, one 32-bit word per 32 columns of a row).
template <int ROWS, int COLS>
MFA_FUNC bool tile_bit(MFA_DEV const unsigned* bits, int p, int row, int col) {
  enum : int { WORDS = (COLS + 31) / 32 };
  return (bits[(p * ROWS + row) * WORDS + col / 32] >> (col % 32)) & 1u;
}

// Which of a thread's accumulator elements (A: Acc<M, N>, rows query rows) a BQ x BK tile keeps,
// one bit each (`keep_bits`), so that a score loop tests one bit an element.  The block-sparse dq
// kernel's loop uses it: its `inside || band.keep` and partial-tile tests cost instructions on
// every element, also of whole tiles (H100, block-sparse N = 16384: 232M -> 197M instructions,
// 521 -> 451 µs).  Elsewhere the bit test cost more than it saved: the block-sparse forward 364
// -> 379 µs and dk/dv 538 -> 601 µs, causal fwd+bwd 0.81 -> 0.84 ms.
template <class A>
struct KeepBits {
  enum : int { WORDS = (A::SIZE + 31) / 32 };
  unsigned w[WORDS];
  MFA_FUNC bool get(int i) const { return (w[i / 32] >> (i % 32)) & 1u; }
};

// A tile wholly inside the band (`whole`) and not a partial block-sparse tile keeps every
// element: its bits are set without the band's four comparisons an element.  row0: this warp's
// first query row; q0, k0: the tile's first query row and key.
template <class A, int SPARSE, int BQ, int BK>
MFA_FUNC KeepBits<A> keep_bits(const Band& band, bool whole, MFA_DEV const unsigned* bits, int partial, int row0,
                               int q0, int k0, LaneCoord lc) {
  KeepBits<A> kb;
  MFA_UNROLL
  for (int k = 0; k < KeepBits<A>::WORDS; ++k) kb.w[k] = ~0u;
  if (whole && !(SPARSE && partial >= 0)) return kb;
  MFA_UNROLL
  for (int i = 0; i < A::SIZE; ++i) {
    const int r = row0 + A::row(lc, i), j = k0 + A::col(lc, i);
    bool keep = band.keep(r, j);
    if (SPARSE && partial >= 0) keep = keep && tile_bit<BQ, BK>(bits, partial, r - q0, j - k0);
    if (!keep) kb.w[i / 32] &= ~(1u << (i % 32));
  }
  return kb;
}

// Dropout (mfa/ops/dropout.py): attention weight (head, row, col) survives when
//   stream = mix(seed ^ mix(head ^ GOLDEN)),  x = mix(mix(row ^ stream) + col * GOLDEN),
//   (x >> 8) >= threshold,
// with mix the lowbias32 finalizer; row and col index the packed score matrix.  The row key
// mix(row ^ stream) is the same for every weight of a row (the compiler computes it once per
// row of a thread's fragment), so a weight costs one multiply-add and one mix.
MFA_FUNC unsigned dropout_mix(unsigned x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

struct Dropout {
  unsigned stream, threshold;  // threshold: of the 24 high bits
  float scale;                 // 1 / (1 - p)

  MFA_FUNC static Dropout from(MFA_DEV const int* params, float scale, int head) {
    Dropout d;
    d.stream = dropout_mix(unsigned(params[kDropSeed]) ^ dropout_mix(unsigned(head) ^ 0x9E3779B9u));
    d.threshold = unsigned(params[kDropThreshold]);
    d.scale = scale;
    return d;
  }
  // The factor of weight (row, col): 1/(1-p) when kept, 0 when dropped.
  MFA_FUNC float factor(int row, int col) const {
    const unsigned x = dropout_mix(dropout_mix(unsigned(row) ^ stream) + unsigned(col) * 0x9E3779B9u);
    return (x >> 8) >= threshold ? scale : 0.0f;
  }
};

// Reduce per-lane partial row sums over the lanes that share each row.
template <int M>
MFA_FUNC void reduce_rows(MFA_THR RowVec<M>& v) {
  MFA_UNROLL
  for (int s = 0; s < RowVec<M>::SIZE; ++s) {
    v.v[s] += mfa_shfl_xor(v.v[s], kRowXor0);
    v.v[s] += mfa_shfl_xor(v.v[s], kRowXor1);
  }
}

// Add `value` to dbias entry `i` as `write` (DbiasWrite) says: a plain store, an in-place add or an
// atomic add into the float32 buffer, or the float32 entry plus `value` stored to `total` (in its
// dtype; unused by the other writes).
template <typename TDB, typename TT>
MFA_FUNC void dbias_add(MFA_DEV TDB* dbias, long i, float value, int write, MFA_DEV TT* total) {
  if (write == kDbiasStore) dbias[i] = static_cast<TDB>(value);
  else if (write == kDbiasAdd) reinterpret_cast<MFA_DEV float*>(dbias)[i] += value;
  else if (write == kDbiasTotal) total[i] = static_cast<TT>(reinterpret_cast<MFA_DEV float*>(dbias)[i] + value);
  else mfa_atomic_add(reinterpret_cast<MFA_DEV float*>(dbias) + i, value);
}

// Add a ROWS x COLS tile of threadgroup memory (TDB, row stride lds) to dbias: entry (r, c) goes
// to dbias[at + r·ld + c] for r < rows_valid, c < cols_valid (a multiple of 16 bytes), as `write`
// (DbiasWrite) says.  Stores: whole 16-byte row chunks; in-place adds (float32 dbias, or into
// `total`): 16-byte chunks; atomic adds: entry by entry (zeros skipped), consecutive threads on
// consecutive entries (not unrolled: that would keep every step's address and value live at once).
template <int ROWS, int COLS, int NT, typename TDB, typename TT>
MFA_FUNC void dbias_add_tile(MFA_DEV TDB* dbias, long at, int ld, MFA_TG const TDB* src, int lds,
                             int rows_valid, int cols_valid, int write, MFA_DEV TT* total, int tid) {
  if (write == kDbiasStore) {
    store_tile<ROWS, COLS, NT>(dbias + at, ld, src, lds, rows_valid, tid, cols_valid);
    return;
  }
  if (write == kDbiasAdd || write == kDbiasTotal) {
    // in place (or into total), a 16-byte chunk per step, every step's read issued before the
    // first add (one memory latency per tile, not one per entry)
    typedef Chunks<ROWS, COLS, NT, float> C;
    MFA_DEV float* base = reinterpret_cast<MFA_DEV float*>(dbias) + at;
    float old[C::STEPS][4];
    int rows[C::STEPS], cols[C::STEPS];
    bool valid[C::STEPS];
    MFA_UNROLL
    for (int step = 0; step < C::STEPS; ++step) {
      valid[step] = C::at(step, tid, rows[step], cols[step]) && rows[step] < rows_valid && cols[step] < cols_valid;
      MFA_UNROLL
      for (int u = 0; u < 4; ++u) old[step][u] = valid[step] ? base[long(rows[step]) * ld + cols[step] + u] : 0.0f;
    }
    MFA_UNROLL
    for (int step = 0; step < C::STEPS; ++step) {
      if (!valid[step]) continue;
      const int r = rows[step], e = cols[step];
      MFA_UNROLL
      for (int u = 0; u < 4; ++u) {
        const float sum = old[step][u] + float(src[r * lds + e + u]);
        if (write == kDbiasTotal) total[at + long(r) * ld + e + u] = static_cast<TT>(sum);
        else base[long(r) * ld + e + u] = sum;
      }
    }
    return;
  }
  MFA_NO_UNROLL
  for (int e = tid; e < ROWS * COLS; e += NT) {
    const int r = e / COLS, c = e % COLS;
    const float value = float(src[r * lds + c]);
    if (r < rows_valid && c < cols_valid && value != 0.0f)
      mfa_atomic_add(reinterpret_cast<MFA_DEV float*>(dbias) + at + long(r) * ld + c, value);
  }
}

}  // namespace mfa
