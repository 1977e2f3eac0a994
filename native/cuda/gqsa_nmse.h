// The error measure of the CUDA check programs (gqsa_harness.cu, gqsa_ggml_check.cpp):
// normalised mean squared error sum (y - ref)^2 / sum ref^2, against a double-precision reference.
// A NaN in y (an unwritten or unsupported output) propagates, so it fails every threshold; an
// all-zero reference gives the plain squared error.
#pragma once

#include <cstddef>
#include <vector>

static inline double gqsa_nmse(const std::vector<float> & y, const std::vector<double> & ref) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < y.size(); ++i) {
        num += (y[i] - ref[i]) * (y[i] - ref[i]);
        den += ref[i] * ref[i];
    }
    return den > 0.0 ? num / den : num;
}
