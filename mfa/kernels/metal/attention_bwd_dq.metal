// attention_bwd_dq: dq = scale · dS_raw·k (FlashAttention-2 backward, the query-side half), with
//   P = exp(s − lse),  dP = (dout·vᵀ) ∘ Z,  dS = P ∘ (dP − delta),  dS_raw = dS ∘ d(softcap)
// (Z: the dropout factors, s as in attention_fwd.metal).  dS is also dL/dbias and gives
// dL/dslope = Σ dS·(−|j − i'|).  delta = rowsum(dout ∘ out) − dlse, the per-row term, is
// computed here first (the dlse cotangent of lse enters as dS += P ∘ dlse) and written out for
// the dk/dv kernel.
//
// Kernel body only (see attention_fwd.metal).  One threadgroup per (query tile, head, batch);
// it recomputes P from lse over the key tiles of its band or list, so nothing of size NQ x NK
// is stored.
//   inputs:   q, dout (B, H, NQ, D), k, v (B, HKV, NK, D) in T, lse (B, H, NQ) float32, out
//             (B, H, NQ, D) in T or float32, dlse (B, H, NQ) float32 (read with DLSE = 1),
//             params, fparams, slopes, bias, sched, bits as in attention_fwd.metal
//   outputs:  dq (B, H, NQ, D) in T; delta (B, H, NQ) float32; dslopes_part (B, H, tiles)
//             float32 with ALIBI: this tile's share of dL/dslope; dbias (the bias's shape) in TDB
//             with DBIAS 1 (per element) or 2 (bias broadcast over keys: per row, summed over the
//             tile's keys); dbias_total (the bias's shape, its dtype): a batch loop's sums, written
//             by its last row (params[kBatchTotal]; dbias then holds the other rows' float32 sums)
//   template: T, D, BQ, BK, NW, STAGES, SMEM, SOFTCAP, ALIBI, BIAS, VARLEN, SPARSE, DROPOUT,
//             BIAS_TILE, TB, BIAS_LEAD as in attention_fwd.metal, DBIAS (0: none or done by the
//             dk/dv kernel; 1; 2), TDB (dbias type), DLSE (1: dlse is given).  DBIAS 1 with
//             BIAS_TILE gathers each tile's dS in shared memory and adds it to dbias row by row
//             (contiguous stores).
//             WG (1: K and V are core-matrix B tiles for wgmma, frag_wgmma.h; needs BQ/NW = 16).
//             HX as in attention_fwd.metal.
//   grid (tiles·32·NW, H, B), with HX (H·32·NW, tiles, B), as in attention_fwd.metal (the last
//   extent 1 with a batch loop); threadgroup (32·NW, 1, 1)
using namespace mfa;
constexpr int NT = 32 * NW;
constexpr int WM = BQ / NW;  // query rows per warp
constexpr int LD = D + 8;
constexpr int LDB = BK + 16 / int(sizeof(TB));  // padded row stride of a staged bias tile
constexpr int LDG = BK + 16 / int(sizeof(TDB));  // ... and of the staged dS tile (in TDB)
constexpr bool STAGE_DBIAS = BIAS_TILE && DBIAS == 1;
constexpr int NB = STAGES + BIAS_LEAD;  // BIAS_TILE: bias tiles in the ring
static_assert(WM % kFragRows == 0, "BQ/NW must be a multiple of the fragment height");
static_assert(BIAS_TILE || BIAS_LEAD == 0, "BIAS_LEAD needs staged bias tiles");
static_assert(SMEM >= (2 * BQ + 2 * STAGES * BK) * LD * int(sizeof(T)) + BIAS_TILE * NB * BQ * LDB * int(sizeof(TB)) +
                          STAGE_DBIAS * BQ * LDG * int(sizeof(TDB)),
              "SMEM too small");

// this threadgroup's head and grid tile (HX: heads in x, tiles in y)
const int h = int(HX ? threadgroup_position_in_grid.x : threadgroup_position_in_grid.y);
const int x = int(HX ? threadgroup_position_in_grid.y : threadgroup_position_in_grid.x);
const int tid = int(thread_index_in_threadgroup);
const int warp = tid / 32;
const LaneCoord lc = lane_coord(tid % 32);

const int H = params[kH], HKV = params[kHKV], NQ = params[kNQ], NK = params[kNK];
// this tile's slot in dslopes_part: grid tiles per (batch, head)
const int grid_tiles = VARLEN ? (NQ + params[kNumSeqs] * (BQ - 1)) / BQ : (NQ + BQ - 1) / BQ;

MFA_SHARED(smem, SMEM);
MFA_TG T* sQ = reinterpret_cast<MFA_TG T*>(smem);
MFA_TG T* sdO = sQ + BQ * LD;
MFA_TG T* sKV = sdO + BQ * LD;  // STAGES x (K tile, V tile)
MFA_TG TB* sB = reinterpret_cast<MFA_TG TB*>(sKV + STAGES * 2 * BK * LD);  // BIAS_TILE: NB x bias tile
MFA_TG TDB* sG = reinterpret_cast<MFA_TG TDB*>(sB + BIAS_TILE * NB * BQ * LDB);  // STAGE_DBIAS: dS

// A bias shared by the batch whose dbias has every entry (DBIAS 1) runs the whole batch in each
// threadgroup, one row after the other (params[kBatchLoop] = B, a grid of one batch row), so that
// each dbias entry has one writer, which sums the rows' dS in place: no atomic adds.
const int batch_loop = params[kBatchLoop];
const int b_first = batch_loop > 0 ? 0 : int(threadgroup_position_in_grid.z);
const int b_end = batch_loop > 0 ? batch_loop : b_first + 1;

for (int b = b_first; b < b_end; ++b) {
  const Segment sg = Segment::of<VARLEN>(x, b, params, sched);
  if (!sg.valid) {
    if (ALIBI && tid == 0) dslopes_part[long(b * H + h) * grid_tiles + x] = 0.0f;
    return;
  }
  const Band band = Band::from(sg.nq, sg.nk, params[kLeft], params[kRight]);
  const float slope = ALIBI ? slopes[(params[kSlopesPerRow] != 0 ? sg.seg : 0) * H + h] : 0.0f;
  const Scores<SOFTCAP, ALIBI> sc = Scores<SOFTCAP, ALIBI>::from(fparams, slope, sg.nk - sg.nq);
  const Dropout drop = Dropout::from(params, fparams[4], b * H + h);
  const float scale = fparams[1];
  const int nqt = (sg.nq + BQ - 1) / BQ;
  // the longest query tiles start first, for load balance: block-sparse, in the order of this
  // (batch, head)'s row of lists (sched's `order`, by decreasing list length); causal-like bands,
  // the last tiles first
  const MaskRow<2> mask_lists = MaskRow<2>::of(sched, params, b, h, H, nqt);
  const int qt = SPARSE ? mask_lists.ordered(sg.tile) : band.right < kUnbounded ? nqt - 1 - sg.tile : sg.tile;
  const int q0 = qt * BQ;
  const int q1 = q0 + BQ < sg.nq ? q0 + BQ : sg.nq;
  const int hk = h / (H / HKV);

  MFA_DEV const T* Kg = k + (long(b * HKV + hk) * NK + sg.k_lo) * D;
  MFA_DEV const T* Vg = v + (long(b * HKV + hk) * NK + sg.k_lo) * D;
  const long row_base = long(b * H + h) * NQ + sg.q_lo + q0;
  const long bias_head = long(b) * params[kBiasStrideB] + long(h) * params[kBiasStrideH];
  const int bias_sq = params[kBiasStrideQ], bias_sk = params[kBiasStrideK];
  const int dbias_write_kind = dbias_write(params, b);

  const int kv_lo = band.key_lo(q0), kv_hi = band.key_hi(q1);
  const int t_first = kv_lo / BK;
  int ntiles = kv_hi > kv_lo ? (kv_hi + BK - 1) / BK - t_first : 0;
  TileList<2> list;
  if (SPARSE) {
    list = mask_lists.list(qt);
    ntiles = list.count;
  }

  copy_tile_async<BQ, D, NT>(sQ, LD, q + row_base * D, D, sg.nq - q0, tid);
  copy_tile_async<BQ, D, NT>(sdO, LD, dout + row_base * D, D, sg.nq - q0, tid);
  mfa_async_commit();

  const int row0 = q0 + warp * WM;
  RowVec<WM> lse_rows, delta_rows;
  load_rows(lse_rows, lse + row_base + warp * WM, sg.nq - row0, 0.0f, lc);
  // delta = rowsum(dout ∘ out) − dlse: the 4 lanes that share a row take its 8-element chunks in
  // turn (4 consecutive chunks per step, a coalesced 64-byte run of dout)
  MFA_UNROLL
  for (int s = 0; s < RowVec<WM>::SIZE; ++s) {
    const int r = RowVec<WM>::row(lc, s);
    const long at = row_base + warp * WM + r;
    const bool valid = row0 + r < sg.nq;
    float acc = 0.0f;
    if (valid) {
      MFA_UNROLL
      for (int c = lc.c / 2; c < D / 8; c += 4) acc += mfa_dot8(out + at * D + 8 * c, dout + at * D + 8 * c);
    }
    acc += mfa_shfl_xor(acc, kRowXor0);
    acc += mfa_shfl_xor(acc, kRowXor1);
    delta_rows.v[s] = acc - (DLSE && valid ? dlse[at] : 0.0f);
  }
  store_rows(delta_rows, delta + row_base + warp * WM, sg.nq - row0, lc);
  MFA_UNROLL
  for (int r = 0; r < RowVec<WM>::SIZE; ++r) {
    // to log2 units; rows with nothing to attend (lse = -inf) get +inf, so P = 0 there
    lse_rows.v[r] = lse_rows.v[r] == -MFA_INF ? MFA_INF : lse_rows.v[r] * 1.4426950408889634f;
  }

  Acc<WM, D> dq;
  dq.zero();
  float dslope = 0.0f;  // this thread's share of dL/dslope
  RowVec<WM> dbias_rows;  // DBIAS 2: this lane's share of dL/dbias per row
  MFA_UNROLL
  for (int r = 0; r < RowVec<WM>::SIZE; ++r) dbias_rows.v[r] = 0.0f;
  MFA_TG const T* sQw = sQ + warp * WM * LD;
  MFA_TG const T* sdOw = sdO + warp * WM * LD;

  // the tiles in flight and the bias ring as in attention_fwd.metal
  for (int t = 1 - STAGES - BIAS_LEAD; t < ntiles; ++t) {
    const int tn = t + STAGES - 1;  // the key/value tile copied now
    const int tb = tn + BIAS_LEAD;  // the bias tile copied now
    if (tn >= 0 && tn < ntiles) {
      const int kn = (SPARSE ? list.get(tn, 0) : t_first + tn) * BK;
      MFA_TG T* dst = sKV + (tn % STAGES) * 2 * BK * LD;
      copy_b_tile_async<WG, BK, D, NT>(dst, LD, Kg + long(kn) * D, D, sg.nk - kn, tid);
      copy_b_tile_async<WG, BK, D, NT>(dst + BK * LD, LD, Vg + long(kn) * D, D, sg.nk - kn, tid);
    }
    if (BIAS_TILE && tb < ntiles) {
      const int kb = (SPARSE ? list.get(tb, 0) : t_first + tb) * BK;
      copy_tile_async<BQ, BK, NT>(sB + (tb % NB) * BQ * LDB, LDB, bias + bias_head + long(q0) * bias_sq + kb,
                                  bias_sq, sg.nq - q0, tid, sg.nk - kb);
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

    // dP = dout·vᵀ and the scores q·kᵀ
    Acc<WM, BK> ds, s;
    ds.zero();
    s.zero();
    mma_abt_b2<WG, D>(ds, sdOw, sV, s, sQw, sK, LD, lc);

    // P = exp2(u·unit − lse) (zero where masked; u in raw units, band.h's Scores),
    // dS = P ∘ (dP ∘ Z − delta), dS_raw = dS ∘ d(softcap)
    // the whole tile's rows, also those past the last (as in attention_fwd.metal)
    const bool inside = band.inside(q0, q0 + BQ, k0, k0 + BK);
    // block-sparse: the tile's kept elements as bits, found once a tile (variants.h's KeepBits)
    const KeepBits<Acc<WM, BK>> kept =
        keep_bits<Acc<WM, BK>, SPARSE, BQ, BK>(band, inside || !SPARSE, bits, partial, row0, q0, k0, lc);
    AccTile<WM, BK, 0, TB> bias_tile;  // BIAS_TILE: this warp's rows of the staged bias tile
    if (BIAS_TILE) bias_tile.load(sBt + warp * WM * LDB, LDB, lc);
    MFA_UNROLL
    for (int i = 0; i < Acc<WM, BK>::SIZE; ++i) {
      const int slot = Acc<WM, BK>::slot(i);
      const int r = row0 + Acc<WM, BK>::row(lc, i), j = k0 + Acc<WM, BK>::col(lc, i);
      const bool keep = SPARSE ? kept.get(i) : inside || band.keep(r, j);
      const long bias_at = bias_head + long(r) * bias_sq + long(j) * bias_sk;
      float p = 0.0f;
      if (keep) {
        float u = sc.raw(s.v[i], r, j);
        if (BIAS) u = sc.add_bias(u, BIAS_TILE ? bias_tile.get(i) : float(bias[bias_at]));
        p = mfa_exp2f(u * sc.unit - lse_rows.v[slot]);
      }
      const float dp = DROPOUT ? ds.v[i] * drop.factor(sg.q_lo + r, sg.k_lo + j) : ds.v[i];
      const float g = p * (dp - delta_rows.v[slot]);  // dL/d(score)
      if (ALIBI) dslope += g * sc.alibi_grad(r, j);
      if (STAGE_DBIAS) sG[(r - q0) * LDG + j - k0] = static_cast<TDB>(g);
      else if (DBIAS == 1 && r < sg.nq && j < sg.nk && (dbias_writes_all(dbias_write_kind) || keep))
        dbias_add(dbias, bias_at, g, dbias_write_kind, dbias_total);
      if (DBIAS == 2) dbias_rows.v[slot] += g;
      ds.v[i] = g * sc.cap_grad(s.v[i]);
    }

    // dq += dS_raw·k
    mma_ab_b<WG, BK, 0>(dq, ds, sK, LD, lc);
    mfa_barrier();  // this stage's buffers may now be refilled, and the whole dS tile is in sG
    // STAGE_DBIAS: the dS tile to dbias, after the barrier the loop has anyway (sG is rewritten
    // only after the next tile's first barrier)
    if (STAGE_DBIAS)
      dbias_add_tile<BQ, BK, NT>(dbias, bias_head + long(q0) * bias_sq + k0, bias_sq, sG, LDG, sg.nq - q0, sg.nk - k0,
                                 dbias_write_kind, dbias_total, tid);
  }
  mfa_async_wait<0>();

  MFA_UNROLL
  for (int i = 0; i < Acc<WM, D>::SIZE; ++i) dq.v[i] *= scale;
  store_acc_rows<BQ, NT>(dq, sQ, LD, dq_out + row_base * D, D, sg.nq - q0, warp, tid, lc);  // through the Q tile

  if (DBIAS == 2) {
    // bias broadcast over keys: one entry per query row, summed over this row's keys
    reduce_rows(dbias_rows);
    if (RowVec<WM>::writer(lc)) {
      MFA_UNROLL
      for (int s = 0; s < RowVec<WM>::SIZE; ++s) {
        const int r = row0 + RowVec<WM>::row(lc, s);
        if (r < sg.nq) dbias_add(dbias, bias_head + long(r) * bias_sq, dbias_rows.v[s], dbias_write_kind, dbias_total);
      }
    }
  }

  if (ALIBI) {
    // reduce dL/dslope over the threadgroup: lanes by shuffles, warps through shared memory
    for (int m = 16; m > 0; m /= 2) dslope += mfa_shfl_xor(dslope, m);
    mfa_barrier();  // every thread's copies have landed and no warp still reads the tiles
    MFA_TG float* red = reinterpret_cast<MFA_TG float*>(smem);
    if (tid % 32 == 0) red[warp] = dslope;
    mfa_barrier();
    if (tid == 0) {
      float total = 0.0f;
      for (int w = 0; w < NW; ++w) total += red[w];
      dslopes_part[long(b * H + h) * grid_tiles + x] = total;
    }
  }
  // the next batch row refills the tiles and adds to the dbias entries this one wrote
  if (b + 1 < b_end) mfa_barrier_device();
}
