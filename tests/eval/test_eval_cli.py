"""`gemma4 eval perplexity` end to end: a quantized checkpoint directory with its tokenizer, a text file."""

import json

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

import gemma4
from gemma4.cli import main
from gemma4.eval import gemma_logits_fn, perplexity
from gemma4.commands.eval import perplexity_cli
from gemma4.quant import QuantizedTensor, quantize, save_quantized
from gemma4.weights import load_model


def char_tokenizer(directory):
    """A 128-entry character tokenizer with Gemma's special tokens, for the tiny models' vocabulary."""
    special = ["<pad>", "<eos>", "<bos>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)][: 128 - len(special)]
    vocab = {t: i for i, t in enumerate(special + chars)}
    HFTokenizer(BPE(vocab, [], unk_token="<unk>")).save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))


@pytest.fixture
def quantized_dir(tiny_checkpoint, tmp_path):
    _, path = tiny_checkpoint("tiny-gemma-3-270m")
    out = save_quantized(quantize(load_model(path), "int8"), tmp_path / "q")
    char_tokenizer(out)
    return out


def test_perplexity_cli_on_a_quantized_checkpoint(quantized_dir, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    assert main(["eval", "perplexity", "--model", str(quantized_dir), "--file", str(text), "--window", "32",
                 "--stride", "16", "--device", "cpu"]) == 0
    assert "perplexity" in capsys.readouterr().out
    result = perplexity_cli(quantized_dir, text, window=32, stride=16, max_tokens=50, device="cpu")
    # gemma4.load reads the quantized checkpoint as stored (no float weights) with its tokenizer.
    model, tokenizer, _ = gemma4.load(quantized_dir)
    assert isinstance(model.model.layers[0].mlp.up_proj.weight, QuantizedTensor)
    ids = [2] + [ord(c) - 32 + 4 for c in text.read_text()][:49]  # <bos> + characters
    assert tokenizer.encode(text.read_text())[:50] == ids
    expected = perplexity(gemma_logits_fn(model), ids, 32, 16, progress=False)
    assert result.tokens == 49
    assert result.nll == pytest.approx(expected.nll, rel=1e-6)
    assert torch.equal(result.predictions, expected.predictions)


def test_bad_input_is_a_clear_error_before_loading(tmp_path, capsys):
    assert main(["eval", "perplexity", "--file", str(tmp_path / "missing.txt")]) == 1
    err = capsys.readouterr().err
    assert "gemma4: error: --file" in err and "no such file" in err and "Traceback" not in err
    text = tmp_path / "t.txt"
    text.write_text("hello")
    assert main(["eval", "perplexity", "--file", str(text), "--window", "8", "--stride", "9"]) == 1
    assert "0 < --stride <= --window" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "bleu"])


def test_help_teaches(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "perplexity", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--window" in out and "--stride" in out and "window - stride tokens of context" in out
