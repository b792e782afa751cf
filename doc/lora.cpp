// doc/lora.cpp: the C++ kernels of lora.h on the inputs of doc/lora.py; prints the same first values.
// Build and run from the repository root:  g++ -O2 -std=c++17 doc/lora.cpp -o /tmp/lora_doc && /tmp/lora_doc
#include <cmath>
#include <cstdio>
#include <vector>
#include "../lora.h"

static std::vector<double> filled(size_t n, double offset) {
    std::vector<double> v(n);
    for (size_t i = 0; i < n; i++) v[i] = std::sin((double)i + offset);
    return v;
}

int main() {
    const int BT = 3, C = 4, OC = 5, r = 2;
    const double scale = 4.0 / r;
    std::vector<double> x = filled(BT * C, 1.0), W0 = filled(OC * C, 2.0);
    std::vector<double> lora_A = filled(r * C, 3.0), lora_B = filled(OC * r, 4.0), w = filled(BT * OC, 5.0);
    // the base matmul's part of the output and of dx, written out so that only lora.h is needed
    std::vector<double> out(BT * OC, 0.0), dx(BT * C, 0.0);
    for (int bt = 0; bt < BT; bt++)
        for (int o = 0; o < OC; o++)
            for (int c = 0; c < C; c++) {
                out[bt * OC + o] += x[bt * C + c] * W0[o * C + c];
                dx[bt * C + c] += w[bt * OC + o] * W0[o * C + c];
            }
    std::vector<double> h(BT * r), dh(BT * r), dlora_A(r * C, 0.0), dlora_B(OC * r, 0.0);
    lora_forward(out.data(), h.data(), x.data(), lora_A.data(), lora_B.data(), scale, BT, C, OC, r);
    lora_backward(dx.data(), dlora_A.data(), dlora_B.data(), dh.data(), w.data(), h.data(), x.data(),
                  lora_A.data(), lora_B.data(), scale, BT, C, OC, r);
    auto show = [](const char* name, const std::vector<double>& v) {
        printf("%s: first values [%.15g, %.15g, %.15g, %.15g]\n", name, v[0], v[1], v[2], v[3]);
    };
    show("dlora_A", dlora_A);
    show("dlora_B", dlora_B);
    show("dx", dx);
    return 0;
}
