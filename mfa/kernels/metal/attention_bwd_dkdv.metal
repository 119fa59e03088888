// attention_bwd_dkdv: dk = scale · dS_rawᵀ·q and dv = (P ∘ Z)ᵀ·dout (FlashAttention-2 backward,
// the key-side half), summed over the query heads that share each key/value head (GQA); P, Z,
// dS and dS_raw as in attention_bwd_dq.metal, over the kept keys only.
//
// Kernel body only (see attention_fwd.metal).  One threadgroup per (key tile, key/value head,
// batch); it walks work items (query head of its group, query tile) — those of its band, or its
// block-sparse list — and recomputes, transposed, Pᵀ = exp(s − lse) and dPᵀ = v·doutᵀ, so each
// warp owns BK/NW key rows of dk and dv.
//   inputs:   q, dout (B, H, NQ, D), k, v (B, HKV, NK, D) in T, lse, delta (B, H, NQ) float32,
//             params, fparams, slopes, bias, sched, bits as in attention_fwd.metal (sched for
//             varlen counts key tiles)
//   outputs:  dk, dv (B, HKV, NK, D) in T; dbias (the bias's shape) in TDB with DBIAS 1 (per
//             element: dS itself, which then gives dq as one matmul, see attention.dq_from_dbias),
//             3 (bias broadcast over query rows: per key, summed over rows) or 4 (over rows and keys);
//             dq_accum (B, H, NQ, D) float32 with FUSED_DQ, zero-filled by the launcher: each work
//             item adds its share scale · dS_raw·k, a bulk reduction per row (then no dq kernel runs)
//   template: T, D, BQ, BK, NW, STAGES (work items in flight), SMEM, SOFTCAP, ALIBI, BIAS, VARLEN,
//             SPARSE, DROPOUT, BIAS_TILE, TB, BIAS_LEAD (as in attention_fwd.metal, in work
//             items: the bias tile of item w is copied with the Q and dO of item w − BIAS_LEAD),
//             DBIAS (0: none or done by the dq kernel; 1; 3; 4; 1 with BIAS_TILE gathers each work
//             item's dS in shared memory and writes it to dbias row by row, as the dq kernel does),
//             TDB (dbias type), FUSED_DQ (1: also dq, by bulk reductions; no ALIBI),
//             WG (1: Q and dO are core-matrix B tiles for wgmma, frag_wgmma.h; needs BK/NW = 16),
//             HX (as in attention_fwd.metal)
//   grid (tiles·32·NW, HKV, B), with HX (HKV·32·NW, tiles, B); tiles = ceil(NK/BK) or for varlen
//   (NK + S·(BK − 1)) / BK; threadgroup (32·NW, 1, 1)
using namespace mfa;
constexpr int NT = 32 * NW;
constexpr int WM = BK / NW;  // key rows per warp
constexpr int LD = D + 8;
constexpr int LDB = BK + 16 / int(sizeof(TB));  // padded row stride of a staged bias tile (query rows x keys)
// bytes of one stage: Q, dO, lse, delta; WG: stages start 1024-byte aligned, as the swizzled B
// tiles need
constexpr int QSTAGE_USED = 2 * BQ * LD * int(sizeof(T)) + 2 * BQ * 4;
constexpr int QSTAGE = WG ? (QSTAGE_USED + 1023) / 1024 * 1024 : QSTAGE_USED;
constexpr int NB = STAGES + BIAS_LEAD;  // BIAS_TILE: bias tiles in the ring, after the stages
// FUSED_DQ: query rows per warp of the dq product (without it, one fragment's rows: the product
// is compiled but never runs, and BQ/NW may be smaller)
constexpr int QW = FUSED_DQ ? BQ / NW : kFragRows;
constexpr int LDS = BK + 8;    // FUSED_DQ: padded row stride of the dS tile (query rows x keys)
constexpr int LDQ = D + 8;     // FUSED_DQ: ... of the float dq rows, staged over a stage's Q and dO
constexpr int LDG = BK + 16 / int(sizeof(TDB));  // STAGE_DBIAS: ... of the dS tile in TDB
constexpr bool STAGE_DBIAS = BIAS_TILE && DBIAS == 1;
static_assert(WM % kFragRows == 0, "BK/NW must be a multiple of the fragment height");
static_assert(BIAS_TILE || BIAS_LEAD == 0, "BIAS_LEAD needs staged bias tiles");
static_assert(QW % kFragRows == 0, "FUSED_DQ needs BQ/NW a multiple of the fragment height");
static_assert(!FUSED_DQ || BQ * LDQ * 4 <= 2 * BQ * LD * int(sizeof(T)), "FUSED_DQ: dq rows exceed Q and dO");
static_assert(SMEM >= 2 * BK * LD * int(sizeof(T)) + STAGES * QSTAGE + BIAS_TILE * NB * BQ * LDB * int(sizeof(TB)) +
                          FUSED_DQ * BQ * LDS * int(sizeof(T)) + STAGE_DBIAS * BQ * LDG * int(sizeof(TDB)),
              "SMEM too small");

// this threadgroup's head and grid tile (HX: heads in x, tiles in y)
const int hk = int(HX ? threadgroup_position_in_grid.x : threadgroup_position_in_grid.y);
const int grid_tile = int(HX ? threadgroup_position_in_grid.y : threadgroup_position_in_grid.x);
const int b = int(threadgroup_position_in_grid.z);
const int tid = int(thread_index_in_threadgroup);
const int warp = tid / 32;
const LaneCoord lc = lane_coord(tid % 32);

const int H = params[kH], HKV = params[kHKV], NQ = params[kNQ], NK = params[kNK];
const Segment sg = Segment::of<VARLEN>(grid_tile, b, params, sched);
if (!sg.valid) return;
const Band band = Band::from(sg.nq, sg.nk, params[kLeft], params[kRight]);
Scores<SOFTCAP, ALIBI> sc = Scores<SOFTCAP, ALIBI>::from(fparams, 0.0f, sg.nk - sg.nq);
const float scale = fparams[1];
// block-sparse: the longest key tiles start first, for load balance, in the order of this
// (batch, key/value head)'s row of lists (sched's `order`, by decreasing list length)
const int nkt = (sg.nk + BK - 1) / BK;
const MaskRow<3> mask_lists = MaskRow<3>::of(sched, params, b, hk, HKV, nkt);
const int k0 = (SPARSE ? mask_lists.ordered(sg.tile) : sg.tile) * BK;
const int k1 = k0 + BK < sg.nk ? k0 + BK : sg.nk;
const int group = H / HKV;
const int bias_sq = params[kBiasStrideQ], bias_sk = params[kBiasStrideK];
const int dbias_write_kind = params[kBiasUnique] != 0 ? kDbiasStore : kDbiasAtomic;
const bool dbias_per_head = params[kBiasStrideH] != 0;

MFA_SHARED(smem, SMEM);
MFA_TG T* sK = reinterpret_cast<MFA_TG T*>(smem);
MFA_TG T* sV = sK + BK * LD;
MFA_TG unsigned char* sStages = smem + 2 * BK * LD * int(sizeof(T));  // STAGES x (Q, dO, lse, delta)
MFA_TG TB* sB = reinterpret_cast<MFA_TG TB*>(sStages + STAGES * QSTAGE);  // BIAS_TILE: NB x (query, key) tile
MFA_TG T* sdS = reinterpret_cast<MFA_TG T*>(sB + BIAS_TILE * NB * BQ * LDB);  // FUSED_DQ: dS_raw tile
MFA_TG TDB* sG = reinterpret_cast<MFA_TG TDB*>(sdS + FUSED_DQ * BQ * LDS);  // STAGE_DBIAS: dS (query, key)

const long kv_base = long(b * HKV + hk) * NK + sg.k_lo + k0;
copy_tile_async<BK, D, NT>(sK, LD, k + kv_base * D, D, sg.nk - k0, tid);
copy_tile_async<BK, D, NT>(sV, LD, v + kv_base * D, D, sg.nk - k0, tid);
mfa_async_commit();

// Work items: dense, w is (head g = w / nq, query tile qt_begin + w % nq) over the query tiles
// that see any key of this tile; block-sparse, the entries (g, query tile, partial) of the list.
const int q_lo = band.query_lo(k0), q_hi = band.query_hi(k1);
const int qt_begin = q_lo / BQ;
const int nq = q_hi > q_lo ? (q_hi + BQ - 1) / BQ - qt_begin : 0;
int nwork = group * nq;
TileList<3> list;
if (SPARSE) {
  list = mask_lists.list(k0 / BK);
  nwork = list.count;
}

Acc<WM, D> dk, dv;
dk.zero();
dv.zero();
RowVec<WM> dbias_keys;  // DBIAS 3/4: this lane's share of dL/dbias per key row
MFA_UNROLL
for (int r = 0; r < RowVec<WM>::SIZE; ++r) dbias_keys.v[r] = 0.0f;
MFA_TG const T* sKw = sK + warp * WM * LD;
MFA_TG const T* sVw = sV + warp * WM * LD;
const int key0 = k0 + warp * WM;

// Iteration w computes work item w while items w+1 .. w+STAGES-1 are in flight (their bias tiles
// up to w+STAGES-1+BIAS_LEAD; the first BIAS_LEAD iterations copy bias tiles only), one
// committed group an iteration, as in attention_fwd.metal.
for (int w = 1 - STAGES - BIAS_LEAD; w < nwork; ++w) {
  const int wn = w + STAGES - 1;  // the work item whose Q, dO, lse and delta are copied now
  const int wb = wn + BIAS_LEAD;  // ... and whose bias tile
  if (wn >= 0 && wn < nwork) {
    const int gn = SPARSE ? list.get(wn, 0) : wn / nq;
    const int q0 = (SPARSE ? list.get(wn, 1) : qt_begin + wn % nq) * BQ;
    const long rows = long(b * H + hk * group + gn) * NQ + sg.q_lo + q0;
    MFA_TG unsigned char* stage = sStages + (wn % STAGES) * QSTAGE;
    MFA_TG T* dQ = reinterpret_cast<MFA_TG T*>(stage);
    MFA_TG float* dL = reinterpret_cast<MFA_TG float*>(dQ + 2 * BQ * LD);
    copy_b_tile_async<WG, BQ, D, NT>(dQ, LD, q + rows * D, D, sg.nq - q0, tid);
    copy_b_tile_async<WG, BQ, D, NT>(dQ + BQ * LD, LD, dout + rows * D, D, sg.nq - q0, tid);
    // lse and delta rows come asynchronously too (0 past the last row): a plain load here would
    // stall every warp at the next barrier for one memory latency per work item
    for (int i = tid; i < BQ; i += NT) {
      const bool valid = q0 + i < sg.nq;
      mfa_copy4(dL + i, lse + (valid ? rows + i : 0), valid);
      mfa_copy4(dL + BQ + i, delta + (valid ? rows + i : 0), valid);
    }
  }
  // its slot held item wb − NB = w − 1, whose last reads came before the previous iteration's
  // closing barrier
  if (BIAS_TILE && wb < nwork) {
    const int gb = SPARSE ? list.get(wb, 0) : wb / nq;
    const int qb = (SPARSE ? list.get(wb, 1) : qt_begin + wb % nq) * BQ;
    const long bias_at = long(b) * params[kBiasStrideB] + long(hk * group + gb) * params[kBiasStrideH] +
                         long(qb) * bias_sq + k0;
    copy_tile_async<BQ, BK, NT>(sB + (wb % NB) * BQ * LDB, LDB, bias + bias_at, bias_sq, sg.nq - qb, tid,
                                sg.nk - k0);
  }
  mfa_async_commit();
  if (w < 0) continue;
  mfa_async_wait<STAGES - 1>();
  MFA_TG unsigned char* stage = sStages + (w % STAGES) * QSTAGE;
  MFA_TG const T* sQ = reinterpret_cast<MFA_TG const T*>(stage);
  MFA_TG const T* sdO = sQ + BQ * LD;
  MFA_TG float* sLse = reinterpret_cast<MFA_TG float*>(stage + 2 * BQ * LD * int(sizeof(T)));
  MFA_TG const float* sDelta = sLse + BQ;
  MFA_TG const TB* sBt = sB + (w % NB) * BQ * LDB;  // BIAS_TILE: (query, key)
  // lse to log2 units, in place: each thread converts the rows it copied, whose copies have
  // landed; rows with nothing to attend (lse = -inf) get +inf, so P = 0 there
  for (int i = tid; i < BQ; i += NT) sLse[i] = sLse[i] == -MFA_INF ? MFA_INF : sLse[i] * 1.4426950408889634f;
  publish_b_tiles<WG>();
  mfa_barrier();
  const int g = SPARSE ? list.get(w, 0) : w / nq;
  const int q0 = (SPARSE ? list.get(w, 1) : qt_begin + w % nq) * BQ;
  const int partial = SPARSE ? list.get(w, 2) : -1;
  const int h = hk * group + g;
  if (ALIBI) sc.slope_raw = slopes[(params[kSlopesPerRow] != 0 ? sg.seg : 0) * H + h] * sc.inv_scale;
  const Dropout drop = Dropout::from(params, fparams[4], b * H + h);
  const long bias_head = long(b) * params[kBiasStrideB] + long(h) * params[kBiasStrideH];

  // dPᵀ = v·doutᵀ and the scores k·qᵀ (transposed: this warp's rows are keys)
  Acc<WM, BQ> pt, dst;
  dst.zero();
  pt.zero();
  mma_abt_b2<WG, D>(dst, sVw, sdO, pt, sKw, sQ, LD, lc);

  // Pᵀ = exp2(u·unit − lse) (zero where masked; u in raw units, band.h's Scores),
  // dSᵀ = Pᵀ ∘ (dPᵀ ∘ Z − delta), dS_rawᵀ = dSᵀ ∘ d(softcap)
  const bool inside = band.inside(q0, q0 + BQ, k0, k0 + BK);
  AccTile<WM, BQ, 1, TB> bias_tile;  // BIAS_TILE: the staged (query, key) tile at this warp's keys
  if (BIAS_TILE) bias_tile.load(sBt + warp * WM, LDB, lc);
  MFA_UNROLL
  for (int i = 0; i < Acc<WM, BQ>::SIZE; ++i) {
    const int c = Acc<WM, BQ>::col(lc, i);
    const int r = q0 + c, j = key0 + Acc<WM, BQ>::row(lc, i);
    bool keep = inside || band.keep(r, j);
    if (SPARSE && partial >= 0) keep = keep && tile_bit<BQ, BK>(bits, partial, c, j - k0);
    float p = 0.0f;
    if (keep) {
      float u = sc.raw(pt.v[i], r, j);
      if (BIAS)
        u = sc.add_bias(u, BIAS_TILE ? bias_tile.get(i) : float(bias[bias_head + long(r) * bias_sq + long(j) * bias_sk]));
      p = mfa_exp2f(u * sc.unit - sLse[c]);
    }
    const float z = DROPOUT ? drop.factor(sg.q_lo + r, sg.k_lo + j) : 1.0f;
    const float gs = p * (dst.v[i] * z - sDelta[c]);  // dL/d(score)
    if (STAGE_DBIAS) {
      if (SOFTCAP) sG[c * LDG + j - k0] = static_cast<TDB>(gs);  // else stored after the loop
    } else if (DBIAS == 1 && r < sg.nq && j < sg.nk && (dbias_writes_all(dbias_write_kind) || keep)) {
      dbias_add(dbias, bias_head + long(r) * bias_sq + long(j) * bias_sk, gs, dbias_write_kind, dbias);
    }
    if (DBIAS == 3 || DBIAS == 4) dbias_keys.v[Acc<WM, BQ>::slot(i)] += gs;
    dst.v[i] = gs * sc.cap_grad(pt.v[i]);
    pt.v[i] = p * z;
  }

  // without softcap dS_raw is dS: its tile goes to sG (query, key) in one transposed store
  if (STAGE_DBIAS && !SOFTCAP) acc_to_shared_transposed<(WG && sizeof(TDB) == 2) ? 1 : 0>(dst, sG + warp * WM, LDG, lc);

  // dv += (Pᵀ ∘ Z)·dout, dk += dS_rawᵀ·q
  mma_ab_b2<WG, BQ>(dv, pt, sdO, dk, dst, sQ, LD, lc);

  // FUSED_DQ: dq += scale · dS_raw·k over this key tile: dS_raw goes through shared memory as
  // (query row, key), then each warp multiplies its query rows by the K tile and adds them
  if (FUSED_DQ) {
    acc_to_shared_transposed<(WG && sizeof(T) == 2) ? 1 : 0>(dst, sdS + warp * WM, LDS, lc);
    mfa_barrier();
    Acc<QW, D> dqp;
    dqp.zero();
    mma_ab_shared<BK>(dqp, sdS + warp * QW * LDS, LDS, sK, LD, lc);
    // the warp's rows go, as float rows, over this stage's Q and dO tiles (no warp reads them
    // again for this item), and from there into dq_accum as one bulk reduction a row
    const long dq_row0 = long(b * H + h) * NQ + sg.q_lo + q0 + warp * QW;
    MFA_UNROLL
    for (int i = 0; i < Acc<QW, D>::SIZE; ++i) dqp.v[i] *= scale;
    add_acc_rows_async(dqp, reinterpret_cast<MFA_TG float*>(stage) + warp * QW * LDQ, LDQ, dq_accum + dq_row0 * D,
                       sg.nq - q0 - warp * QW, lc);
  }

  // DBIAS 3/4: the key sums of a head are complete once its work items are done; a bias shared
  // by the heads takes them all at the end
  const bool head_done = w + 1 == nwork || (SPARSE ? list.get(w + 1, 0) : (w + 1) / nq) != g;
  if ((DBIAS == 3 || DBIAS == 4) && head_done && (dbias_per_head || w + 1 == nwork)) {
    reduce_rows(dbias_keys);
    if (DBIAS == 3 && RowVec<WM>::writer(lc)) {
      MFA_UNROLL
      for (int s = 0; s < RowVec<WM>::SIZE; ++s) {
        const int j = key0 + RowVec<WM>::row(lc, s);
        if (j < sg.nk) dbias_add(dbias, bias_head + long(j) * bias_sk, dbias_keys.v[s], dbias_write_kind, dbias);
      }
    }
    if (DBIAS == 4) {
      // one atomic add per warp: other warps, key tiles, heads and batches add to the same entry
      float total = 0.0f;
      if (RowVec<WM>::writer(lc)) {
        MFA_UNROLL
        for (int s = 0; s < RowVec<WM>::SIZE; ++s) total += dbias_keys.v[s];
      }
      for (int m = 16; m > 0; m /= 2) total += mfa_shfl_xor(total, m);
      if (tid % 32 == 0) dbias_add(dbias, bias_head, total, kDbiasAtomic, dbias);
    }
    MFA_UNROLL
    for (int s = 0; s < RowVec<WM>::SIZE; ++s) dbias_keys.v[s] = 0.0f;
  }
  if (FUSED_DQ) mfa_bulk_wait_read();  // the dq rows have left the stage
  mfa_barrier();  // this stage's buffers may now be refilled, and the whole dS tile is in sG
  // STAGE_DBIAS: the dS tile to dbias, after the barrier the loop has anyway (sG is rewritten only
  // after the next work item's first barrier)
  if (STAGE_DBIAS)
    dbias_add_tile<BQ, BK, NT>(dbias, bias_head + long(q0) * bias_sq + k0, bias_sq, sG, LDG, sg.nq - q0, sg.nk - k0,
                               dbias_write_kind, dbias, tid);
}
mfa_async_wait<0>();
if (FUSED_DQ) mfa_bulk_wait();

MFA_UNROLL
for (int i = 0; i < Acc<WM, D>::SIZE; ++i) dk.v[i] *= scale;
// whole rows, through the K and V tiles
store_acc_rows<BK, NT>(dk, sK, LD, dk_out + kv_base * D, D, sg.nk - k0, warp, tid, lc);
store_acc_rows<BK, NT>(dv, sV, LD, dv_out + kv_base * D, D, sg.nk - k0, warp, tid, lc);
