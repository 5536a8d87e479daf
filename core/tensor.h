// Dense types used across quantlab. Weights are d_out x d_in (a row = one output channel, a
// column = one input channel), activations N x d_in (a row = one token); both row-major so a
// channel's weights and a token's features are contiguous. Computation is float32 unless a
// function says otherwise; accumulations that must be exact across thread counts use double.
#pragma once
#include <Eigen/Dense>
#include <cstdint>

namespace ql {

using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatrixD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using IntMatrix = Eigen::Matrix<int32_t, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Vector = Eigen::VectorXf;
using VectorD = Eigen::VectorXd;
using Index = Eigen::Index;
/// Row-major matrix / vector of either precision (training ops run in float and, for their
/// finite-difference checks, in double).
template <class S>
using MatT = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class S>
using VecT = Eigen::Matrix<S, Eigen::Dynamic, 1>;

}  // namespace ql
