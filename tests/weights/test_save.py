"""`gemma4.weights.save`, the one checkpoint writer: what it writes loads back as it was, the
tokenizer travels along (copied, or written from a tokenizer object), and nothing is overwritten."""

import json

import pytest
import tokenizers
import torch

import gemma4
from gemma4.chat import ChatFormat, ChatTemplate
from gemma4.tokenizer import Tokenizer
from gemma4.weights import load_model, save
from gemma4.weights.save import TOKENIZER_FILES

TEMPLATE = "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def word_tokenizer() -> Tokenizer:
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", *"abcdefg"])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return Tokenizer(tok, add_bos=False)


def test_a_saved_model_loads_back_equal(tiny_checkpoint, tmp_path):
    _, path = tiny_checkpoint("tiny-e2b")
    model = load_model(path, dtype="bf16")
    out = save(tmp_path / "copy", model)
    again = load_model(out, dtype="bf16")
    assert again.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    extra = {"quant_method": "x", "tensors": {}}  # written as given: this layer does not read it
    assert json.loads((save(tmp_path / "q", model, quantization_config=extra) / "config.json").read_text())[
        "quantization_config"] == extra


def test_tokenizer_files_are_copied_from_a_checkpoint_directory(tiny_checkpoint, tmp_path):
    _, path = tiny_checkpoint("tiny-gemma-3-270m")
    for name in TOKENIZER_FILES:
        (path / name).write_text(f'{{"file": "{name}"}}')
    (path / "notes.txt").write_text("not a tokenizer file")
    out = save(tmp_path / "out", load_model(path), tokenizer=word_tokenizer(), source=path)
    for name in TOKENIZER_FILES:  # the source's, not the tokenizer object's
        assert (out / name).read_text() == f'{{"file": "{name}"}}'
    assert sorted(p.name for p in out.iterdir()) == sorted([*TOKENIZER_FILES, "config.json", "model.safetensors"])


def test_tokenizer_is_written_from_the_object_with_the_chat_template(tiny_checkpoint, tmp_path):
    """A source with no tokenizer files (a .gguf, a Hub id): the tokenizer object is written, and
    `gemma4.load` reads back the same encoding, BOS rule and chat template."""
    _, path = tiny_checkpoint("tiny-gemma-3-270m")
    tok = word_tokenizer()
    chat_format = ChatFormat("gemma3", ChatTemplate(TEMPLATE))
    out = save(tmp_path / "out", load_model(path), tokenizer=tok, chat_format=chat_format, source=tmp_path / "x.gguf")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config == {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
                      "add_bos_token": False, "chat_template": TEMPLATE}
    _, loaded, chat = gemma4.load(out)
    assert loaded.encode("a b g") == tok.encode("a b g") == [4, 5, 10]
    assert chat.template.source == TEMPLATE
    assert chat.render([{"role": "user", "content": "a"}], add_generation_prompt=False) == "<bos><user>a"


def test_never_writes_into_a_non_empty_directory(tiny_checkpoint, tmp_path):
    _, path = tiny_checkpoint("tiny-gemma-3-270m")
    model = load_model(path)
    (tmp_path / "empty").mkdir()
    assert (save(tmp_path / "empty", model) / "model.safetensors").is_file()  # an empty one is fine
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "mine.txt").write_text("keep me")
    for target in (tmp_path / "used", tmp_path / "used" / "mine.txt"):
        with pytest.raises(FileExistsError, match="already exists and is not an empty directory; choose a new one"):
            save(target, model)
    assert sorted(p.name for p in (tmp_path / "used").iterdir()) == ["mine.txt"]
