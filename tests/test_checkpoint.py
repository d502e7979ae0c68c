
import pytest
import torch

from chatterbox_lab.loading import checkpoint
from chatterbox_lab.loading.architecture import build_t3, check_preset
from chatterbox_lab.loading.models import SPECIAL_TOKEN_BIAS, is_guarded, load_tts, resolve_device


def test_same_seed_same_weights(tmp_path):
    a = checkpoint.build_synthetic("tiny", tmp_path / "a", seed=5)
    b = checkpoint.build_synthetic("tiny", tmp_path / "b", seed=5)
    c = checkpoint.build_synthetic("tiny", tmp_path / "c", seed=6)
    digest = checkpoint.read_marker(a)["sha256"]
    assert digest == checkpoint.read_marker(b)["sha256"] == checkpoint.weights_digest(a)
    assert digest != checkpoint.read_marker(c)["sha256"]
    assert sorted(p.name for p in a.iterdir()) == sorted([*checkpoint.REQUIRED_FILES, checkpoint.MARKER])


def test_build_refuses_to_overwrite(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        checkpoint.build_synthetic("tiny", tmp_path / "x")


def test_round_trip_through_upstream_loader(tiny_tts):
    """The synthetic files load through ChatterboxTTS.from_local into the tiny architecture."""
    import torch
    from safetensors.torch import load_file

    saved = load_file(tiny_tts.checkpoint_dir / "t3_cfg.safetensors")
    state = tiny_tts.t3.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(state[name].float(), tensor.float()), name
    assert tiny_tts.synthetic and tiny_tts.preset == "tiny"


def test_guard_only_on_synthetic(tiny_tts, tmp_path):
    assert is_guarded(tiny_tts.t3)
    bias = tiny_tts.t3.speech_head.bias
    assert float(bias[6561:].max()) == SPECIAL_TOKEN_BIAS and float(bias[:6561].abs().max()) == 0
    real = tmp_path / "real"
    checkpoint.build_synthetic("tiny", real)
    (real / checkpoint.MARKER).unlink()  # now indistinguishable from a user's checkpoint
    # A real checkpoint is the full architecture; the tiny weights cannot load into it.
    with pytest.raises(ValueError, match="do not fit the full Chatterbox architecture"):
        load_tts(real, device="cpu")


def test_unknown_preset_and_device():
    with pytest.raises(ValueError, match="choose one of full, tiny"):
        check_preset("huge")
    with pytest.raises(ValueError, match="choose one of cpu, cuda, mps"):
        resolve_device("tpu")


def test_cache_dir_is_overridable(monkeypatch, tmp_path):
    monkeypatch.setenv("CHATTERBOX_LAB_CACHE", str(tmp_path))
    assert checkpoint.synthetic_dir("tiny").parent == tmp_path


def test_tokenizer_layout():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(checkpoint._tokenizer_json())
    vocab = tok.get_vocab()
    assert len(vocab) == checkpoint.TEXT_VOCAB_SIZE
    assert vocab["[START]"] == 255 and vocab["[STOP]"] == 0
    assert tok.encode("Hi[SPACE]you").ids == [vocab["H"], vocab["i"], vocab["[SPACE]"], vocab["y"], vocab["o"], vocab["u"]]


def test_tiny_t3_is_small():
    from chatterbox_lab.loading.architecture import count_parameters

    assert count_parameters(build_t3("tiny")) < 5_000_000


@pytest.mark.parametrize("model, fixture", [("original", "tiny_tts"), ("turbo", "tiny_turbo"),
                                            ("multilingual", "tiny_multilingual")])
def test_building_without_initial_weights_loads_the_same_model(model, fixture, request):
    """The default load skips the random weights the checkpoint overwrites: every weight and
    buffer equals those of a model built as upstream builds it, for each model of the family."""
    from chatterbox_lab.loading.models import load_tts

    ours = request.getfixturevalue(fixture)
    upstream_built = load_tts(model=model, preset="tiny", device="cpu", skip_init=False)

    def parts(tts):
        return {"t3": tts.t3, "s3gen": tts.s3gen, "ve": tts.ve, "watermarker": tts.watermarker.perth_net}
    for part, module in parts(upstream_built).items():
        loaded = dict((*parts(ours)[part].named_parameters(), *parts(ours)[part].named_buffers()))
        built = dict((*module.named_parameters(), *module.named_buffers()))
        assert loaded.keys() == built.keys(), part
        for name, tensor in built.items():
            assert torch.equal(loaded[name], tensor), f"{model}: {part}.{name}"


def test_a_weight_a_load_leaves_unset_is_reported():
    from chatterbox_lab.loading.models import weights_left_for_the_checkpoint

    with weights_left_for_the_checkpoint() as unset:
        layers = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
        layers.load_state_dict({"0.weight": torch.ones(2, 3), "0.bias": torch.ones(2)}, strict=False)
    assert unset == ["Sequential.1.weight", "Sequential.1.bias"]
    assert torch.equal(layers[0].weight, torch.ones(2, 3))
    assert torch.nn.Linear.reset_parameters is not None and torch.nn.init.kaiming_uniform_.__name__ == "kaiming_uniform_"
