"""The loading threat model (earlyexit_brain.safe_load, docs/publishing.md): a model folder
from an untrusted source runs no code, reads and writes nothing outside its folder and
the savedir, cannot hang the loader, and a checkpoint holding code is refused by name.

Each class of attack is tried with several members; every hostile payload would leave a
marker file if it ran, and the tests check that none does.
"""

import os
import pickle
import shutil

import pytest
import torch

from earlyexit_brain.inference import EarlyExitASR
from earlyexit_brain.safe_load import (
    MAX_EXPANDED_NODES,
    UnsafeCheckpointError,
    UnsafeHparamsError,
    check_alias_expansion,
    resolve_name,
    unsafe_tags,
)


def tampered(folder, tmp_path, extra, name="tampered"):
    copy = tmp_path / name
    shutil.copytree(folder, copy)
    with open(copy / "hyperparams.yaml", "a") as fout:
        fout.write("\n" + extra)
    return copy


def replace_in_yaml(folder, tmp_path, old, new):
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    text = (copy / "hyperparams.yaml").read_text()
    assert old in text
    (copy / "hyperparams.yaml").write_text(text.replace(old, new))
    return copy


# ------------------------------------------------- names decided by what they resolve to
REACHED_THROUGH_ALLOWED_MODULES = [
    "pwn: !apply:earlyexit_brain.models.ssl.os.system ['touch {marker}']",
    "pwn: !apply:earlyexit_brain.models.conformer.torch.hub.load ['x', 'y']",
    "pwn: !apply:torch.nn.modules.module.torch.load ['{marker}']",
    "pwn: !new:earlyexit_brain.inference.subprocess.Popen [['touch', '{marker}']]",
    "pwn: !apply:speechbrain.nnet.linear.torch.serialization.pickle.loads [!!binary 'gASVAAAAAAAAAA==']",
    "pwn: !apply:earlyexit_brain.models.pipeline.torch.jit.load ['{marker}']",
    "pwn: !name:earlyexit_brain.inference.os.system",
    "pwn: !module:earlyexit_brain.models.ssl",
    "pwn: !module:earlyexit_brain.models.ssl.os",
    "pwn: !new:earlyexit_brain.inference.JsonRecord.__class__ ['x', [], {{}}]",
    "pwn: !apply:torch.nn.Module.register_forward_hook\n    - !new:torch.nn.Linear [1, 1]\n    - !name:builtins.print",
    'pwn: !apply:eval [\'__import__("os").system("touch {marker}")\']',
    'pwn: !apply:builtins.exec [\'open("{marker}", "w")\']',
    "pwn: !apply:importlib.import_module ['antigravity']",
    "pwn: !new:antigravity.Anything",
    "pwn: !apply:speechbrain.utils.superpowers.run_shell ['touch {marker}']",
]


@pytest.mark.parametrize("line", REACHED_THROUGH_ALLOWED_MODULES)
def test_names_are_judged_by_what_they_resolve_to(folder, tmp_path, line):
    marker = tmp_path / "ran"
    copy = tampered(folder, tmp_path, line.format(marker=marker) + "\n")
    with pytest.raises(UnsafeHparamsError, match="trust_remote_code=True") as err:
        EarlyExitASR.from_hparams(source=str(copy), savedir=str(tmp_path / "saved"))
    assert "is not on the allowlist" in str(err.value) or "never allowed" in str(err.value)
    assert "line " in str(err.value)
    assert not marker.exists()


def test_the_resolver_imports_nothing_outside_the_trusted_packages(monkeypatch):
    import sys

    monkeypatch.delitem(sys.modules, "antigravity", raising=False)
    obj, reason = resolve_name("antigravity.x")
    assert obj is None and "outside the packages" in reason and "antigravity" not in sys.modules
    obj, _ = resolve_name("earlyexit_brain.models.ssl.os.system")
    assert obj is os.system  # resolved like the loader, refused by what it is


def test_allowed_objects_reached_another_way_are_still_allowed():
    """A name is allowed for what it resolves to: torch's Linear via our module is Linear."""
    text = (
        "a: !new:earlyexit_brain.models.conformer.nn.Linear [2, 2]\n"
        "b: !new:torch.nn.ModuleList\n"
        "c: !name:speechbrain.decoders.ctc_greedy_decode\n"
    )
    assert unsafe_tags(text) == []


@pytest.mark.parametrize(
    "line, words",
    [
        ("x: !ref <tokenizer.__class__>", "attribute access in a reference"),
        ("x: !ref <encoder.forward.__globals__>", "attribute access in a reference"),
        ("x: !copy <model.__dict__>", "attribute access in a reference"),
    ],
)
def test_references_with_attribute_access_are_refused(folder, tmp_path, line, words):
    copy = tampered(folder, tmp_path, line + "\n")
    with pytest.raises(UnsafeHparamsError, match=words):
        EarlyExitASR.from_hparams(source=str(copy), savedir=str(tmp_path / "saved"))


# ------------------------------------------------- the Pretrainer stays in the model folder
@pytest.mark.parametrize(
    "paths, words",
    [
        ("paths:\n        model: {outside}/model.ckpt", "paths.model"),
        ("paths:\n        tokenizer: ../tokenizer.ckpt", "paths.tokenizer"),
        ("paths:\n        model: someone/else/model.ckpt", "paths.model"),
        ("paths:\n        model: https://example.org/model.ckpt", "paths.model"),
        ("paths:\n        model: !ref <sample_rate>", "paths.model"),
        ("collect_in: {outside}/collected", "collect_in"),
        ("collect_in: collected_here", "collect_in"),
    ],
)
def test_the_pretrainer_cannot_reach_outside_the_model_folder(folder, tmp_path, paths, words):
    outside = tmp_path / "outside"
    outside.mkdir()
    torch.save(torch.load(os.path.join(folder, "model.ckpt")), outside / "model.ckpt")
    copy = replace_in_yaml(
        folder, tmp_path, "    loadables:\n", "    " + paths.format(outside=outside) + "\n    loadables:\n"
    )
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(UnsafeHparamsError, match=words):
            EarlyExitASR.from_hparams(source=str(copy), savedir=str(tmp_path / "saved"))
    finally:
        os.chdir(cwd)
    assert not (outside / "collected").exists() and not (tmp_path / "collected_here").exists()
    saved = tmp_path / "saved"
    assert not saved.exists() or sorted(os.listdir(saved)) == ["hyperparams.yaml"]


def test_a_positional_pretrainer_is_refused(folder, tmp_path):
    copy = tampered(
        folder, tmp_path, "other: !new:speechbrain.utils.parameter_transfer.Pretrainer ['/tmp/elsewhere']\n"
    )
    with pytest.raises(UnsafeHparamsError, match="by name"):
        EarlyExitASR.from_hparams(source=str(copy), savedir=str(tmp_path / "saved"))


@pytest.mark.parametrize(
    "line, words",
    [
        (
            "x: !new:earlyexit_brain.models.ssl.EarlyExitSSLEncoder\n    source: facebook/wav2vec2-base",
            "may not download",
        ),
        ("x: !new:sentencepiece.SentencePieceProcessor\n    model_file: /etc/hostname", "takes no arguments"),
    ],
)
def test_allowed_classes_may_not_open_other_files(folder, tmp_path, line, words):
    copy = tampered(folder, tmp_path, line + "\n")
    with pytest.raises(UnsafeHparamsError, match=words):
        EarlyExitASR.from_hparams(source=str(copy), savedir=str(tmp_path / "saved"))


# ------------------------------------------------------------------- alias bombs
def alias_bomb(levels: int, width: int = 10) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "text",
    [
        alias_bomb(9),  # 10^9 leaves in under 1 KB
        alias_bomb(6),  # 10^6: still far above the bound
        "a: &a {k: [x, x, x, x]}\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n" * 1
        + "".join(
            f"c{i}: &c{i} [" + ", ".join([f"*{'b' if i == 0 else f'c{i - 1}'}"] * 8) + "]\n" for i in range(7)
        ),  # mappings inside, width 8
    ],
)
def test_alias_bombs_are_refused_before_anything_is_built(folder, tmp_path, monkeypatch, text):
    import speechbrain.inference.interfaces as interfaces

    def never(*args, **kwargs):
        raise AssertionError("the document was handed to HyperPyYAML")

    monkeypatch.setattr(interfaces, "load_hyperpyyaml", never)
    assert len(text) < 2000
    with pytest.raises(UnsafeHparamsError, match="alias bomb"):
        check_alias_expansion(text)
    copy = tampered(folder, tmp_path, text)
    for trust in (False, True):
        with pytest.raises(UnsafeHparamsError, match="alias bomb"):
            EarlyExitASR.from_hparams(
                source=str(copy), savedir=str(tmp_path / f"saved{trust}"), trust_remote_code=trust
            )


def test_a_recursive_alias_is_refused():
    with pytest.raises(UnsafeHparamsError, match="recursive"):
        check_alias_expansion("a: &a [x, *a]\n")


def test_ordinary_aliases_pass():
    check_alias_expansion("a: &a [1, 2, 3]\nb: *a\nc: [*a, *a]\n")
    check_alias_expansion(alias_bomb(3))  # 10^3 nodes: well under the bound
    assert MAX_EXPANDED_NODES >= 10_000


# ----------------------------------------------------------- pickled checkpoints
class Payload:
    """Not a tensor: unpickling it needs arbitrary globals."""


class Exploit:
    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.parametrize(
    "name, payload",
    [
        ("model.ckpt", Payload()),
        ("model.ckpt", Exploit()),
        ("normalizer.ckpt", Exploit()),
    ],
)
def test_a_pickled_checkpoint_is_refused_by_name_without_suggesting_to_unprotect(
    folder, tmp_path, monkeypatch, name, payload
):
    copy = tmp_path / "pickled"
    shutil.copytree(folder, copy)
    state = torch.load(copy / name, weights_only=True)
    state["payload"] = payload
    torch.save(state, copy / name)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # the loader overrides this
    for trust in (False, True):
        with pytest.raises(UnsafeCheckpointError) as err:
            EarlyExitASR.from_hparams(source=str(copy), savedir=str(tmp_path / f"s{trust}"), trust_remote_code=trust)
        message = str(err.value)
        assert name in message and "holds pickled Python objects" in message
        assert "weights_only" not in message and "weights_only=False" not in repr(err.value)
        assert err.value.__suppress_context__  # PyTorch's advice is not shown under ours
        assert isinstance(err.value, pickle.UnpicklingError) and isinstance(err.value, ValueError)
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"  # restored
    assert torch.load.__module__ == "torch.serialization"  # the patch is undone


def test_the_untampered_folder_still_loads(folder, tmp_path):
    asr = EarlyExitASR.from_hparams(source=str(folder), savedir=str(tmp_path / "saved"))
    assert asr.num_exits == 3
