// O(N) cell-list neighbor list: periodic (any subset of axes), triclinic, cells smaller than the cutoff.
//
// 1. Periodic axes: wrap atoms into the cell (fractional coordinates in [0, 1)), remembering the integer
//    offsets so shifts can refer to the caller's unwrapped positions.
// 2. Periodic images: every image whose fractional coordinate along each periodic axis a lies within
//    cutoff / h_a of [0, 1) (h_a: distance between the cell faces normal to a), the only images that can be
//    within the cutoff of a wrapped atom. Cells smaller than the cutoff simply give more images.
// 3. Bin atoms and images on a Cartesian grid of bins at least `cutoff` wide over their bounding box and
//    search the 27 bins around each atom.
#include <algorithm>
#include <array>
#include <cmath>
#include <numeric>
#include <sstream>

#include "hessforge/core.h"

namespace hessforge {
namespace {

void cross(const double* a, const double* b, double* out) {
  out[0] = a[1] * b[2] - a[2] * b[1];
  out[1] = a[2] * b[0] - a[0] * b[2];
  out[2] = a[0] * b[1] - a[1] * b[0];
}

double norm3(const double* a) { return std::sqrt(a[0] * a[0] + a[1] * a[1] + a[2] * a[2]); }

constexpr double kMinCellHeight = 0.5;  // Å: engine.neighbors.MIN_CELL_HEIGHT

}  // namespace

NeighborList neighbor_list(const double* x, int64_t n, const double* cell, const bool* pbc, double cutoff) {
  if (!(cutoff > 0.0) || !std::isfinite(cutoff)) {
    std::ostringstream msg;
    msg << "neighbor list: cutoff must be a positive number of Angstrom, got " << cutoff;
    throw Error(msg.str());
  }
  for (int64_t k = 0; k < 3 * n; ++k)
    if (!std::isfinite(x[k])) throw Error("neighbor list: positions contain NaN or Inf");
  const bool any_pbc = pbc[0] || pbc[1] || pbc[2];
  std::vector<double> xw(x, x + 3 * n);      // wrapped positions
  std::vector<double> frac(3 * n, 0.0);      // their fractional coordinates (periodic case)
  std::vector<int64_t> offset(3 * n, 0);     // wrapped = x + offset @ cell
  int nrep[3] = {0, 0, 0};
  double pad[3] = {0, 0, 0};
  if (any_pbc) {
    const double* a = cell;
    const double* b = cell + 3;
    const double* c = cell + 6;
    double bc[3], ca[3], ab[3];
    cross(b, c, bc);
    cross(c, a, ca);
    cross(a, b, ab);
    for (int k = 0; k < 9; ++k)
      if (!std::isfinite(cell[k])) throw Error("neighbor list: periodic cell contains NaN or Inf");
    const double det = a[0] * bc[0] + a[1] * bc[1] + a[2] * bc[2];
    if (!(std::fabs(det) > 1e-8)) throw Error("neighbor list: periodic cell has zero volume");
    // inv(cell) columns are bc/det, ca/det, ab/det:  f = x @ inv(cell)
    const double* cols[3] = {bc, ca, ab};
    for (int ax = 0; ax < 3; ++ax) {
      if (!pbc[ax]) continue;
      const double height = std::fabs(det) / norm3(cols[ax]);
      if (height < kMinCellHeight) {  // as engine.neighbors.check_cell: no crystal is this thin
        std::ostringstream msg;
        msg << "neighbor list: periodic cell is " << height << " Å thick along cell vector " << ax << " (below "
            << kMinCellHeight << " Å, thinner than any crystal: a cell in nm or Bohr, or a broken one?)";
        throw Error(msg.str());
      }
      nrep[ax] = static_cast<int>(std::ceil(cutoff / height));
      pad[ax] = cutoff / height;
    }
    for (int64_t i = 0; i < n; ++i) {
      const double* xi = x + 3 * i;
      for (int ax = 0; ax < 3; ++ax) {
        double f = (xi[0] * cols[ax][0] + xi[1] * cols[ax][1] + xi[2] * cols[ax][2]) / det;
        if (pbc[ax]) {
          const double o = -std::floor(f);
          offset[3 * i + ax] = static_cast<int64_t>(o);
          f += o;
        }
        frac[3 * i + ax] = f;
      }
      for (int d = 0; d < 3; ++d) {
        double shift = 0.0;
        for (int ax = 0; ax < 3; ++ax) shift += static_cast<double>(offset[3 * i + ax]) * cell[3 * ax + d];
        xw[3 * i + d] = xi[d] + shift;
      }
    }
  }

  // Points: the wrapped atoms first (point p < n is atom p with shift 0), then the images.
  std::vector<double> px(xw);
  std::vector<int64_t> patom(n);
  std::iota(patom.begin(), patom.end(), 0);
  std::vector<std::array<int, 3>> pshift(n, std::array<int, 3>{0, 0, 0});
  std::vector<double> pvec(3 * n, 0.0);  // s @ cell of each point
  if (any_pbc) {
    const double eps = 1e-9;
    for (int s0 = -nrep[0]; s0 <= nrep[0]; ++s0)
      for (int s1 = -nrep[1]; s1 <= nrep[1]; ++s1)
        for (int s2 = -nrep[2]; s2 <= nrep[2]; ++s2) {
          if (s0 == 0 && s1 == 0 && s2 == 0) continue;
          const int s[3] = {s0, s1, s2};
          double sv[3];
          for (int d = 0; d < 3; ++d) sv[d] = s0 * cell[d] + s1 * cell[3 + d] + s2 * cell[6 + d];
          for (int64_t i = 0; i < n; ++i) {
            bool keep = true;
            for (int ax = 0; ax < 3 && keep; ++ax) {
              if (!pbc[ax] || s[ax] == 0) continue;
              const double f = frac[3 * i + ax] + s[ax];
              keep = f > -pad[ax] - eps && f < 1.0 + pad[ax] + eps;
            }
            if (!keep) continue;
            for (int d = 0; d < 3; ++d) {
              px.push_back(xw[3 * i + d] + sv[d]);
              pvec.push_back(sv[d]);
            }
            patom.push_back(i);
            pshift.push_back({s0, s1, s2});
          }
        }
  }
  const int64_t npoints = static_cast<int64_t>(patom.size());

  NeighborList out;
  if (n == 0) return out;
  // Bins at least `cutoff` wide over the bounding box, at most ~2 per point.
  double lo[3], hi[3];
  for (int d = 0; d < 3; ++d) {
    lo[d] = hi[d] = px[d];
  }
  for (int64_t p = 1; p < npoints; ++p)
    for (int d = 0; d < 3; ++d) {
      lo[d] = std::min(lo[d], px[3 * p + d]);
      hi[d] = std::max(hi[d], px[3 * p + d]);
    }
  int64_t nb[3];
  double width[3];
  const int64_t max_bins = std::max<int64_t>(64, 2 * npoints);
  for (int d = 0; d < 3; ++d) {  // in double first: a spread of 1e10 Å would overflow the bin counts' product
    const double span = std::floor((hi[d] - lo[d]) / cutoff);
    if (!std::isfinite(span)) throw Error("neighbor list: positions contain NaN or Inf");
    nb[d] = static_cast<int64_t>(std::min(std::max(span, 1.0), static_cast<double>(max_bins)));
  }
  while (static_cast<double>(nb[0]) * static_cast<double>(nb[1]) * static_cast<double>(nb[2]) > max_bins) {
    for (int d = 0; d < 3; ++d) nb[d] = std::max<int64_t>(1, nb[d] / 2);
  }
  for (int d = 0; d < 3; ++d) width[d] = (hi[d] - lo[d]) / static_cast<double>(nb[d]);
  auto bin_of = [&](const double* p, int64_t* b) {
    for (int d = 0; d < 3; ++d) {
      int64_t k = width[d] > 0 ? static_cast<int64_t>((p[d] - lo[d]) / width[d]) : 0;
      b[d] = std::min(std::max<int64_t>(k, 0), nb[d] - 1);
    }
  };
  const int64_t total_bins = nb[0] * nb[1] * nb[2];
  std::vector<int64_t> start(total_bins + 1, 0), pbin(npoints), order(npoints);
  for (int64_t p = 0; p < npoints; ++p) {
    int64_t b[3];
    bin_of(&px[3 * p], b);
    pbin[p] = (b[0] * nb[1] + b[1]) * nb[2] + b[2];
    ++start[pbin[p] + 1];
  }
  for (int64_t k = 0; k < total_bins; ++k) start[k + 1] += start[k];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t p = 0; p < npoints; ++p) order[fill[pbin[p]]++] = p;
  }

  const double cut2 = cutoff * cutoff;
  struct Found {
    int64_t j;
    int64_t s[3];
  };
  std::vector<Found> found;
  out.receivers.reserve(static_cast<size_t>(n) * 16);
  for (int64_t i = 0; i < n; ++i) {
    int64_t b[3];
    bin_of(&px[3 * i], b);
    found.clear();
    for (int64_t b0 = std::max<int64_t>(0, b[0] - 1); b0 <= std::min(nb[0] - 1, b[0] + 1); ++b0)
      for (int64_t b1 = std::max<int64_t>(0, b[1] - 1); b1 <= std::min(nb[1] - 1, b[1] + 1); ++b1)
        for (int64_t b2 = std::max<int64_t>(0, b[2] - 1); b2 <= std::min(nb[2] - 1, b[2] + 1); ++b2) {
          const int64_t bin = (b0 * nb[1] + b1) * nb[2] + b2;
          for (int64_t k = start[bin]; k < start[bin + 1]; ++k) {
            const int64_t p = order[k];
            if (p == i) continue;  // the atom itself (shift 0); its images are other points
            const int64_t j = patom[p];
            // (x_j - x_i) + s @ cell, the reference's order of operations
            const double dx = (xw[3 * j] - xw[3 * i]) + pvec[3 * p];
            const double dy = (xw[3 * j + 1] - xw[3 * i + 1]) + pvec[3 * p + 1];
            const double dz = (xw[3 * j + 2] - xw[3 * i + 2]) + pvec[3 * p + 2];
            if (dx * dx + dy * dy + dz * dz >= cut2) continue;
            Found f{j, {0, 0, 0}};
            for (int ax = 0; ax < 3; ++ax) f.s[ax] = pshift[p][ax] + offset[3 * j + ax] - offset[3 * i + ax];
            found.push_back(f);
          }
        }
    std::sort(found.begin(), found.end(), [](const Found& a, const Found& b) {
      if (a.j != b.j) return a.j < b.j;
      if (a.s[0] != b.s[0]) return a.s[0] < b.s[0];
      if (a.s[1] != b.s[1]) return a.s[1] < b.s[1];
      return a.s[2] < b.s[2];
    });
    for (const Found& f : found) {
      out.receivers.push_back(i);
      out.senders.push_back(f.j);
      out.shifts.insert(out.shifts.end(), f.s, f.s + 3);
    }
  }
  return out;
}

}  // namespace hessforge
