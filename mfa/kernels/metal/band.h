// The kept band of attention scores, shared by the attention kernels.
//
// Query row i sits at i' = i + NK - NQ (bottom-right alignment); key j is kept when
//   j < NK  and  i' - left <= j <= i' + right
// (causal: right = 0; an unbounded side holds kUnbounded).  The kernels visit only key tiles
// that intersect the band of their query tile (and the reverse in dk/dv), and mask per element
// only on tiles that are not wholly inside it.
namespace mfa {

enum : int { kUnbounded = 1 << 30 };

struct Band {
  int nq, nk, offset, left, right;

  // From the kernels' params: [H, HKV, NQ, NK, LEFT, RIGHT, ...].
  MFA_FUNC static Band from(int NQ, int NK, int left, int right) {
    Band b;
    b.nq = NQ;
    b.nk = NK;
    b.offset = NK - NQ;
    b.left = left;
    b.right = right;
    return b;
  }

  MFA_FUNC bool keep(int i, int j) const {
    const int ip = i + offset;
    return i < nq && j < nk && j >= ip - left && j <= ip + right;
  }
  // Keys [key_lo, key_hi) seen by query rows [r0, r1) (r1 > r0).
  MFA_FUNC int key_lo(int r0) const {
    const int lo = r0 + offset - left;
    return lo > 0 ? lo : 0;
  }
  MFA_FUNC int key_hi(int r1) const {
    const int hi = r1 - 1 + offset + right + 1;
    return hi < nk ? hi : nk;
  }
  // Query rows [query_lo, query_hi) that see any of keys [k0, k1) (k1 > k0).
  MFA_FUNC int query_lo(int k0) const {
    const int lo = k0 - right - offset;
    return lo > 0 ? lo : 0;
  }
  MFA_FUNC int query_hi(int k1) const {
    const int hi = k1 - 1 + left - offset + 1;
    return hi < nq ? hi : nq;
  }
  // Whether every (row in [r0, r1), key in [k0, k1)) pair is kept: no per-element mask needed.
  // Callers pass a tile's full extents (r0 + BQ, k0 + BK), so that a tile reaching past the
  // last row or key is masked per element and its rows past nq read no bias.
  MFA_FUNC bool inside(int r0, int r1, int k0, int k1) const {
    return r1 <= nq && k1 <= nk && k0 >= r1 - 1 + offset - left && k1 - 1 <= r0 + offset + right;
  }
};

// The score at (query row i, key j) in raw units u, from x = q·kᵀ: the score in log2 units is
// u·unit with unit = scale·log2(e) > 0, so that the row max of u is that of the scores and the
// softmax weight exp2(u·unit − m·unit) is one multiply-add and one exp2 (FlashAttention's form: a
// plain score costs no instruction of its own).  u is
//   x, softcapped (CAP) to (c/scale)·tanh(scale·x / c), minus (ALIBI) (slope/scale)·|j − i'|, plus
//   (`add_bias`) bias/scale.
// CAP and ALIBI are template values so plain calls pay nothing for them.
template <int CAP, int ALIBI>
struct Scores {
  float unit, inv_scale, cap_raw, scale_over_cap, slope_raw;
  int offset;

  // From the kernels' fparams [scale·log2(e), scale, softcap/scale, scale/softcap, ·, 1/scale]
  // (mfa/kernels/attention.py), a head's ALiBi slope and NK − NQ.
  MFA_FUNC static Scores from(MFA_DEV const float* fparams, float slope, int offset) {
    Scores s;
    s.unit = fparams[0];
    s.inv_scale = fparams[5];
    s.cap_raw = fparams[2];
    s.scale_over_cap = fparams[3];
    s.slope_raw = slope * fparams[5];
    s.offset = offset;
    return s;
  }
  MFA_FUNC float raw(float x, int i, int j) const {
    const float s = CAP ? cap_raw * mfa_tanhf(x * scale_over_cap) : x;
    return ALIBI ? s + slope_raw * alibi_grad(i, j) : s;
  }
  // u plus an additive bias (natural units): one multiply-add.
  MFA_FUNC float add_bias(float u, float bias) const { return u + bias * inv_scale; }
  // A natural-units logit (a sink) in raw units.
  MFA_FUNC float raw_of_logit(float logit) const { return logit * inv_scale; }
  // d(score)/d(scale·x): 1, or 1 − tanh² under softcap.
  MFA_FUNC float cap_grad(float x) const {
    if (!CAP) return 1.0f;
    const float t = mfa_tanhf(x * scale_over_cap);
    return 1.0f - t * t;
  }
  // d(score)/d(slope) = −|j − i'|.
  MFA_FUNC float alibi_grad(int i, int j) const {
    const int d = j - i - offset;
    return -float(d < 0 ? -d : d);
  }
};

}  // namespace mfa
