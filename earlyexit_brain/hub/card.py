"""The model card (README.md of a Hub folder): metadata, per-exit results as Hub evaluation
results, the exits and policies, and how to load the model."""

from typing import Dict, Tuple

from .. import __version__
from ..report import report_markdown
from .experiment import PLOT_FILE


def eval_results(report: Dict, dataset: Tuple[str, str]):
    """One huggingface_hub EvalResult per exit and test set (WER in percent)."""
    from huggingface_hub import EvalResult

    results = []
    for entry in report["exits"]:
        for set_name, stats in entry["sets"].items():
            results.append(
                EvalResult(
                    task_type="automatic-speech-recognition",
                    task_name="Speech Recognition",
                    dataset_type=dataset[0],
                    dataset_name=dataset[1],
                    dataset_split=set_name,
                    metric_type="wer",
                    metric_value=float(stats["wer"]),
                    metric_name=f"WER exit {entry['exit']} (layer {entry['layer']})",
                )
            )
    return results


CARD_TEMPLATE = """
# {title}

An **early-exit** speech recogniser trained with earlyexit_brain on SpeechBrain: one
{encoder_kind} of {num_layers} layers with {exit_kind} after layers {exit_layers}, trained with
the multi-exit loss of Wright et al., *Training early-exit architectures for automatic speech
recognition* (arXiv 2309.09546), on the {dataset_name}. At inference the model stops at the exit
chosen by a fixed depth, a latency budget or a confidence policy, and the layers above it are not
computed.

## Usage

```python
# pip install earlyexit_brain
from earlyexit_brain.inference import EarlyExitASR

asr = EarlyExitASR.from_hparams(source="{repo_id}", savedir="pretrained_models/{name}")
asr.transcribe_file("example.wav")                 # calibrated default policy ({default})
asr.transcribe_file("example.wav", exit=1)         # the first exit: fastest
asr.transcribe_file("example.wav", policy="entropy", threshold=0.2)
asr.transcribe_file("example.wav", policy="budget", threshold=50)   # milliseconds
```

From the command line: `python -m earlyexit_brain.transcribe {repo_id} example.wav --exit 1`.

Plain SpeechBrain (no dynamic exits; the default exit, {default_exit}; greedy CTC decoding, so
without any beam search or n-gram LM listed under Results), with `earlyexit_brain` installed
for the model classes:

```python
from speechbrain.inference.ASR import EncoderASR

asr = EncoderASR.from_hparams(source="{repo_id}", savedir="pretrained_models/{name}")
asr.transcribe_file("example.wav")
```

{onnx_section}## Results

{tables}

![WER against the average number of encoder layers computed]({plot})

## Files

`hyperparams.yaml` (inference configuration), `model.ckpt` (encoder, exit heads and any exit decoders),
`normalizer.ckpt` (feature statistics), `tokenizer.ckpt` (SentencePiece), `exit_policies.ckpt`
(calibrated thresholds), `latency_table.ckpt` (per-exit latency measured on the training machine;
re-measure it on yours for the `budget` policy), `ngram_lm.ckpt` when the model decodes with CTC
beam search and a word n-gram, or fuses one into its attention search (ARPA text), `report.json`
(every figure above), `example.wav`{onnx_files}.

Published with earlyexit_brain {version}.
"""


def encoder_kind(hparams: Dict) -> Tuple[str, str]:
    """(words, tag) for the model card from the experiment's ``encoder`` entry."""
    if "ssl" in str(hparams.get("encoder", "")).lower():
        return ("pre-trained self-supervised (wav2vec2-family) encoder, fine-tuned,", "wav2vec2")
    if "splitformer" in str(hparams.get("encoder", "")).lower():
        return (
            "Splitformer encoder (a Conformer with parallel downsampled layers beside the blocks of some exits)",
            "splitformer",
        )
    return ("Conformer encoder", "conformer")


ONNX_SECTION = """## Without PyTorch (ONNX)

`onnx/` holds the model as ONNX graphs, fp32 and int8 (the front end, one graph per encoder
segment between exits, one per exit head), for onnxruntime with numpy, sentencepiece and
soundfile only; decoding is greedy CTC (no beam search or n-gram LM):

```python
# EARLYEXIT_BRAIN_RUNTIME_ONLY=1 pip install "earlyexit_brain[runtime]"
from earlyexit_brain.runtime import EarlyExitONNX

asr = EarlyExitONNX.from_folder("onnx", threads=2)         # precision="int8" for the int8 graphs
asr.transcribe_file("example.wav", policy="entropy")
```

"""


def build_model_card(
    report: Dict,
    repo_id: str,
    dataset: Tuple[str, str],
    policies: Dict,
    license: str = "apache-2.0",
    language: str = "en",
    with_plot: bool = True,
    encoder: Tuple[str, str] = ("Conformer encoder", "conformer"),
    with_onnx: bool = False,
):
    """The model card (huggingface_hub ``ModelCard``) with a model-index of every exit's WER."""
    from huggingface_hub import ModelCard, ModelCardData

    name = repo_id.split("/")[1]
    data = ModelCardData(
        language=language,
        license=license,
        library_name="speechbrain",
        pipeline_tag="automatic-speech-recognition",
        tags=["early-exit", "speechbrain", "earlyexit_brain", "ctc", encoder[1], "speech"],
        datasets=[dataset[0]],
        metrics=["wer"],
        model_name=name,
        eval_results=eval_results(report, dataset),
    )
    default = policies.get("default") or {"policy": "fixed"}
    default_text = (
        f"{default['policy']} {default['threshold']:.4g}"
        if default.get("threshold") is not None
        else f"exit {default.get('exit', len(report['exits']))}"
    )
    tables = report_markdown(report).split("\n", 1)[1].strip()  # without its title
    body = CARD_TEMPLATE.format(
        title=name,
        encoder_kind=encoder[0],
        num_layers=report.get("num_layers", "?"),
        exit_kind=(
            "a CTC head and an attention decoder (joint CTC/attention beam search) at an exit"
            if "aed_beam" in report.get("test_decoders", [])
            else "a CTC exit"
        ),
        exit_layers=", ".join(str(e["layer"]) for e in report["exits"]),
        dataset_name=dataset[1],
        repo_id=repo_id,
        name=name,
        default=default_text,
        default_exit=default.get("exit") or len(report["exits"]),
        tables=tables,
        plot=PLOT_FILE if with_plot else "",
        version=__version__,
        onnx_section=ONNX_SECTION if with_onnx else "",
        onnx_files=(
            ", `onnx/` (the ONNX export: `manifest.json` lists every file with its sha256)" if with_onnx else ""
        ),
    )
    if not with_plot:
        body = body.replace("![WER against the average number of encoder layers computed]()\n", "")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
