"""WER-vs-compute evaluation of exit policies, and threshold calibration on dev.

``exit_outputs`` records every exit of every utterance; ``simulation`` simulates the policies on
those records; ``references`` judges them against the fixed-exit line and the oracles;
``calibration`` calibrates their thresholds on dev and sweeps them; ``run`` is what a recipe runs
after training (options, model, records, calibration, the exported inference folder).

Every utterance is run once at batch 1 (as a device transcribing one request
would), through every exit, recording for each exit the hypothesis (greedy CTC;
an AED model's joint CTC/attention beam search), its word errors, the
cumulative milliseconds from the waveform to that exit (the encoder; the
decoding after it is not included),
and each confidence policy's score and the time it took to compute. A policy
decision for an utterance depends only on that utterance's own per-exit
scores, so the exit any threshold would choose, and the resulting WER, depth
and time, follow exactly from these records: a sweep over thresholds costs no
further passes. (``tests/unit/test_exits.py`` checks that the simulated choice
equals a real dynamic run.)
"""

from .calibration import WerIncreaseBootstrap, calibrate, evaluate_policies
from .exit_outputs import ExitOutputs, build_scorers, collect_exit_outputs
from .references import area_below_line, curve_thresholds, fixed_exit_line, line_wer, policy_references
from .run import (
    CALIBRATED_POLICIES,
    POLICY_DEFAULTS,
    SWEEPABLE_POLICIES,
    PolicyEvaluationOptions,
    build_model,
    features_config,
    nbest_options,
    report_decoding,
    run_policy_evaluation,
    stored_decoding,
)
from .simulation import (
    budget_sweep,
    candidate_thresholds,
    confidence_exits,
    depth_and_wer,
    first_stop,
    nearest_depth,
    summarize,
    sweep_thresholds,
    threshold_points,
)

__all__ = [
    "area_below_line",
    "budget_sweep",
    "build_model",
    "build_scorers",
    "calibrate",
    "CALIBRATED_POLICIES",
    "candidate_thresholds",
    "collect_exit_outputs",
    "confidence_exits",
    "curve_thresholds",
    "depth_and_wer",
    "evaluate_policies",
    "ExitOutputs",
    "features_config",
    "first_stop",
    "fixed_exit_line",
    "line_wer",
    "nbest_options",
    "nearest_depth",
    "policy_references",
    "POLICY_DEFAULTS",
    "PolicyEvaluationOptions",
    "report_decoding",
    "run_policy_evaluation",
    "stored_decoding",
    "summarize",
    "sweep_thresholds",
    "SWEEPABLE_POLICIES",
    "threshold_points",
    "WerIncreaseBootstrap",
]
