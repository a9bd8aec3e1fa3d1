"""Uncertainty of the study's accuracies: intervals over seeds and paired tests between two models.

Every model is scored on the same 10,000 test images, and every method runs on the same seeds (one seed
fixes the initialisation, the validation split and the batch order), so two methods are compared paired:

    mcnemar_exact    one seed: do the two trained models err on different numbers of the same test images?
                     McNemar's test (McNemar 1947, Psychometrika 12:153), which Dietterich (1998, Neural
                     Computation 10:1895, Section 3.1) recommends for two classifiers on one test set, here in
                     its exact form: the two-sided binomial test of the discordant images.
    t_interval       Student-t interval of a mean over a few independent values (the seeds).
    paired_seeds     across seeds: mean, t-interval and paired-t p-value of the per-seed accuracy differences.

Why a t-interval over seeds and not a bootstrap: the question "is method A better than B under this
recipe?" is answered by repeating the recipe, so the seed is the unit of replication, and each seed's
difference is already paired on the images. With five seeds a bootstrap over seeds has only 126 distinct
resamples and its percentile interval is too narrow (it uses the n-denominator spread and normal rather
than t quantiles), while the t-interval has its stated coverage when the per-seed differences are roughly
normal. What the seeds cannot show, whether a difference on this one test set is larger than image-level
chance, is what the per-seed McNemar tests answer.
"""
import math

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


def mcnemar_exact(correct_a, correct_b) -> dict:
    """McNemar's exact test of two models' per-image correctness on the same images.

    Returns {"a_only": images only A classifies correctly, "b_only": only B, "p": two-sided p-value}. Under
    the null hypothesis (equal error rates) a discordant image is equally likely to favour either model, so
    a_only ~ Binomial(a_only + b_only, 1/2); p = min(1, 2 P(X <= min(a_only, b_only))), and 1 when the
    models never disagree.
    """
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"the two models were scored on different image sets ({a.shape} vs {b.shape})")
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    p = stats.binomtest(a_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    return {"a_only": a_only, "b_only": b_only, "p": float(p)}


def t_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high): mean ± t_{n-1, (1+confidence)/2} · s / sqrt(n), s the sample std; NaN bounds for n < 2."""
    values = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if not len(values):
        return math.nan, math.nan, math.nan
    m = float(values.mean())
    if len(values) < 2:
        return m, math.nan, math.nan
    half = stats.t.ppf((1 + confidence) / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return m, m - float(half), m + float(half)


def paired_seeds(acc_a, acc_b, confidence: float = CONFIDENCE) -> dict:
    """Per-seed differences acc_a - acc_b (same seeds, same order): {"n", "mean", "low", "high", "p"}.

    p is the two-sided paired t-test of mean difference 0 (p < 1 - confidence exactly when the interval
    excludes 0); NaN for fewer than two seeds or when every seed gives the same difference.
    """
    # rounded: accuracies count whole images, so equal differences must not differ by float noise (1e-14)
    d = np.round(np.asarray(acc_a, dtype=float) - np.asarray(acc_b, dtype=float), 9)
    m, low, high = t_interval(d, confidence)
    p = math.nan
    if len(d) > 1 and d.std(ddof=1) > 0:
        p = float(stats.ttest_1samp(d, 0.0).pvalue)
    return {"n": len(d), "mean": m, "low": low, "high": high, "p": p}
