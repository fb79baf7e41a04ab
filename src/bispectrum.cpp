#include "bispectrum.hpp"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <stdexcept>
#include <string>

namespace mlsurrogate {

namespace {

constexpr double kPi = 3.14159265358979323846;
constexpr int kMaxTwojmax = 40;  // keeps the factorials of the CG formula finite

[[noreturn]] void bad_setting(const std::string& what) { throw std::invalid_argument(what); }

// Cutoff switching function of SNAP and its radial derivative (Thompson 2015, eq. 5).
void switching(const BispectrumSettings& s, double r, double rcut, double& f, double& df) {
  if (!s.switchflag || r <= s.rmin0) {
    f = 1.0;
    df = 0.0;
    return;
  }
  const double k = kPi / (rcut - s.rmin0);
  f = 0.5 * (std::cos((r - s.rmin0) * k) + 1.0);
  df = -0.5 * std::sin((r - s.rmin0) * k) * k;
}

}  // namespace

int BispectrumSettings::num_elements() const {
  if (chem_map.empty()) return 1;
  return *std::max_element(chem_map.begin(), chem_map.end()) + 1;
}

double BispectrumSettings::max_cutoff() const {
  double c = 0.0;
  for (int t = 0; t < num_types(); ++t) c = std::max(c, cutoff(t));
  return c;
}

void BispectrumSettings::validate() const {
  auto num = [](double v) {
    std::ostringstream o;
    o << v;
    return o.str();
  };
  if (!(rcutfac > 0.0) || !std::isfinite(rcutfac))
    bad_setting("rcutfac must be a positive number, got " + num(rcutfac));
  if (!(rfac0 > 0.0 && rfac0 <= 1.0)) bad_setting("rfac0 must lie in (0, 1], got " + num(rfac0));
  if (twojmax < 0) bad_setting("twojmax must be >= 0, got " + std::to_string(twojmax));
  if (twojmax > kMaxTwojmax)
    bad_setting("twojmax must be <= " + std::to_string(kMaxTwojmax) + ", got " +
                std::to_string(twojmax));
  if (radius.empty()) bad_setting("at least one element radius is needed");
  if (weight.size() != radius.size())
    bad_setting("radius and weight need one value per element: got " +
                std::to_string(radius.size()) + " radii and " + std::to_string(weight.size()) +
                " weights");
  if (!(rmin0 >= 0.0)) bad_setting("rmin0 must be >= 0, got " + num(rmin0));
  for (int t = 0; t < num_types(); ++t) {
    if (!(radius[t] > 0.0) || !std::isfinite(radius[t]))
      bad_setting("radius of element " + std::to_string(t + 1) + " must be positive, got " +
                  num(radius[t]));
    if (!std::isfinite(weight[t]))
      bad_setting("weight of element " + std::to_string(t + 1) + " must be finite, got " +
                  num(weight[t]));
    if (!(cutoff(t) > rmin0))
      bad_setting("cutoff 2*radius*rcutfac of element " + std::to_string(t + 1) +
                  " must exceed rmin0 " + num(rmin0));
  }
  if (!chem_map.empty()) {
    if (chem_map.size() != radius.size())
      bad_setting("chem needs one channel per element: got " + std::to_string(chem_map.size()) +
                  " for " + std::to_string(radius.size()) + " elements");
    for (int c : chem_map)
      if (c < 0 || c >= num_types()) bad_setting("chem channel out of range: " + std::to_string(c));
  }
}

Bispectrum::Bispectrum(const BispectrumSettings& settings) : s_(settings) {
  s_.validate();
  const int J = s_.twojmax;
  nelem_ = s_.num_elements();
  center_elem_ = element_of(0);  // compute sna/grid: every grid point is a centre of type 1

  u_offset_.resize(J + 2);
  for (int j = 0; j <= J; ++j) u_offset_[j + 1] = u_offset_[j] + (j + 1) * (j + 1);
  num_u_ = u_offset_[J + 1];

  root_.assign((J + 1) * (J + 1), 0.0);
  for (int p = 1; p <= J; ++p)
    for (int q = 1; q <= J; ++q) root_[p * (J + 1) + q] = std::sqrt(static_cast<double>(p) / q);

  std::vector<double> fact(3 * J / 2 + 3, 1.0);
  for (std::size_t n = 1; n < fact.size(); ++n) fact[n] = fact[n - 1] * static_cast<double>(n);

  // Z blocks and their Clebsch-Gordan tables <j1 m1 j2 m2 | j m> with m = m1 + m2 - c,
  // c = (j1 + j2 - j) / 2, from the Racah formula (VMK 8.2.1 eq. 3), in doubled labels.
  block_lookup_.assign((J + 1) * (J + 1) * (J + 1), -1);
  for (int j1 = 0; j1 <= J; ++j1)
    for (int j2 = 0; j2 <= j1; ++j2)
      for (int j = j1 - j2; j <= std::min(J, j1 + j2); j += 2) {
        block_lookup_[(j1 * (J + 1) + j2) * (J + 1) + j] = static_cast<int>(blocks_.size());
        blocks_.push_back({j1, j2, j, cg_.size()});
        const double tri = std::sqrt(fact[(j1 + j2 - j) / 2] * fact[(j1 - j2 + j) / 2] *
                                     fact[(-j1 + j2 + j) / 2] / fact[(j1 + j2 + j) / 2 + 1]);
        for (int m1 = 0; m1 <= j1; ++m1)
          for (int m2 = 0; m2 <= j2; ++m2) {
            const int m = m1 + m2 - (j1 + j2 - j) / 2;
            if (m < 0 || m > j) {
              cg_.push_back(0.0);
              continue;
            }
            const int a2 = 2 * m1 - j1;  // 2 M1
            const int b2 = 2 * m2 - j2;  // 2 M2
            const int kmin = std::max({0, -(j - j2 + a2) / 2, -(j - j1 - b2) / 2});
            const int kmax = std::min({(j1 + j2 - j) / 2, (j1 - a2) / 2, (j2 + b2) / 2});
            double sum = 0.0;
            for (int k = kmin; k <= kmax; ++k) {
              const double den = fact[k] * fact[(j1 + j2 - j) / 2 - k] * fact[(j1 - a2) / 2 - k] *
                                 fact[(j2 + b2) / 2 - k] * fact[(j - j2 + a2) / 2 + k] *
                                 fact[(j - j1 - b2) / 2 + k];
              sum += (k % 2 ? -1.0 : 1.0) / den;
            }
            const int c2 = 2 * m - j;
            const double norm = std::sqrt(fact[m1] * fact[j1 - m1] * fact[m2] * fact[j2 - m2] *
                                          fact[(j + c2) / 2] * fact[(j - c2) / 2] * (j + 1));
            cg_.push_back(sum * tri * norm);
          }
      }

  for (int j1 = 0; j1 <= J; ++j1)
    for (int j2 = 0; j2 <= j1; ++j2)
      for (int j = j1 - j2; j <= std::min(J, j1 + j2); j += 2)
        if (j >= j1) triples_.push_back({j1, j2, j, block_id(j1, j2, j)});

  const int ntrip = static_cast<int>(triples_.size());
  num_linear_ = ntrip * nelem_ * nelem_ * nelem_;
  num_descriptors_ = num_linear_;
  if (s_.quadraticflag) num_descriptors_ += num_linear_ * (num_linear_ + 1) / 2;

  bzero_.assign(J + 1, 0.0);
  if (s_.bzeroflag)
    for (int j = 0; j <= J; ++j) bzero_[j] = s_.bnormflag ? 1.0 : j + 1.0;

  // Adjoint plan. B(j1,j2,j; E1,E2,E3) is trilinear in U^j1_E1, U^j2_E2 and conj U^j_E3;
  // each slot's derivative is a Z block contracted with dU of that slot (Thompson 2015,
  // eqs. 19-21; the (j+1)/(j1+1) factors come from the CG symmetry relations). Every slot
  // is kept separately, so beta need not be symmetric under element permutations.
  const int n = nelem_;
  std::vector<std::vector<AdjointTerm>> plan(blocks_.size() * n * n * n);
  auto add = [&](int blk, int e1, int e2, int e3, int comp, double factor) {
    plan[((static_cast<std::size_t>(blk) * n + e1) * n + e2) * n + e3].push_back({comp, factor});
  };
  for (int t = 0; t < ntrip; ++t) {
    const Triple& tr = triples_[t];
    const double f1 = s_.bnormflag ? 1.0 : (tr.j + 1.0) / (tr.j1 + 1.0);
    const double f2 = s_.bnormflag ? 1.0 : (tr.j + 1.0) / (tr.j2 + 1.0);
    for (int E1 = 0; E1 < n; ++E1)
      for (int E2 = 0; E2 < n; ++E2)
        for (int E3 = 0; E3 < n; ++E3) {
          const int comp = ((E1 * n + E2) * n + E3) * ntrip + t;
          add(tr.block, E1, E2, E3, comp, 1.0);
          add(block_id(tr.j, tr.j2, tr.j1), E3, E2, E1, comp, f1);
          add(block_id(tr.j, tr.j1, tr.j2), E3, E1, E2, comp, f2);
        }
  }
  adj_start_.assign(plan.size() + 1, 0);
  for (std::size_t i = 0; i < plan.size(); ++i) {
    adj_start_[i + 1] = adj_start_[i] + plan[i].size();
    adj_terms_.insert(adj_terms_.end(), plan[i].begin(), plan[i].end());
  }
}

int Bispectrum::block_id(int j1, int j2, int j) const {
  const int J = s_.twojmax;
  return block_lookup_[(j1 * (J + 1) + j2) * (J + 1) + j];
}

BispectrumWorkspace Bispectrum::make_workspace() const {
  BispectrumWorkspace ws;
  const std::size_t nu = static_cast<std::size_t>(num_u_) * nelem_;
  const int J = s_.twojmax;
  const std::size_t nz = static_cast<std::size_t>(J / 2 + 1) * (J + 1);
  ws.utot_re.assign(nu, 0.0);
  ws.utot_im.assign(nu, 0.0);
  ws.y_re.assign(nu, 0.0);
  ws.y_im.assign(nu, 0.0);
  ws.z_re.assign(nz, 0.0);
  ws.z_im.assign(nz, 0.0);
  ws.u_re.assign(num_u_, 0.0);
  ws.u_im.assign(num_u_, 0.0);
  ws.du_re.assign(3 * static_cast<std::size_t>(num_u_), 0.0);
  ws.du_im.assign(3 * static_cast<std::size_t>(num_u_), 0.0);
  ws.linear.assign(num_linear_, 0.0);
  ws.beta_linear.assign(num_linear_, 0.0);
  return ws;
}

void Bispectrum::begin_center(BispectrumWorkspace& ws) const {
  std::fill(ws.utot_re.begin(), ws.utot_re.end(), 0.0);
  std::fill(ws.utot_im.begin(), ws.utot_im.end(), 0.0);
  // self contribution w_self = 1 on the diagonal of the centre's channel (or of all)
  for (int e = 0; e < nelem_; ++e) {
    if (e != center_elem_ && !s_.wselfallflag) continue;
    for (int j = 0; j <= s_.twojmax; ++j)
      for (int m = 0; m <= j; ++m) ws.utot_re[static_cast<std::size_t>(e) * num_u_ + u_index(j, m, m)] = 1.0;
  }
}

// Hyperspherical harmonics u^j_{ma,mb} of the point (theta0, theta, phi) of the 3-sphere
// that d maps to, by the recursion of VMK 4.8.2 in terms of the Cayley-Klein parameters
// a = (z0 - i z)/r0, b = (y - i x)/r0 (Thompson 2015, eqs. 3-4); columns mb > j/2 follow
// from u^j_{j-ma,j-mb} = (-1)^(ma-mb) conj(u^j_{ma,mb}) (VMK 4.4 eq. 2).
void Bispectrum::wigner_u(const double d[3], double rcut, bool with_derivative,
                          BispectrumWorkspace& ws) const {
  const double x = d[0], y = d[1], z = d[2];
  const double r = std::sqrt(x * x + y * y + z * z);
  const double rscale = s_.rfac0 * kPi / (rcut - s_.rmin0);
  const double theta0 = (r - s_.rmin0) * rscale;
  const double z0 = r * std::cos(theta0) / std::sin(theta0);
  const double r0inv = 1.0 / std::sqrt(r * r + z0 * z0);
  const double ar = z0 * r0inv, ai = -z * r0inv, br = y * r0inv, bi = -x * r0inv;

  double dar[3] = {0, 0, 0}, dai[3] = {0, 0, 0}, dbr[3] = {0, 0, 0}, dbi[3] = {0, 0, 0};
  if (with_derivative) {
    const double dz0dr = z0 / r - r * rscale * (r * r + z0 * z0) / (r * r);
    const double dr0invdr = -r0inv * r0inv * r0inv * (r + z0 * dz0dr);
    for (int k = 0; k < 3; ++k) {
      const double unit = d[k] / r;
      const double dr0inv = dr0invdr * unit;
      dar[k] = dz0dr * unit * r0inv + z0 * dr0inv;
      dai[k] = -z * dr0inv;
      dbr[k] = y * dr0inv;
      dbi[k] = -x * dr0inv;
    }
    dai[2] -= r0inv;
    dbr[1] += r0inv;
    dbi[0] -= r0inv;
  }

  double* ur = ws.u_re.data();
  double* ui = ws.u_im.data();
  const std::size_t stride = num_u_;
  ur[0] = 1.0;
  ui[0] = 0.0;
  if (with_derivative)
    for (int k = 0; k < 3; ++k) ws.du_re[k * stride] = ws.du_im[k * stride] = 0.0;

  const int J = s_.twojmax;
  for (int j = 1; j <= J; ++j) {
    for (int mb = 0; 2 * mb <= j; ++mb) {
      for (int ma = 0; ma <= j; ++ma) {
        const int out = u_index(j, mb, ma);
        double vr = 0.0, vi = 0.0;
        double dvr[3] = {0, 0, 0}, dvi[3] = {0, 0, 0};
        if (ma < j) {  // + sqrt((j-ma)/(j-mb)) conj(a) u^{j-1}_{ma,mb}
          const int in = u_index(j - 1, mb, ma);
          const double c = root_[(j - ma) * (J + 1) + (j - mb)];
          vr += c * (ar * ur[in] + ai * ui[in]);
          vi += c * (ar * ui[in] - ai * ur[in]);
          if (with_derivative)
            for (int k = 0; k < 3; ++k) {
              const double dur = ws.du_re[k * stride + in], dui = ws.du_im[k * stride + in];
              dvr[k] += c * (dar[k] * ur[in] + dai[k] * ui[in] + ar * dur + ai * dui);
              dvi[k] += c * (dar[k] * ui[in] - dai[k] * ur[in] + ar * dui - ai * dur);
            }
        }
        if (ma > 0) {  // - sqrt(ma/(j-mb)) conj(b) u^{j-1}_{ma-1,mb}
          const int in = u_index(j - 1, mb, ma - 1);
          const double c = root_[ma * (J + 1) + (j - mb)];
          vr -= c * (br * ur[in] + bi * ui[in]);
          vi -= c * (br * ui[in] - bi * ur[in]);
          if (with_derivative)
            for (int k = 0; k < 3; ++k) {
              const double dur = ws.du_re[k * stride + in], dui = ws.du_im[k * stride + in];
              dvr[k] -= c * (dbr[k] * ur[in] + dbi[k] * ui[in] + br * dur + bi * dui);
              dvi[k] -= c * (dbr[k] * ui[in] - dbi[k] * ur[in] + br * dui - bi * dur);
            }
        }
        ur[out] = vr;
        ui[out] = vi;
        if (with_derivative)
          for (int k = 0; k < 3; ++k) {
            ws.du_re[k * stride + out] = dvr[k];
            ws.du_im[k * stride + out] = dvi[k];
          }
      }
    }
    for (int mb = j / 2 + 1; mb <= j; ++mb)
      for (int ma = 0; ma <= j; ++ma) {
        const int out = u_index(j, mb, ma);
        const int in = u_index(j, j - mb, j - ma);
        const double sign = ((ma - mb) % 2 == 0) ? 1.0 : -1.0;
        ur[out] = sign * ur[in];
        ui[out] = -sign * ui[in];
        if (with_derivative)
          for (int k = 0; k < 3; ++k) {
            ws.du_re[k * stride + out] = sign * ws.du_re[k * stride + in];
            ws.du_im[k * stride + out] = -sign * ws.du_im[k * stride + in];
          }
      }
  }
}

void Bispectrum::add_neighbor(BispectrumWorkspace& ws, const double d[3], int type) const {
  const double rcut = s_.cutoff(type);
  wigner_u(d, rcut, false, ws);
  double f, df;
  switching(s_, std::sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2]), rcut, f, df);
  const double scale = f * s_.weight[type];
  const std::size_t base = static_cast<std::size_t>(element_of(type)) * num_u_;
  for (int i = 0; i < num_u_; ++i) {
    ws.utot_re[base + i] += scale * ws.u_re[i];
    ws.utot_im[base + i] += scale * ws.u_im[i];
  }
}

// Z^j_{j1 j2}(ma, mb) = sum C(j1 ma1 j2 ma2 | j ma) C(j1 mb1 j2 mb2 | j mb) U1(ma1,mb1) U2(ma2,mb2)
// for mb <= j/2 (the other half follows by symmetry and is never needed).
// Loops run over (mb1, mb2) and (ma1, ma2) pairs so the innermost loop is contiguous.
void Bispectrum::z_block(const Block& blk, int e1, int e2, BispectrumWorkspace& ws) const {
  const int j1 = blk.j1, j2 = blk.j2, j = blk.j;
  const int c = (j1 + j2 - j) / 2;
  const int half = j / 2;
  const double* cg = cg_.data() + blk.cg;
  double* zr = ws.z_re.data();
  double* zi = ws.z_im.data();
  std::fill(zr, zr + (half + 1) * (j + 1), 0.0);
  std::fill(zi, zi + (half + 1) * (j + 1), 0.0);
  const double* u1r = ws.utot_re.data() + static_cast<std::size_t>(e1) * num_u_ + u_offset_[j1];
  const double* u1i = ws.utot_im.data() + static_cast<std::size_t>(e1) * num_u_ + u_offset_[j1];
  const double* u2r = ws.utot_re.data() + static_cast<std::size_t>(e2) * num_u_ + u_offset_[j2];
  const double* u2i = ws.utot_im.data() + static_cast<std::size_t>(e2) * num_u_ + u_offset_[j2];

  for (int mb1 = 0; mb1 <= j1; ++mb1) {
    const int mb2_lo = std::max(0, c - mb1);
    const int mb2_hi = std::min(j2, c + half - mb1);
    for (int mb2 = mb2_lo; mb2 <= mb2_hi; ++mb2) {
      const double wb = cg[mb1 * (j2 + 1) + mb2];
      if (wb == 0.0) continue;
      const int mb = mb1 + mb2 - c;
      const double* c1r = u1r + mb1 * (j1 + 1);
      const double* c1i = u1i + mb1 * (j1 + 1);
      const double* c2r = u2r + mb2 * (j2 + 1);
      const double* c2i = u2i + mb2 * (j2 + 1);
      double* rowr = zr + mb * (j + 1);
      double* rowi = zi + mb * (j + 1);
      for (int ma1 = 0; ma1 <= j1; ++ma1) {
        const double tr = wb * c1r[ma1];
        const double ti = wb * c1i[ma1];
        const double* cgrow = cg + ma1 * (j2 + 1);
        const int shift = ma1 - c;  // ma = ma2 + shift
        const int lo = std::max(0, -shift);
        const int hi = std::min(j2, j - shift);
        for (int ma2 = lo; ma2 <= hi; ++ma2) {
          const double g = cgrow[ma2];
          rowr[ma2 + shift] += g * (tr * c2r[ma2] - ti * c2i[ma2]);
          rowi[ma2 + shift] += g * (tr * c2i[ma2] + ti * c2r[ma2]);
        }
      }
    }
  }
  if (s_.bnormflag) {
    const double inv = 1.0 / (j + 1);
    for (int i = 0; i < (half + 1) * (j + 1); ++i) {
      zr[i] *= inv;
      zi[i] *= inv;
    }
  }
}

// sum over the half plane (mb < j/2, and for even j the middle column up to its centre,
// the centre with weight 1/2) of Re(conj(a) b); twice this is the full-plane sum for
// arrays with the symmetry of U.
double Bispectrum::half_plane_dot(int j, const double* a_re, const double* a_im,
                                  const double* b_re, const double* b_im) const {
  double sum = 0.0;
  const int full = ((j + 1) / 2) * (j + 1);  // columns mb < j/2
  for (int i = 0; i < full; ++i) sum += a_re[i] * b_re[i] + a_im[i] * b_im[i];
  if (j % 2 == 0) {
    const int mid = full;  // start of column mb = j/2
    const int m = j / 2;
    for (int ma = 0; ma < m; ++ma) sum += a_re[mid + ma] * b_re[mid + ma] + a_im[mid + ma] * b_im[mid + ma];
    sum += 0.5 * (a_re[mid + m] * b_re[mid + m] + a_im[mid + m] * b_im[mid + m]);
  }
  return sum;
}

void Bispectrum::linear_components(BispectrumWorkspace& ws) const {
  const int n = nelem_;
  const int ntrip = static_cast<int>(triples_.size());
  for (int t = 0; t < ntrip; ++t) {
    const Triple& tr = triples_[t];
    const Block& blk = blocks_[tr.block];
    for (int e1 = 0; e1 < n; ++e1)
      for (int e2 = 0; e2 < n; ++e2) {
        z_block(blk, e1, e2, ws);
        for (int e3 = 0; e3 < n; ++e3) {
          const std::size_t off = static_cast<std::size_t>(e3) * num_u_ + u_offset_[tr.j];
          double b = 2.0 * half_plane_dot(tr.j, ws.utot_re.data() + off, ws.utot_im.data() + off,
                                          ws.z_re.data(), ws.z_im.data());
          const bool self = (e1 == center_elem_ && e2 == center_elem_ && e3 == center_elem_);
          if (s_.bzeroflag && (self || s_.wselfallflag)) b -= bzero_[tr.j];
          ws.linear[((e1 * n + e2) * n + e3) * ntrip + t] = b;
        }
      }
  }
}

void Bispectrum::components(BispectrumWorkspace& ws, double* out) const {
  linear_components(ws);
  const int nl = num_linear_;
  std::copy(ws.linear.begin(), ws.linear.end(), out);
  if (!s_.quadraticflag) return;
  // quadratic terms as in compute sna/grid: 0.5 B_i^2, then B_i B_k for k > i
  int q = nl;
  for (int i = 0; i < nl; ++i) {
    const double bi = ws.linear[i];
    out[q++] = 0.5 * bi * bi;
    for (int k = i + 1; k < nl; ++k) out[q++] = bi * ws.linear[k];
  }
}

void Bispectrum::begin_adjoint(BispectrumWorkspace& ws, const double* beta) const {
  const int nl = num_linear_;
  std::copy(beta, beta + nl, ws.beta_linear.begin());
  if (s_.quadraticflag) {  // chain rule through the quadratic terms
    linear_components(ws);
    int q = nl;
    for (int i = 0; i < nl; ++i) {
      ws.beta_linear[i] += beta[q++] * ws.linear[i];
      for (int k = i + 1; k < nl; ++k) {
        ws.beta_linear[i] += beta[q] * ws.linear[k];
        ws.beta_linear[k] += beta[q] * ws.linear[i];
        ++q;
      }
    }
  }
  std::fill(ws.y_re.begin(), ws.y_re.end(), 0.0);
  std::fill(ws.y_im.begin(), ws.y_im.end(), 0.0);
  const int n = nelem_;
  std::vector<double> coef(n);
  for (std::size_t b = 0; b < blocks_.size(); ++b) {
    const Block& blk = blocks_[b];
    const int size = (blk.j / 2 + 1) * (blk.j + 1);
    for (int e1 = 0; e1 < n; ++e1)
      for (int e2 = 0; e2 < n; ++e2) {
        bool any = false;
        for (int e3 = 0; e3 < n; ++e3) {
          const std::size_t p = ((b * n + e1) * n + e2) * n + e3;
          double sum = 0.0;
          for (std::size_t i = adj_start_[p]; i < adj_start_[p + 1]; ++i)
            sum += adj_terms_[i].factor * ws.beta_linear[adj_terms_[i].component];
          coef[e3] = sum;
          any = any || sum != 0.0;
        }
        if (!any) continue;
        z_block(blk, e1, e2, ws);
        for (int e3 = 0; e3 < n; ++e3) {
          if (coef[e3] == 0.0) continue;
          const std::size_t off = static_cast<std::size_t>(e3) * num_u_ + u_offset_[blk.j];
          for (int i = 0; i < size; ++i) {
            ws.y_re[off + i] += coef[e3] * ws.z_re[i];
            ws.y_im[off + i] += coef[e3] * ws.z_im[i];
          }
        }
      }
  }
}

void Bispectrum::neighbor_gradient(BispectrumWorkspace& ws, const double d[3], int type,
                                   double grad[3]) const {
  const double rcut = s_.cutoff(type);
  wigner_u(d, rcut, true, ws);
  const double r = std::sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2]);
  double f, df;
  switching(s_, r, rcut, f, df);
  const std::size_t base = static_cast<std::size_t>(element_of(type)) * num_u_;
  const double* yr = ws.y_re.data() + base;
  const double* yi = ws.y_im.data() + base;
  double g_u = 0.0;
  double g_du[3] = {0, 0, 0};
  for (int j = 0; j <= s_.twojmax; ++j) {
    const int off = u_offset_[j];
    g_u += half_plane_dot(j, ws.u_re.data() + off, ws.u_im.data() + off, yr + off, yi + off);
    for (int k = 0; k < 3; ++k)
      g_du[k] += half_plane_dot(j, ws.du_re.data() + k * num_u_ + off,
                                ws.du_im.data() + k * num_u_ + off, yr + off, yi + off);
  }
  // U gets w * f(r) * u(d): product rule, then the factor 2 of the half-plane sums
  const double w = s_.weight[type];
  for (int k = 0; k < 3; ++k) grad[k] = 2.0 * w * (df * d[k] / r * g_u + f * g_du[k]);
}

}  // namespace mlsurrogate
