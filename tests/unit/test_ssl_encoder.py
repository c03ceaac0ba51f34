"""EarlyExitSSLEncoder over tiny random wav2vec2 / WavLM / HuBERT models (no download)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from earlyexit_brain.dynamic import run_dynamic  # noqa: E402
from earlyexit_brain.models.exits import CTCExitHeads  # noqa: E402
from earlyexit_brain.models.ssl import (  # noqa: E402
    EarlyExitSSLEncoder,
    WaveformNormalization,
    check_source,
    init_heads_from_shared,
)

TINY = dict(
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=2,
    intermediate_size=64,
    conv_dim=[16, 16],
    conv_stride=[5, 2],
    conv_kernel=[10, 3],
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2,
    layerdrop=0.0,
)
CONFIGS = {"wav2vec2": "Wav2Vec2Config", "wavlm": "WavLMConfig", "hubert": "HubertConfig"}
MODELS = {"wav2vec2": "Wav2Vec2Model", "wavlm": "WavLMModel", "hubert": "HubertModel"}


def save_tiny(folder, family, stable, **extra):
    torch.manual_seed(0)
    config = getattr(transformers, CONFIGS[family])(do_stable_layer_norm=stable, **{**TINY, **extra})
    if family == "wavlm":
        config.num_buckets, config.max_bucket_distance = 16, 40
    model = getattr(transformers, MODELS[family])(config)
    model.save_pretrained(str(folder))
    return model


@pytest.mark.parametrize("stable", [False, True], ids=["postnorm", "stable"])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_truncated_forward_matches_full_model(tmp_path, family, stable):
    ref = save_tiny(tmp_path, family, stable).eval()
    enc = EarlyExitSSLEncoder(str(tmp_path), exit_layers=[1, 2, 3, 4]).eval()
    assert enc.stable_layer_norm == stable and enc.model_type == family
    wavs = torch.randn(2, 4000)
    lens = torch.tensor([1.0, 0.6])
    samples = torch.round(lens * wavs.shape[1]).long()
    mask = (torch.arange(wavs.shape[1])[None] < samples[:, None]).long()
    with torch.no_grad():
        out = ref(wavs * mask, attention_mask=mask, output_hidden_states=True)
        hiddens = enc(wavs * mask, lens)
    ref_states = out.hidden_states[-4:]  # one per layer
    valid = enc.start(wavs, lens).valid
    for k, h in enumerate(hiddens):
        expected = ref_states[k]
        if stable:  # HF applies the encoder's final norm after the last layer only
            expected = ref.encoder.layer_norm(expected) if k < 3 else out.last_hidden_state
        assert h.shape == expected.shape
        torch.testing.assert_close(h[valid], expected[valid], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(hiddens[-1][valid], out.last_hidden_state[valid], atol=1e-5, rtol=1e-4)
    # truncated: layers above the exit never run
    calls = []
    hooks = [layer.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, layer in enumerate(enc.layers)]
    with torch.no_grad():
        h2 = enc(wavs, lens, max_exit=1)
    for h in hooks:
        h.remove()
    assert calls == [0, 1] and len(h2) == 2
    assert enc.output_frames(4000) == hiddens[0].shape[1]


@pytest.mark.parametrize("trim", [False, True], ids=["keep_padding", "trim"])
@pytest.mark.parametrize("family", ["wav2vec2", "wavlm"])
def test_dynamic_inference_with_select(tmp_path, family, trim):
    save_tiny(tmp_path, family, False)
    enc = EarlyExitSSLEncoder(str(tmp_path), exit_layers=[2, 4]).eval()
    heads = CTCExitHeads(32, 6, 2).eval()
    wavs, lens = torch.randn(3, 3200), torch.tensor([1.0, 0.5, 0.8])

    def stop_first(k, log_probs, rel, durations):
        return torch.tensor([True, False, False])

    with torch.no_grad():
        out = run_dynamic(enc, heads, wavs, lens, stop_first, trim=trim)
        full = [heads.forward_exit(k, h) for k, h in enumerate(enc(wavs, lens))]
    assert out.exits.tolist() == [0, 1, 1]
    frames = enc.start(wavs, lens).frames
    for b in range(3):
        k = int(out.exits[b])
        torch.testing.assert_close(out.log_probs[b], full[k][b, : int(frames[b])], atol=1e-5, rtol=1e-4)


def test_training_controls_and_export_config(tmp_path):
    save_tiny(tmp_path, "hubert", False)
    enc = EarlyExitSSLEncoder(
        str(tmp_path), exit_layers="every_2", freeze_steps=1, overrides={"layerdrop": 0.5}
    ).train()
    assert enc.exit_layers == [2, 4]
    assert not any(p.requires_grad for p in enc.model.feature_extractor.parameters())
    wavs = torch.randn(2, 2000)
    assert not enc(wavs)[-1].requires_grad  # step 1: whole SSL model frozen
    assert enc(wavs)[-1].requires_grad and int(enc.steps) == 2
    # rebuilt from its config without the source folder: same outputs with the same weights
    rebuilt = EarlyExitSSLEncoder(**{k: v for k, v in enc.config.items()})
    rebuilt.load_state_dict(enc.state_dict())
    enc.eval(), rebuilt.eval()  # LayerDrop off at inference
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(wavs)[-1], enc(wavs)[-1])
    assert enc.params_to_exit(0) < enc.params_to_exit(1) <= sum(p.numel() for p in enc.parameters())
    heads = init_heads_from_shared(CTCExitHeads(32, 5, 2))
    torch.testing.assert_close(heads.heads[0].weight, heads.heads[1].weight)


def test_waveform_normalization():
    norm = WaveformNormalization()
    wavs = torch.randn(2, 100) * 3 + 1
    out = norm(wavs, torch.tensor([1.0, 0.5]))
    assert abs(float(out[0].mean())) < 1e-5 and abs(float(out[0].std(unbiased=False)) - 1) < 1e-3
    assert abs(float(out[1, :50].mean())) < 1e-5 and float(out[1, 50:].abs().sum()) == 0.0
    assert torch.equal(WaveformNormalization(enabled=False)(wavs, None), wavs)


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="ssl_source.*neither a local model folder nor"):
        EarlyExitSSLEncoder("not a hub id!", exit_layers=[1])
    with pytest.raises(ValueError, match="ssl_source.*no config.json"):
        check_source(str(tmp_path))
    save_tiny(tmp_path, "wav2vec2", True)
    with pytest.raises(ValueError, match="exit_layers.*out of range.*4 transformer layers"):
        EarlyExitSSLEncoder(str(tmp_path), exit_layers=[2, 6])
    bert = tmp_path / "bert"
    transformers.BertModel(
        transformers.BertConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=10
        )
    ).save_pretrained(str(bert))
    with pytest.raises(ValueError, match="ssl_source.*'bert'.*no wav2vec2-style"):
        EarlyExitSSLEncoder(str(bert), exit_layers=[1])
    enc = EarlyExitSSLEncoder(str(tmp_path), exit_layers=[4])
    with pytest.raises(ValueError, match="waveforms"):
        enc(torch.randn(1, 100, 40))
