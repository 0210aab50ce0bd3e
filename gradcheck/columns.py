"""Column names of ``steps.parquet`` (docs/formats.md): one name per quantity, used everywhere.

One row per (sample, step), long format. Vectors are per sample: ``g`` is the raw classifier
gradient (D3), ``gtilde`` the applied vector after the stabiliser (D4) and normalisation (D5).
"""

from __future__ import annotations

RUN_ID = "run_id"  # the run folder's name
SAMPLE = "sample"  # global sample index i; the sample depends only on (seed, i)
STEP = "step"  # sampling step k = 0 .. steps-1 (k = 0 is the noisiest)
T = "t"  # DDPM timestep of step k (respaced: 999 .. 0 for 1000 steps)
ABAR = "abar"  # abar_t of the schedule
TARGET = "target"  # guided class index (gradcheck.CLASS_NAMES)
GRAD_NORM_RAW = "grad_norm_raw"  # ||g_t||_2 (D3)
GRAD_NORM_APPLIED = "grad_norm_applied"  # ||gtilde_t||_2 (D5)
SCORE_NORM = "score_norm"  # ||score_theta(x_t)||_2 (D1)
COS_PREV_RAW = "cos_prev_raw"  # cos(g_t, g_{t+1}), previous sampling step (D7); NaN at step 0
COS_PREV_APPLIED = "cos_prev_applied"  # cos(gtilde_t, gtilde_{t+1}) (D7, GradCheck Eq. 5)
COS_RAW_APPLIED = "cos_raw_applied"  # cos(g_t, gtilde_t): how far D4 turns the gradient
COS_SCORE = "cos_score"  # cos(gtilde_t, score_theta(x_t))
LOG_PROB_TARGET = "log_prob_target"  # log p_phi(target | x_in), x_in = x_t or x0_hat (D3)
PRED_CLASS = "pred_class"  # argmax_y p_phi(y | x_in)
PROB_TARGET_X0 = "prob_target_x0"  # p_phi(target | x0_hat) (D2; time-conditioned with t = 0)
COS_ORACLE = "cos_oracle"  # cos(gtilde_t, grad log q(target | x_t)) (D8); NaN when off
GRAD_VANISHED = "grad_vanished"  # h_t exactly 0 or non-finite: gtilde_t = 0 (D5)
# D7' null baseline: cos_prev of the same stabiliser fed isotropic Gaussian gradients with the
# raw gradients' norms (what its memory alone gives: about 0.93 for adam, 0 for none).
COS_PREV_NULL = "cos_prev_null"
# ||x_t|| / sqrt(D (abar_t m2 + 1 - abar_t)), m2 = the data's mean x_0^2: 1 on the DDPM's own
# marginal; far above 1, the chain has left the distribution the DDPM was trained on.
X_NORM_RATIO = "x_norm_ratio"

STEP_COLUMNS: tuple[str, ...] = (
    RUN_ID, SAMPLE, STEP, T, ABAR, TARGET, GRAD_NORM_RAW, GRAD_NORM_APPLIED, SCORE_NORM,
    COS_PREV_RAW, COS_PREV_APPLIED, COS_RAW_APPLIED, COS_SCORE, LOG_PROB_TARGET, PRED_CLASS,
    PROB_TARGET_X0, COS_ORACLE, GRAD_VANISHED, COS_PREV_NULL, X_NORM_RATIO,
)
"""All columns, in file order."""

CONFIG_METADATA_KEY = "gradcheck.run_config"
"""Schema metadata key of steps.parquet holding the resolved run config as JSON."""

# vectors.safetensors keys: (samples, steps, 3, H, W) tensors and their index vectors.
VEC_GRAD_RAW = "grad_raw"  # g_t
VEC_GRAD_APPLIED = "grad_applied"  # gtilde_t
VEC_X0_HAT = "x0_hat"  # D2 estimate of the clean image
VEC_SAMPLE = "sample"  # (samples,) global sample indices
VEC_STEP = "step"  # (steps,) sampling step indices k
VEC_T = "t"  # (steps,) DDPM timesteps
