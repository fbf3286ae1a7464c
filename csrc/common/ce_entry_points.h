// The cross-entropy ops' entry points (schemas in softmax_ce/ops.py), shared by the CPU and
// CUDA bindings. A binding file supplies
//   forward(logits, target, weight, ignore_index, eps, z, softcap, prob) -> (loss, lse)
//   backward(grad_loss, logits, target, weight, lse, ignore_index, eps, z, softcap, prob, out)
//     -> the gradient, written into `out` (a fresh tensor when `out` is undefined)
//   forward_backward(grad_loss, logits, target, weight, ignore_index, eps, z, softcap, prob)
//     -> (loss, lse, gradient): both in one pass over the logits
//   backward_redo(upstream, grad_loss, logits, target, weight, lse, ignore_index, eps, z,
//                 softcap, prob, out): the backward recomputed into `out` unless the 0-dim
//     `upstream` is 1 (`out` then holds the gradient forward_backward formed for it)
//   validate_inplace(logits, target, ignore_index, prob): checks to pass before an in-place
//     backward may write anything
// and registers CeEntryPoints<forward, backward, validate_inplace, forward_backward,
// backward_redo>::register_all(m) in its TORCH_LIBRARY_IMPL block.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace softmax_ce {

template <auto Forward, auto Backward, auto ValidateInplace, auto ForwardBackward,
          auto BackwardRedo>
struct CeEntryPoints {
  using Opt = std::optional<at::Tensor>;
  using T = at::Tensor;

  static std::tuple<T, T> ce_fwd(const T& logits, const T& target, const Opt& weight,
                                 int64_t ignore_index, double eps, double z, double softcap) {
    return Forward(logits, target, weight, ignore_index, eps, z, softcap, false);
  }
  static T ce_bwd(const T& grad_loss, const T& logits, const T& target, const Opt& weight,
                  const T& lse, int64_t ignore_index, double eps, double z, double softcap) {
    return Backward(grad_loss, logits, target, weight, lse, ignore_index, eps, z, softcap, false,
                    T());
  }
  static void ce_bwd_(const T& grad_loss, const T& logits, const T& target, const Opt& weight,
                      const T& lse, int64_t ignore_index, double eps, double z, double softcap) {
    inplace(grad_loss, logits, target, weight, lse, ignore_index, eps, z, softcap, false);
  }
  static std::tuple<T, T> ce_prob_fwd(const T& logits, const T& target, const Opt& weight,
                                      double eps, double z, double softcap) {
    return Forward(logits, target, weight, -100, eps, z, softcap, true);
  }
  static T ce_prob_bwd(const T& grad_loss, const T& logits, const T& target, const Opt& weight,
                       const T& lse, double eps, double z, double softcap) {
    return Backward(grad_loss, logits, target, weight, lse, -100, eps, z, softcap, true, T());
  }
  static void ce_prob_bwd_(const T& grad_loss, const T& logits, const T& target,
                           const Opt& weight, const T& lse, double eps, double z, double softcap) {
    inplace(grad_loss, logits, target, weight, lse, -100, eps, z, softcap, true);
  }

  static std::tuple<T, T, T> ce_fwd_bwd(const T& grad_loss, const T& logits, const T& target,
                                        const Opt& weight, int64_t ignore_index, double eps,
                                        double z, double softcap) {
    return ForwardBackward(grad_loss, logits, target, weight, ignore_index, eps, z, softcap, false);
  }
  static std::tuple<T, T, T> ce_prob_fwd_bwd(const T& grad_loss, const T& logits, const T& target,
                                             const Opt& weight, double eps, double z,
                                             double softcap) {
    return ForwardBackward(grad_loss, logits, target, weight, -100, eps, z, softcap, true);
  }

  static void ce_bwd_redo_(const T& upstream, const T& grad_loss, const T& logits,
                           const T& target, const Opt& weight, const T& lse, int64_t ignore_index,
                           double eps, double z, double softcap, const T& out) {
    BackwardRedo(upstream, grad_loss, logits, target, weight, lse, ignore_index, eps, z,
                     softcap, false, out);
  }
  static void ce_prob_bwd_redo_(const T& upstream, const T& grad_loss, const T& logits,
                                const T& target, const Opt& weight, const T& lse, double eps,
                                double z, double softcap, const T& out) {
    BackwardRedo(upstream, grad_loss, logits, target, weight, lse, -100, eps, z, softcap,
                     true, out);
  }

  // The gradient into the logits' storage: directly when they are contiguous, else through a
  // fresh gradient copied back.
  static void inplace(const T& grad_loss, const T& logits, const T& target, const Opt& weight,
                      const T& lse, int64_t ignore_index, double eps, double z, double softcap,
                      bool prob) {
    ValidateInplace(logits, target, ignore_index, prob);
    if (logits.is_contiguous()) {
      Backward(grad_loss, logits, target, weight, lse, ignore_index, eps, z, softcap, prob,
               logits);
    } else {
      logits.copy_(Backward(grad_loss, logits, target, weight, lse, ignore_index, eps, z, softcap,
                            prob, T()));
    }
  }

  static void register_all(torch::Library& m) {
    m.impl("ce_fwd", &ce_fwd);
    m.impl("ce_bwd", &ce_bwd);
    m.impl("ce_bwd_", &ce_bwd_);
    m.impl("ce_prob_fwd", &ce_prob_fwd);
    m.impl("ce_prob_bwd", &ce_prob_bwd);
    m.impl("ce_prob_bwd_", &ce_prob_bwd_);
    m.impl("ce_fwd_bwd", &ce_fwd_bwd);
    m.impl("ce_prob_fwd_bwd", &ce_prob_fwd_bwd);
    m.impl("ce_bwd_redo_", &ce_bwd_redo_);
    m.impl("ce_prob_bwd_redo_", &ce_prob_bwd_redo_);
  }
};

}  // namespace softmax_ce
