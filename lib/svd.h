// lib/svd.h: the top-r singular value decomposition PiSSA starts from: a randomized subspace iteration
// (Halko, Martinsson, Tropp 2011) in double: Y = W Omega, a few rounds of Q = qr(W qr(W^T Q)), then the
// small (k, C) matrix Q^T W decomposed through the eigenvectors of its (k, k) Gram matrix.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>
#include "rng.h" // Omega

// Y (m, k) row-major -> its k columns orthonormalised in place (modified Gram-Schmidt, run twice:
// one pass leaves O(eps * cond) of non-orthogonality, the second removes it)
static inline void qr_orthonormalize(double* Y, int m, int k) {
    for (int pass = 0; pass < 2; pass++) {
        for (int j = 0; j < k; j++) {
            for (int i = 0; i < j; i++) {
                double d = 0;
                for (int a = 0; a < m; a++) { d += Y[(size_t)a * k + i] * Y[(size_t)a * k + j]; }
                for (int a = 0; a < m; a++) { Y[(size_t)a * k + j] -= d * Y[(size_t)a * k + i]; }
            }
            double norm = 0;
            for (int a = 0; a < m; a++) { norm += Y[(size_t)a * k + j] * Y[(size_t)a * k + j]; }
            norm = std::sqrt(norm);
            for (int a = 0; a < m; a++) { Y[(size_t)a * k + j] = norm > 0 ? Y[(size_t)a * k + j] / norm : 0.0; }
        }
    }
}

// S (k, k) symmetric -> its eigenvalues on the diagonal of S, eigenvectors in the columns of E (k, k):
// cyclic Jacobi rotations, each zeroing one off-diagonal pair, until the off-diagonal mass is negligible
static inline void jacobi_eigen(double* S, double* E, int k) {
    for (int i = 0; i < k; i++) {
        for (int j = 0; j < k; j++) { E[(size_t)i * k + j] = i == j ? 1.0 : 0.0; }
    }
    for (int sweep = 0; sweep < 100; sweep++) {
        double off = 0, diag = 0;
        for (int i = 0; i < k; i++) {
            diag += S[(size_t)i * k + i] * S[(size_t)i * k + i];
            for (int j = i + 1; j < k; j++) { off += S[(size_t)i * k + j] * S[(size_t)i * k + j]; }
        }
        if (off <= 1e-30 * diag || off == 0) break;
        for (int p = 0; p < k; p++) {
            for (int q = p + 1; q < k; q++) {
                double spq = S[(size_t)p * k + q];
                if (spq == 0) continue;
                // the rotation angle that makes S'[p,q] = 0: tan(2 theta) = 2 S[p,q] / (S[q,q] - S[p,p])
                double theta = (S[(size_t)q * k + q] - S[(size_t)p * k + p]) / (2 * spq);
                double t = (theta >= 0 ? 1.0 : -1.0) / (std::fabs(theta) + std::sqrt(theta * theta + 1));
                double c = 1 / std::sqrt(t * t + 1), sn = t * c;
                for (int a = 0; a < k; a++) { // S <- S J (columns p, q)
                    double sap = S[(size_t)a * k + p], saq = S[(size_t)a * k + q];
                    S[(size_t)a * k + p] = c * sap - sn * saq;
                    S[(size_t)a * k + q] = sn * sap + c * saq;
                }
                for (int a = 0; a < k; a++) { // S <- J^T S (rows p, q)
                    double spa = S[(size_t)p * k + a], sqa = S[(size_t)q * k + a];
                    S[(size_t)p * k + a] = c * spa - sn * sqa;
                    S[(size_t)q * k + a] = sn * spa + c * sqa;
                }
                for (int a = 0; a < k; a++) { // E <- E J
                    double eap = E[(size_t)a * k + p], eaq = E[(size_t)a * k + q];
                    E[(size_t)a * k + p] = c * eap - sn * eaq;
                    E[(size_t)a * k + q] = sn * eap + c * eaq;
                }
            }
        }
    }
}

// W (OC, C) -> the top r singular triplets, descending: U (OC, r) columns, S (r), Vt (r, C) rows.
// k = r + 8 columns are iterated (oversampling) so that the r-th direction converges too; when k
// reaches min(OC, C) the subspace is the whole range and the result is exact.
template <typename real>
void svd_top_forward(double* U, double* S, double* Vt, const real* W, int OC, int C, int r, int iters, uint64_t seed) {
    int k = std::min(r + 8, std::min(OC, C));
    std::vector<double> Y((size_t)OC * k), Z((size_t)C * k);
    Rng rng;
    rng_seed(&rng, seed);
    for (size_t i = 0; i < Z.size(); i++) { Z[i] = rng_normal(&rng); } // Omega (C, k)
    auto W_times = [&](const std::vector<double>& X, std::vector<double>& out) { // out (OC, k) = W @ X, X (C, k)
        #pragma omp parallel for
        for (int o = 0; o < OC; o++) {
            for (int j = 0; j < k; j++) {
                double sum = 0;
                for (int c = 0; c < C; c++) { sum += (double)W[(size_t)o * C + c] * X[(size_t)c * k + j]; }
                out[(size_t)o * k + j] = sum;
            }
        }
    };
    auto Wt_times = [&](const std::vector<double>& X, std::vector<double>& out) { // out (C, k) = W^T @ X, X (OC, k)
        #pragma omp parallel for
        for (int c = 0; c < C; c++) {
            for (int j = 0; j < k; j++) {
                double sum = 0;
                for (int o = 0; o < OC; o++) { sum += (double)W[(size_t)o * C + c] * X[(size_t)o * k + j]; }
                out[(size_t)c * k + j] = sum;
            }
        }
    };
    W_times(Z, Y);
    qr_orthonormalize(Y.data(), OC, k);
    for (int it = 0; it < iters; it++) {
        Wt_times(Y, Z);
        qr_orthonormalize(Z.data(), C, k);
        W_times(Z, Y);
        qr_orthonormalize(Y.data(), OC, k);
    }
    // Bt = W^T Q (C, k), i.e. (Q^T W)^T; its Gram matrix G = Bt^T Bt = Q^T W W^T Q (k, k) = E diag(S^2) E^T
    Wt_times(Y, Z);
    std::vector<double> G((size_t)k * k), E((size_t)k * k);
    for (int i = 0; i < k; i++) {
        for (int j = 0; j < k; j++) {
            double sum = 0;
            for (int c = 0; c < C; c++) { sum += Z[(size_t)c * k + i] * Z[(size_t)c * k + j]; }
            G[(size_t)i * k + j] = sum;
        }
    }
    jacobi_eigen(G.data(), E.data(), k);
    std::vector<int> order(k);
    for (int i = 0; i < k; i++) order[i] = i;
    std::sort(order.begin(), order.end(), [&](int a, int b) { return G[(size_t)a * k + a] > G[(size_t)b * k + b]; });
    for (int i = 0; i < r; i++) {
        int e = order[i];
        double sigma = std::sqrt(std::max(G[(size_t)e * k + e], 0.0));
        S[i] = sigma;
        // u_i = Q E_i; v_i = W^T u_i / sigma_i = Bt E_i / sigma_i
        for (int o = 0; o < OC; o++) {
            double sum = 0;
            for (int j = 0; j < k; j++) { sum += Y[(size_t)o * k + j] * E[(size_t)j * k + e]; }
            U[(size_t)o * r + i] = sum;
        }
        for (int c = 0; c < C; c++) {
            double sum = 0;
            for (int j = 0; j < k; j++) { sum += Z[(size_t)c * k + j] * E[(size_t)j * k + e]; }
            Vt[(size_t)i * C + c] = sigma > 0 ? sum / sigma : 0.0;
        }
    }
}
