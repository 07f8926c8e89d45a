"""The modality-balancing methods (DESIGN.md section 4): one file per method, its mathematics
as pure tensor functions at the top and its training hooks (a
:class:`~albef_bal.engine.hooks.TrainHooks` subclass) below; shared parts in ``common.py``
(branch scores, pair subsets, held-out measurements) and ``grad_ops.py`` (gradient identities).

- OGM-GE (Peng et al., CVPR 2022): :func:`ogm_coefficients`, :func:`ogm_active`,
  :func:`scale_grad` / :class:`GradScale`, :func:`ge_noise_like`, :func:`ogm_param_filter`;
  the bidirectional rule (MLB, Kontras et al., BMVC 2024): :func:`mlb_coefficients`; the
  first-moment mode's optimizer: :class:`albef_bal.engine.optim.GainAdamW`
- Gradient Blending (Wang et al., CVPR 2020): :func:`gblend_weights`, :func:`scale_to_count`,
  :func:`floor_weights`, :func:`mix_uniform`
- MMPareto (Wei and Hu, ICML 2024): :func:`mmpareto_combine`,
  :func:`mmpareto_combine_with_stats`, :func:`injection_term`
- Diagnosing and Re-learning (Wei et al., ECCV 2024): :func:`cluster_purity`,
  :func:`kmeans_purity`, :func:`relearn_alpha`, :func:`reinit_toward`, :func:`relearn_due`,
  :func:`pseudo_labels`, :func:`purity_gap_se`, :func:`gated_relearn_alpha`
- weakening the leading modality's input (new here): :func:`weaken_strengths`,
  :func:`patch_keep_indices`, :func:`gaussian_blur`, :func:`down_up_sample`,
  :func:`content_token_tables`, :func:`content_word_mask`
- ALBEF roles: ``ALBEF.branch_parameters()`` (vision / text / shared)
- training hooks of each method: ``build_balancer(cfg)`` -> :class:`OGMGEHooks` (ogm.py),
  :class:`GBlendHooks` (gblend.py), :class:`MMParetoHooks` (mmpareto.py),
  :class:`RelearnHooks` (relearn.py), :class:`WeakenHooks` (weaken.py)

Importing this package does not import faiss (the k-means functions do, on first use).
"""
from .factory import build_balancer
from .gblend import GBlendHooks, floor_weights, gblend_weights, mix_uniform, read_weights_file, scale_to_count
from .grad_ops import (GradCoefficient, GradScale, flat_dot, flat_sq_norm, injection_term, make_branch_hook,
                       scale_grad)
from .mmpareto import (MMParetoHooks, MMParetoStats, min_norm_coefficient, mmpareto_combine,
                       mmpareto_combine_with_stats, mmpareto_plan)
from .ogm import OGMGEHooks, ge_noise_like, mlb_coefficients, ogm_active, ogm_coefficients, ogm_param_filter
from .relearn import (RelearnHooks, cluster_purity, gated_relearn_alpha, kmeans_assign, kmeans_purity, minmax_scale,
                      pseudo_labels, purity_gap_se, reinit_toward, relearn_alpha, relearn_due)
from .weaken import (WeakenHooks, content_token_tables, content_word_mask, down_up_sample, gaussian_blur,
                     patch_keep_indices, weaken_strengths)

__all__ = [
    "build_balancer",
    "GBlendHooks", "floor_weights", "gblend_weights", "mix_uniform", "read_weights_file", "scale_to_count",
    "GradCoefficient", "GradScale", "flat_dot", "flat_sq_norm", "injection_term", "make_branch_hook", "scale_grad",
    "MMParetoHooks", "MMParetoStats", "min_norm_coefficient", "mmpareto_combine", "mmpareto_combine_with_stats",
    "mmpareto_plan",
    "OGMGEHooks", "ge_noise_like", "mlb_coefficients", "ogm_active", "ogm_coefficients", "ogm_param_filter",
    "RelearnHooks", "cluster_purity", "gated_relearn_alpha", "kmeans_assign", "kmeans_purity", "minmax_scale",
    "pseudo_labels", "purity_gap_se", "reinit_toward", "relearn_alpha", "relearn_due",
    "WeakenHooks", "content_token_tables", "content_word_mask", "down_up_sample", "gaussian_blur",
    "patch_keep_indices", "weaken_strengths",
]
