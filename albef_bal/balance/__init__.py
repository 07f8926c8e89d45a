"""The modality-balancing methods (DESIGN.md section 4): one file per method, its mathematics
as pure tensor functions at the top and its training hooks (a
:class:`~albef_bal.engine.hooks.TrainHooks` subclass) below; shared parts in ``common.py``
(branch scores, pair subsets, held-out measurements) and ``grad_ops.py`` (gradient identities).

- OGM-GE (Peng et al., CVPR 2022): :func:`ogm_coefficients`, :func:`ogm_active`,
  :func:`scale_grad` / :class:`GradScale`, :func:`ge_noise_like`, :func:`ogm_param_filter`
- Gradient Blending (Wang et al., CVPR 2020): :func:`gblend_weights`, :func:`scale_to_count`
- MMPareto (Wei and Hu, ICML 2024): :func:`mmpareto_combine`,
  :func:`mmpareto_combine_with_stats`, :func:`injection_term`
- Diagnosing and Re-learning (Wei et al., ECCV 2024): :func:`cluster_purity`,
  :func:`kmeans_purity`, :func:`relearn_alpha`, :func:`reinit_toward`, :func:`relearn_due`,
  :func:`pseudo_labels`
- ALBEF roles: ``ALBEF.branch_parameters()`` (vision / text / shared)
- training hooks of each method: ``build_balancer(cfg)`` -> :class:`OGMGEHooks` (ogm.py),
  :class:`GBlendHooks` (gblend.py), :class:`MMParetoHooks` (mmpareto.py),
  :class:`RelearnHooks` (relearn.py)

Importing this package does not import faiss (the k-means functions do, on first use).
"""
from .factory import build_balancer
from .gblend import GBlendHooks, gblend_weights, read_weights_file, scale_to_count
from .grad_ops import (GradCoefficient, GradScale, flat_dot, flat_sq_norm, injection_term, make_branch_hook,
                       scale_grad)
from .mmpareto import (MMParetoHooks, MMParetoStats, min_norm_coefficient, mmpareto_combine,
                       mmpareto_combine_with_stats, mmpareto_plan)
from .ogm import OGMGEHooks, ge_noise_like, ogm_active, ogm_coefficients, ogm_param_filter
from .relearn import (RelearnHooks, cluster_purity, kmeans_assign, kmeans_purity, minmax_scale, pseudo_labels,
                      reinit_toward, relearn_alpha, relearn_due)

__all__ = [
    "build_balancer",
    "GBlendHooks", "gblend_weights", "read_weights_file", "scale_to_count",
    "GradCoefficient", "GradScale", "flat_dot", "flat_sq_norm", "injection_term", "make_branch_hook", "scale_grad",
    "MMParetoHooks", "MMParetoStats", "min_norm_coefficient", "mmpareto_combine", "mmpareto_combine_with_stats",
    "mmpareto_plan",
    "OGMGEHooks", "ge_noise_like", "ogm_active", "ogm_coefficients", "ogm_param_filter",
    "RelearnHooks", "cluster_purity", "kmeans_assign", "kmeans_purity", "minmax_scale", "pseudo_labels",
    "reinit_toward", "relearn_alpha", "relearn_due",
]
