"""A run's --out directory: a used one is refused, --overwrite replaces it, --resume continues the
same run only (data, model and options checked), survives a damaged checkpoint, logs each step
once and never resumes from a half-written checkpoint."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
from safetensors.torch import save_file
from test_trainer import small_run
from train_helpers import tiny, tiny_dir

import gemma4.train.state
from gemma4.cli import main as gemma4_main
from gemma4.commands import finetune as finetune_command
from gemma4.train import finetune

MODEL = "tiny-gemma-3-270m"


@pytest.fixture
def run(tmp_path):
    """train(out, **config overrides) -> TrainResult; 4 steps with a checkpoint every 2 by default."""
    data, val, config = small_run(tmp_path, name=MODEL, max_steps=4, save_every=2)

    def train(out, *, data=data, model=None, **overrides):
        model = model or tiny(MODEL)[0]
        return finetune(model, data, val=val, out=out, tokenizer=tiny(MODEL)[1],
                        config=dataclasses.replace(config, **overrides))

    train.data, train.config = data, config
    return train


def logged(out):
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r], [r["step"] for r in rows if "val_loss" in r]


def test_a_used_out_is_refused_before_the_model_is_loaded(tmp_path, run, monkeypatch, capsys):
    out = tmp_path / "run"
    run(out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(FileExistsError, match=r"--resume.*--overwrite"):
        run(out)

    def no_loading(*_):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(finetune_command, "load_base", no_loading)
    args = ["finetune", "--model", str(tiny_dir(MODEL)), "--data", str(run.data), "--out", str(out)]
    assert gemma4_main(args) == 1
    err = capsys.readouterr().err
    assert "train_log.jsonl" in err and "--resume" in err and "--overwrite" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing touched

    # Any non-empty directory, run or not; --resume with --overwrite is a contradiction.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    assert gemma4_main([*args[:-1], str(tmp_path / "notes")]) == 1
    assert "todo.txt" in capsys.readouterr().err
    assert gemma4_main([*args, "--resume", "--overwrite"]) == 1
    assert "one or the other" in capsys.readouterr().err


def test_overwrite_replaces_the_run_and_keeps_other_files(tmp_path, run):
    out = tmp_path / "run"
    run(out, max_steps=6)
    (out / "notes.txt").write_text("keep me")
    run(out, overwrite=True, max_steps=2, save_every=0)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "notes.txt", "train_log.jsonl"]
    assert logged(out) == ([1, 2], [0, 2])
    assert (out / "notes.txt").read_text() == "keep me"

    # A checkpoint directory holding something a run did not write is not deleted.
    run(out, overwrite=True)
    (out / "checkpoint-000002" / "eval.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="eval.txt"):
        run(out, overwrite=True)
    assert (out / "checkpoint-000002" / "eval.txt").read_text() == "mine"


def test_resume_with_nothing_to_resume_says_so(tmp_path, run, caplog):
    with caplog.at_level(logging.WARNING):
        result = run(tmp_path / "new", resume=True)
    assert "--resume" in caplog.text and "no checkpoint" in caplog.text and "step 0" in caplog.text
    assert result.steps == 4 and logged(tmp_path / "new")[0] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"nothere.*not a checkpoint"):
        run(tmp_path / "b", resume=str(tmp_path / "nothere"))
    # A run without checkpoints cannot be continued; starting it again needs --overwrite.
    run(tmp_path / "plain", save_every=0)
    with pytest.raises(FileExistsError, match=r"no checkpoint.*--overwrite"):
        run(tmp_path / "plain", resume=True)


def test_resume_refuses_other_data_model_or_options_and_says_what_differs(tmp_path, run):
    out = tmp_path / "run"
    run(out, max_steps=6)  # checkpoints at steps 2 and 4
    other = tmp_path / "other.jsonl"
    other.write_text("".join(run.data.read_text().splitlines(True)[:-1]))
    with pytest.raises(ValueError, match=r"the training data changed \(train\.jsonl -> other\.jsonl\)") as e:
        run(out, data=other, resume=True, max_steps=8)
    assert "--overwrite" in str(e.value)
    with pytest.raises(ValueError) as e:
        run(out, resume=True, lr=5e-3, lora=dataclasses.replace(run.config.lora, r=8))
    assert "lr: 0.001 -> 0.005" in str(e.value) and "lora.r: 4 -> 8" in str(e.value)
    assert "changed" not in str(e.value)  # the data and the model are the same
    model = tiny(MODEL)[0]
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1  # another base: the same config, other weights
    with pytest.raises(ValueError, match="the base model's weights changed"):
        run(out, model=model, resume=True, max_steps=8)
    with pytest.raises(ValueError, match=r"at step 4, past.*step 3"):
        run(out, resume=True, max_steps=3)

    # The length may change (that is how a run is extended), and so may the memory and cadence knobs.
    result = run(out, resume=True, max_steps=8, micro_batch_size=2, save_every=4, eval_every=3)
    assert len(result.train_losses) == 8 and logged(out)[0] == list(range(1, 9))


def test_an_unreadable_trainer_state_names_the_file_and_falls_back(tmp_path, run, caplog):
    out = tmp_path / "run"
    run(out, max_steps=6)
    state = out / "checkpoint-000004" / "trainer_state.json"
    good = json.loads(state.read_text())
    for damaged in (state.read_text()[:40], json.dumps({**good, "step": "4"}), json.dumps({**good, "history": 3})):
        state.write_text(damaged)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            result = run(out, resume=True, max_steps=6)
        assert str(state) in caplog.text and "checkpoint-000002" in caplog.text
        assert len(result.train_losses) == 6 and logged(out)[0] == [1, 2, 3, 4, 5, 6]
        assert json.loads(state.read_text())["step"] == 4  # written again, whole, by the resumed run
    state.write_text("{")
    (out / "checkpoint-000002" / "trainer_state.json").write_text("[]")
    with pytest.raises(ValueError, match=r"no checkpoint.*can be resumed") as e:
        run(out, resume=True, max_steps=6)
    assert str(state) in str(e.value) and "checkpoint-000002" in str(e.value)
    with pytest.raises(ValueError, match=r"checkpoint-000004/trainer_state.json"):
        run(tmp_path / "b", resume=str(out / "checkpoint-000004"))


def test_a_resumed_run_logs_each_step_once(tmp_path, run):
    """A run killed after step 5 with its last checkpoint at 4: steps 5 and 6 are logged once."""
    out = tmp_path / "run"
    run(out, max_steps=6, eval_every=1)
    lines = (out / "train_log.jsonl").read_text().splitlines(True)
    cut = next(i for i, line in enumerate(lines) if json.loads(line)["step"] == 6)
    (out / "train_log.jsonl").write_text("".join(lines[:cut]) + lines[cut][:15])  # killed mid-line
    run(out, resume=True, max_steps=6, eval_every=1)
    assert logged(out) == ([1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6])


def test_checkpoints_are_written_whole_or_not_at_all(tmp_path, run, monkeypatch):
    out = tmp_path / "run"
    calls = []

    def crash_on_the_second(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise OSError("disk full")
        save_file(*args, **kwargs)

    monkeypatch.setattr(gemma4.train.state, "save_file", crash_on_the_second, raising=False)
    with pytest.raises(OSError, match="disk full"):
        run(out, max_steps=6)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-000002", "train_log.jsonl"]

    # A run killed while writing leaves its temporary directory: ignored, then removed.
    killed = out / ".tmp-checkpoint-000004"
    killed.mkdir()
    (killed / "adapter_model.safetensors").write_bytes(b"half")
    result = run(out, resume=True, max_steps=6)
    assert len(result.train_losses) == 6 and not killed.exists()
    assert logged(out)[0] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "checkpoint-000002", "checkpoint-000004", "train_log.jsonl"]


def test_fingerprint_differences_name_each_change():
    from gemma4.train.fingerprint import differences

    saved = {"train": {"name": "t.jsonl", "file": "f1", "tokens": "t1", "examples": 3}, "val": None,
             "model": {"source": "base", "config": "c", "weights": "w"}, "options": {"lr": 1.0, "lora": {"r": 4}}}
    same_file = {**saved, "train": {**saved["train"], "tokens": "t2"}}
    assert differences(saved, saved) == []
    assert differences(saved, same_file) == ["the tokenized training data changed (the same file: the tokenizer, "
                                             "chat format, --max-length or --on-bad-data differ)"]
    moved = {**saved, "model": {**saved["model"], "source": "elsewhere"}}
    assert differences(saved, moved) == []  # the same weights and config: a moved checkpoint
    other = {**saved, "val": saved["train"], "model": {**moved["model"], "config": "c2"}}
    assert differences(saved, other) == ["the checkpoint had no validation data, this run has some",
                                         "the base model's config changed (base -> elsewhere)"]
