// attention_fwd: out = softmax(s)·v and lse = logsumexp(s) over the kept keys (FlashAttention-2
// forward), s = scale·q·kᵀ → softcap → − slope·|j − i'| → + bias, masked by the band, the
// varlen sequence and the block-sparse pattern; dropout scales the weights of P·V only.
//
// Kernel body only (the `source` of mx.fast.metal_kernel / cuda_kernel); the dialect and the
// tile API come from the header: a prelude, a fragment family, metal/tile.h, metal/band.h and
// metal/variants.h.  One threadgroup per (query tile, head, batch); NW warps, each owning BQ/NW
// query rows; the loop visits only the key tiles of its band (or of its block-sparse list).
//   inputs:   q (B, H, NQ, D), k (B, HKV, NK, D), v (B, HKV, NK, D) in T,
//             params int32 (variants.h: Param), fparams float32 (band.h: Scores; [4] = 1/(1-p)),
//             sinks (H,) float32, slopes (1|B|S, H) float32, bias (B|1, H|1, NQ|1, NK|1) in TB,
//             sched int32 (varlen sequences or block-sparse lists), bits uint32 (partial tiles)
//   outputs:  out (B, H, NQ, D) in T, lse (B, H, NQ) float32 (natural log; -inf on empty rows)
//   template: T, D, BQ, BK, NW, STAGES (key/value tiles in flight), SMEM (shared bytes), the
//             variant switches SOFTCAP, ALIBI, BIAS, VARLEN, SPARSE, DROPOUT (0/1), BIAS_TILE (1:
//             the bias has every query row and key, and its tiles come through shared memory
//             with the key/value tiles), TB (the bias's type) and EXACT (1: out written in
//             float32 from an unrounded P, see mfa/kernels/attention.py), BIAS_LEAD (with
//             BIAS_TILE: the bias tiles are copied that many key tiles further ahead than K and
//             V, through a ring of STAGES + BIAS_LEAD of them), WG (1: K and V are
//             core-matrix B tiles for wgmma, frag_wgmma.h; needs BQ/NW = 16 or 32), HX (1: the
//             grid's x walks the heads and y the tiles, so that the GPU dispatches the same,
//             longest first, tile rank of every head together: see heads_first in
//             mfa/kernels/attention.py)
// Sinks enter the softmax denominator as one more logit per head: the running max and sum
// start at (sink, 1) instead of (-inf, 0).
//   grid (tiles·32·NW, H, B), with HX (H·32·NW, tiles, B); threadgroup (32·NW, 1, 1); tiles =
//   ceil(NQ/BQ), or for varlen the bound (NQ + S·(BQ − 1)) / BQ (threadgroups past the last tile
//   return at once)
using namespace mfa;
constexpr int NT = 32 * NW;
constexpr int WM = BQ / NW;  // query rows per warp
constexpr int LD = D + 8;    // padded row stride of the shared tiles, in elements
constexpr int LDB = BK + 16 / int(sizeof(TB));  // padded row stride of a staged bias tile
constexpr int NB = STAGES + BIAS_LEAD;          // BIAS_TILE: bias tiles in the ring
static_assert(WM % kFragRows == 0, "BQ/NW must be a multiple of the fragment height");
static_assert(BIAS_TILE || BIAS_LEAD == 0, "BIAS_LEAD needs staged bias tiles");
static_assert(SMEM >= (BQ + 2 * STAGES * BK) * LD * int(sizeof(T)) + BIAS_TILE * NB * BQ * LDB * int(sizeof(TB)),
              "SMEM too small");

// this threadgroup's head and grid tile (HX: heads in x, tiles in y)
const int h = int(HX ? threadgroup_position_in_grid.x : threadgroup_position_in_grid.y);
const int grid_tile = int(HX ? threadgroup_position_in_grid.y : threadgroup_position_in_grid.x);
const int b = int(threadgroup_position_in_grid.z);
const int tid = int(thread_index_in_threadgroup);
const int warp = tid / 32;
const LaneCoord lc = lane_coord(tid % 32);

const int H = params[kH], HKV = params[kHKV], NQ = params[kNQ], NK = params[kNK];
const Segment sg = Segment::of<VARLEN>(grid_tile, b, params, sched);
if (!sg.valid) return;
const Band band = Band::from(sg.nq, sg.nk, params[kLeft], params[kRight]);
const bool has_sinks = params[kHasSinks] != 0;
const float slope = ALIBI ? slopes[(params[kSlopesPerRow] != 0 ? sg.seg : 0) * H + h] : 0.0f;
const Scores<SOFTCAP, ALIBI> sc = Scores<SOFTCAP, ALIBI>::from(fparams, slope, sg.nk - sg.nq);
const Dropout drop = Dropout::from(params, fparams[4], b * H + h);
const int nqt = (sg.nq + BQ - 1) / BQ;
// the longest query tiles start first, for load balance: block-sparse, in the order of this
// (batch, head)'s row of lists (sched's `order`, by decreasing list length); causal-like bands,
// the last tiles first
const MaskRow<2> mask_lists = MaskRow<2>::of(sched, params, b, h, H, nqt);
const int qt = SPARSE ? mask_lists.ordered(sg.tile) : band.right < kUnbounded ? nqt - 1 - sg.tile : sg.tile;
const int q0 = qt * BQ;
const int q1 = q0 + BQ < sg.nq ? q0 + BQ : sg.nq;
const int hk = h / (H / HKV);  // GQA: the key/value head shared by this query head

MFA_SHARED(smem, SMEM);
MFA_TG T* sQ = reinterpret_cast<MFA_TG T*>(smem);
MFA_TG T* sKV = sQ + BQ * LD;  // STAGES x (K tile, V tile)
MFA_TG TB* sB = reinterpret_cast<MFA_TG TB*>(sKV + STAGES * 2 * BK * LD);  // BIAS_TILE: NB x bias tile
const long q_rows = long(b * H + h) * NQ + sg.q_lo;  // row 0 of this head's sequence
MFA_DEV const T* Kg = k + (long(b * HKV + hk) * NK + sg.k_lo) * D;
MFA_DEV const T* Vg = v + (long(b * HKV + hk) * NK + sg.k_lo) * D;
const long bias_head = long(b) * params[kBiasStrideB] + long(h) * params[kBiasStrideH];
const int bias_sq = params[kBiasStrideQ], bias_sk = params[kBiasStrideK];

// Key tiles to visit: those intersecting the band of this query tile, or this tile's list.
const int kv_lo = band.key_lo(q0), kv_hi = band.key_hi(q1);
const int t_first = kv_lo / BK;
int ntiles = kv_hi > kv_lo ? (kv_hi + BK - 1) / BK - t_first : 0;
TileList<2> list;
if (SPARSE) {
  list = mask_lists.list(qt);
  ntiles = list.count;
}

copy_tile_async<BQ, D, NT>(sQ, LD, q + (q_rows + q0) * D, D, sg.nq - q0, tid);
mfa_async_commit();

Acc<WM, D> o;
o.zero();
RowVec<WM> m_run, l_run;  // running max (raw units, band.h's Scores) and running sum of exp2((u - max)·unit)
MFA_UNROLL
for (int r = 0; r < RowVec<WM>::SIZE; ++r) {
  m_run.v[r] = has_sinks ? sc.raw_of_logit(sinks[h]) : -MFA_INF;
  l_run.v[r] = has_sinks ? 1.0f : 0.0f;
}
MFA_TG const T* sQw = sQ + warp * WM * LD;
const int row0 = q0 + warp * WM;

// Iteration t computes tile t while tiles t+1 .. t+STAGES-1 are in flight (their bias tiles up
// to t+STAGES-1+BIAS_LEAD; the first BIAS_LEAD iterations copy bias tiles only).  Each iteration
// commits one group, so the wait for tile t's copies is the same with or without the lead.
for (int t = 1 - STAGES - BIAS_LEAD; t < ntiles; ++t) {
  const int tn = t + STAGES - 1;  // the key/value tile copied now
  const int tb = tn + BIAS_LEAD;  // the bias tile copied now
  if (tn >= 0 && tn < ntiles) {
    const int kn = (SPARSE ? list.get(tn, 0) : t_first + tn) * BK;
    MFA_TG T* dst = sKV + (tn % STAGES) * 2 * BK * LD;
    copy_b_tile_async<WG, BK, D, NT>(dst, LD, Kg + long(kn) * D, D, sg.nk - kn, tid);
    copy_b_tile_async<WG, BK, D, NT>(dst + BK * LD, LD, Vg + long(kn) * D, D, sg.nk - kn, tid);
  }
  // its slot held tile tb − NB = t − 1, whose last reads came before the previous iteration's
  // closing barrier
  if (BIAS_TILE && tb < ntiles) {
    const int kb = (SPARSE ? list.get(tb, 0) : t_first + tb) * BK;
    copy_tile_async<BQ, BK, NT>(sB + (tb % NB) * BQ * LDB, LDB, bias + bias_head + long(q0) * bias_sq + kb, bias_sq,
                                sg.nq - q0, tid, sg.nk - kb);
  }
  mfa_async_commit();
  if (t < 0) continue;
  mfa_async_wait<STAGES - 1>();
  publish_b_tiles<WG>();
  mfa_barrier();
  MFA_TG const T* sK = sKV + (t % STAGES) * 2 * BK * LD;
  MFA_TG const T* sV = sK + BK * LD;
  MFA_TG const TB* sBt = sB + (t % NB) * BQ * LDB;
  const int k0 = (SPARSE ? list.get(t, 0) : t_first + t) * BK;
  const int partial = SPARSE ? list.get(t, 1) : -1;

  // scores s = q·kᵀ in raw units, -inf where masked (per element only on edge/partial tiles)
  Acc<WM, BK> s;
  s.zero();
  mma_abt_b<WG, D>(s, sQw, LD, sK, LD, lc);
  // the whole tile's rows, also those past the last (a partial tile is masked per element:
  // rows >= nq must not read the bias)
  const bool inside = band.inside(q0, q0 + BQ, k0, k0 + BK);
  AccTile<WM, BK, 0, TB> bias_tile;  // BIAS_TILE: this warp's rows of the staged bias tile
  if (BIAS_TILE) bias_tile.load(sBt + warp * WM * LDB, LDB, lc);
  MFA_UNROLL
  for (int i = 0; i < Acc<WM, BK>::SIZE; ++i) {
    const int r = row0 + Acc<WM, BK>::row(lc, i), j = k0 + Acc<WM, BK>::col(lc, i);
    bool keep = inside || band.keep(r, j);
    if (SPARSE && partial >= 0) keep = keep && tile_bit<BQ, BK>(bits, partial, r - q0, j - k0);
    float x = -MFA_INF;
    if (keep) {
      x = sc.raw(s.v[i], r, j);
      if (BIAS)
        x = sc.add_bias(x, BIAS_TILE ? bias_tile.get(i) : float(bias[bias_head + long(r) * bias_sq + long(j) * bias_sk]));
    }
    s.v[i] = x;
  }

  // online softmax: new running max, and the previous tiles' o and l rescaled to it (rows with
  // nothing seen yet keep factor 1: their o and l are 0)
  RowVec<WM> m_tile, alpha;
  row_max(s, m_tile);
  MFA_UNROLL
  for (int r = 0; r < RowVec<WM>::SIZE; ++r) {
    const float m_new = mfa_fmaxf(m_run.v[r], m_tile.v[r]);
    alpha.v[r] = m_new == -MFA_INF ? 1.0f : mfa_exp2f((m_run.v[r] - m_new) * sc.unit);
    m_run.v[r] = m_new;
    l_run.v[r] *= alpha.v[r];
  }
  MFA_UNROLL
  for (int i = 0; i < Acc<WM, D>::SIZE; ++i) o.v[i] *= alpha.v[Acc<WM, D>::slot(i)];
  // P = exp2((u − max)·unit): one multiply-add and one exp2 an element; rows with nothing seen
  // yet (max −inf) take 0 as their max, so their masked scores give 0
  RowVec<WM> max_log2;
  MFA_UNROLL
  for (int r = 0; r < RowVec<WM>::SIZE; ++r) max_log2.v[r] = m_run.v[r] == -MFA_INF ? 0.0f : m_run.v[r] * sc.unit;
  MFA_UNROLL
  for (int i = 0; i < Acc<WM, BK>::SIZE; ++i)
    s.v[i] = mfa_exp2f(s.v[i] * sc.unit - max_log2.v[Acc<WM, BK>::slot(i)]);
  RowVec<WM> l_tile;
  row_sum(s, l_tile);
  MFA_UNROLL
  for (int r = 0; r < RowVec<WM>::SIZE; ++r) l_run.v[r] += l_tile.v[r];

  // dropout: the weights of P·V (not of the softmax sum) keep 1/(1-p) or drop to 0
  if (DROPOUT) {
    MFA_UNROLL
    for (int i = 0; i < Acc<WM, BK>::SIZE; ++i)
      s.v[i] *= drop.factor(sg.q_lo + row0 + Acc<WM, BK>::row(lc, i), sg.k_lo + k0 + Acc<WM, BK>::col(lc, i));
  }

  // o += p·v (EXACT: p kept to float32 accuracy, so that the backward's delta = rowsum(dO·O)
  // agrees with its recomputed P)
  mma_ab_b<WG, BK, EXACT>(o, s, sV, LD, lc);
  mfa_barrier();  // this stage's buffers may now be refilled
}
mfa_async_wait<0>();

// normalise; rows that saw no key get out = 0 and lse = -inf
RowVec<WM> lse_rows, inv;
MFA_UNROLL
for (int r = 0; r < RowVec<WM>::SIZE; ++r) {
  const bool any = l_run.v[r] > 0.0f;
  inv.v[r] = any ? 1.0f / l_run.v[r] : 0.0f;
  lse_rows.v[r] = any ? (m_run.v[r] * sc.unit + mfa_log2f(l_run.v[r])) * 0.69314718055994531f : -MFA_INF;
}
MFA_UNROLL
for (int i = 0; i < Acc<WM, D>::SIZE; ++i) o.v[i] *= inv.v[Acc<WM, D>::slot(i)];
const int rows_valid = sg.nq - row0;
if (EXACT) {
  store_acc(o, out + (q_rows + row0) * D, D, rows_valid, lc);
} else {
  // whole rows through the Q tile (out is T here; the cast only lets the EXACT instantiation,
  // whose out is float, compile)
  store_acc_rows<BQ, NT>(o, sQ, LD, reinterpret_cast<MFA_DEV T*>(out) + (q_rows + q0) * D, D, sg.nq - q0, warp, tid,
                         lc);
}
store_rows(lse_rows, lse + q_rows + row0, rows_valid, lc);
