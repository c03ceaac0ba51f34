"""Side-by-side benchmarks and measurement tools of earlyexit_brain (ratios measured in one run, never
timed assertions).

Run from the repository root (the package is not installed with earlyexit_brain: the ``ddp`` section runs
the repository's recipes/train.py and its hparams)::

    python -m benchmarks [--quick] [--only SECTIONS] [--out bench.json]   # bench.json and bench.md
    python -m benchmarks.soak MODEL [--files 2000]                       # memory over many files
    python -m benchmarks.ssl_exit_timing [--seconds 5]                   # SSL encoders vs the Conformer
    python -m benchmarks.onnx_runtime [--quick]                          # onnxruntime vs PyTorch eager
    python -m benchmarks.onnx_profile [--threads 2]                      # where onnxruntime's time goes

Modules: ``__main__`` (the command and its sections), ``train_step`` (``EarlyExitCTCBrain.fit_batch``),
``stacked`` (the train-step variants' alternative hooks), ``inference`` (latency, dynamic inference,
throughput), ``frontend``, ``compute``, ``ddp``, ``memory`` (peak RSS in a child process), ``tables``
(bench.md), ``timing`` (configurations, the inference model, timing in rotation), ``soak``,
``ssl_exit_timing``, ``splitformer``, ``onnx_runtime`` and ``onnx_profile``.
"""
