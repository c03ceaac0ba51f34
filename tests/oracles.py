"""Results that the tests derive without the code path under test, to compare it with.

``policy_exit`` recomputes the exit a policy stops at from each exit's whole-utterance
log-probabilities (``EarlyExitCTCModel.exit_log_probs``, one forward per exit), asking the
policy exit by exit; it shares no code with :func:`earlyexit_brain.dynamic.run_dynamic`'s
incremental batch (``start`` / ``advance`` / ``select``, utterances leaving the batch).
"""

from typing import Optional

import torch


def policy_exit(asr, path: str, policy=None, threshold: Optional[float] = None) -> int:
    """The 1-based exit at which ``asr``'s policy (default: the stored default) stops on ``path``.

    Every exit below the last is asked in turn with its own log-probabilities ``(1, T', V)``;
    the first that the policy stops at is the result, else the last exit.
    """
    chosen = asr.make_policy(policy, threshold)
    signal = asr.load_checked(path)[None].to(asr.device)
    lengths = torch.ones(1, device=asr.device)
    durations = torch.tensor([signal.shape[1] / asr.hparams.sample_rate])
    with torch.no_grad():
        for k in range(asr.num_exits - 1):
            log_probs = asr.model.exit_log_probs(signal, lengths, k)
            if bool(chosen(k, log_probs, lengths.cpu(), durations)[0]):
                return k + 1
    return asr.num_exits


def check_policy_transcription(asr, path: str, policy=None, threshold: Optional[float] = None) -> int:
    """Assert that ``asr.transcribe_file(path, policy=..., threshold=...)`` stops where
    :func:`policy_exit` says, with the layers of that exit and the text of that fixed exit;
    returns the exit."""
    expected = policy_exit(asr, path, policy, threshold)
    result = asr.transcribe_file(path, policy=policy, threshold=threshold)
    fixed = asr.transcribe_file(path, exit=expected)
    assert (result.exit, result.layers, result.text) == (expected, asr.exit_layers[expected - 1], fixed.text), (
        path,
        policy,
        threshold,
        result,
        fixed,
    )
    return expected
