"""Turbo and Multilingual: their synthetic checkpoints load through upstream's own from_local, offline."""
import pytest
import torch

from chatterbox_lab.loading import checkpoint
from chatterbox_lab.loading.models import SPECIAL_TOKEN_BIAS, is_guarded, load_tts
from chatterbox_lab.validation import check_language


@pytest.mark.parametrize("model", ["turbo", "multilingual"])
def test_same_seed_same_checkpoint_in_the_upstream_layout(model, tmp_path):
    built = checkpoint.build_synthetic("tiny", tmp_path / model, model=model)
    cached = checkpoint.ensure_synthetic("tiny", model=model)
    assert checkpoint.read_marker(built)["sha256"] == checkpoint.read_marker(cached)["sha256"]
    assert sorted(p.name for p in built.iterdir()) == sorted([*checkpoint.FILES[model], checkpoint.MARKER])
    assert checkpoint.synthetic_dir("tiny", model=model) != checkpoint.synthetic_dir("tiny")


def test_turbo_loads_as_upstream_builds_it(tiny_turbo):
    t3 = tiny_turbo.t3
    assert type(tiny_turbo).__name__ == "ChatterboxTurboTTS" and tiny_turbo.model == "turbo"
    assert t3.is_gpt and t3.hp.speech_cond_prompt_len == 375 and t3.cond_enc.perceiver is None
    assert tiny_turbo.s3gen.meanflow
    # GPT-2's own bias on the speech head, with the guard added on the start and stop ids only.
    assert is_guarded(t3) and float(t3.speech_head.bias[6561:].max().detach()) < SPECIAL_TOKEN_BIAS / 2
    assert float(t3.speech_head.bias[:6561].abs().max().detach()) < 1


def test_turbo_tokenizer_is_gpt2_shaped(tiny_turbo):
    tokenizer = tiny_turbo.tokenizer
    assert len(tokenizer) == checkpoint.TURBO_VOCAB_SIZE == tiny_turbo.t3.hp.text_tokens_dict_size
    assert tokenizer.eos_token_id == 50256 and tokenizer.pad_token_id == 50256
    text = "Héllo, wörld — 42 times!"
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text  # byte-level: any text, no unknown token
    assert tokenizer.convert_ids_to_tokens(tokenizer(" are written").input_ids) == ["Ġare", "Ġwritten"]  # learnt merges


@pytest.mark.parametrize("language, text", [("en", "Hello there."), ("fr", "Bonjour à tous, ça va ?"),
                                            ("el", "Καλημέρα σας, τι κάνετε;"), ("ko", "안녕하세요")])
def test_multilingual_tokenizer_knows_every_character(tiny_multilingual, language, text):
    ids = tiny_multilingual.tokenizer.text_to_tokens(text, language_id=language)[0].tolist()
    vocab = tiny_multilingual.tokenizer.tokenizer.get_vocab()
    assert ids[0] == vocab[f"[{language}]"] and vocab["[UNK]"] not in ids
    assert tiny_multilingual.t3.hp.is_multilingual and is_guarded(tiny_multilingual.t3)


def test_languages_are_checked_before_any_work(tiny_multilingual):
    directory = tiny_multilingual.checkpoint_dir
    assert check_language("multilingual", "FR", directory) == "fr"
    assert check_language("original", None) is None and check_language("turbo", "en") is None
    with pytest.raises(ValueError, match="unknown language 'xx' for the multilingual model: choose one of ar, "):
        check_language("multilingual", "xx", directory)
    with pytest.raises(ValueError, match="speaks English only, got language 'fr': use model 'multilingual'"):
        check_language("turbo", "fr")
    with pytest.raises(ValueError, match="'ja' needs the optional package 'pykakasi'.*pip install pykakasi"):
        check_language("multilingual", "ja", directory)
    with pytest.raises(ValueError, match="'zh' needs the optional package 'spacy-pkuseg'"):
        check_language("multilingual", "zh", directory)


def test_chinese_table_is_read_from_the_checkpoint_never_fetched(tiny_multilingual, monkeypatch):
    from chatterbox_lab import validation
    from chatterbox_lab.loading.models import cangjie_from
    from chatterbox.models.tokenizers import tokenizer

    with cangjie_from(tiny_multilingual.checkpoint_dir):
        with pytest.raises(FileNotFoundError, match="nothing is fetched"):
            tokenizer.hf_hub_download(repo_id="ResembleAI/chatterbox", filename=validation.CANGJIE_FILE)
    monkeypatch.setitem(validation.LANGUAGE_PACKAGES, "zh", ("json", "json"))  # as if spacy-pkuseg were there
    with pytest.raises(ValueError, match="'zh' needs Cangjie5_TC.json .* nothing is fetched over the network"):
        check_language("multilingual", "zh", tiny_multilingual.checkpoint_dir)


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="unknown model 'mini': choose one of original, turbo, multilingual"):
        load_tts(model="mini", device="cpu")


def test_a_turbo_checkpoint_is_not_an_original_one(tmp_path):
    directory = checkpoint.ensure_synthetic("tiny", model="turbo")
    with pytest.raises(FileNotFoundError, match="missing t3_cfg.safetensors, s3gen.safetensors"):
        load_tts(directory, device="cpu")
