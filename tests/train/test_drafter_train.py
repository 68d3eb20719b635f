"""`train_drafter`: self-distillation lowers the loss, the saved drafter loads strictly, and the
acceptance replay counts what step-by-step greedy drafting would accept."""

import json

import pytest
import torch
from train_helpers import tiny

from gemma4.train.drafter import DrafterTrainConfig, acceptance, distill, train_drafter
from gemma4.weights.drafter import load_drafter

WORDS = "you swap words answer please call it is the weather in paris thanks welcome".split()


def _prompts(path, n, seed):
    g = torch.Generator().manual_seed(seed)
    lines = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(torch.randint(2, 6, (1,), generator=g)),),
                                                      generator=g)) for _ in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("name", ["tiny-gemma-3-270m", "tiny-e2b"])
def test_training_lowers_loss_and_saves_a_loadable_drafter(tmp_path, name):
    target, tok = tiny(name)
    cfg = DrafterTrainConfig(steps=25, batch_size=8, lr=3e-3, warmup_steps=5, draft_steps=3, queries=0,
                             max_new_tokens=12, hidden_size=32, intermediate_size=64, progress=False,
                             sparse=name == "tiny-e2b", centroids=8, centroid_top_k=2,
                             negatives=32 if name == "tiny-e2b" else 0)  # a sampled softmax, and the full one
    data, val = _prompts(tmp_path / "train.txt", 24, 0), _prompts(tmp_path / "val.txt", 6, 1)
    result = train_drafter(target, tok, None, data, tmp_path / "drafter", val=val, config=cfg)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    drafter = load_drafter(tmp_path / "drafter", target.config)
    assert json.loads((tmp_path / "drafter" / "generation_config.json").read_text())["num_assistant_tokens"] == 3
    assert (drafter.masked_embedding is not None) == cfg.sparse
    assert 0.0 <= result.acceptance["rate"] <= 1.0 and result.acceptance["drafted"] > 0


def test_acceptance_replays_greedy_drafting(tmp_path):
    """The batched replay equals rounds run one at a time with `Drafter.draft` (the engine's call)."""
    target, tok = tiny("tiny-gemma-3-270m")
    cfg = DrafterTrainConfig(steps=10, batch_size=8, lr=3e-3, max_new_tokens=10, hidden_size=32,
                             intermediate_size=64, progress=False)
    data = _prompts(tmp_path / "train.txt", 8, 2)
    train_drafter(target, tok, None, data, tmp_path / "d", config=cfg)
    drafter = load_drafter(tmp_path / "d", target.config)
    seqs = distill(target, [tok.encode("please call it", add_bos=True), tok.encode("the weather", add_bos=True)], 10)
    got = acceptance(drafter, target, seqs, k=3)
    drafted = accepted = 0
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s.ids])
            out = target.decode(ids)
            p = s.start
            while p < len(s.ids) - 1:
                n = min(3, len(s.ids) - 1 - p)
                kv = {t: (k[:, :, :p], v[:, :, :p], pos[:, :p]) for t, (k, v, pos) in out.shared_kv.items()}
                tokens, _ = drafter.draft(target.model.embed, ids[:, p], out.hidden[:, p - 1], kv,
                                          torch.tensor([p]), n)
                want = s.ids[p + 1 : p + 1 + n]
                m = next((i for i in range(n) if tokens[0, i].item() != want[i]), n)
                drafted, accepted, p = drafted + n, accepted + m, p + m + 1
    assert (got["drafted"], got["accepted"]) == (drafted, accepted)


def test_finetune_drafter_command(tmp_path):
    """`gemma4 finetune --drafter` on a checkpoint directory writes a drafter that loads for it."""
    from train_helpers import tiny_dir

    from gemma4.commands.finetune import main

    target, _ = tiny("tiny-gemma-3-270m")
    data = _prompts(tmp_path / "p.txt", 8, 3)
    assert main(["--drafter", "--model", str(tiny_dir("tiny-gemma-3-270m")), "--data", str(data), "--out",
                 str(tmp_path / "d"), "--max-steps", "2", "--drafter-new-tokens", "4", "--no-progress"]) == 0
    load_drafter(tmp_path / "d", target.config)
    with pytest.raises(FileExistsError):  # a used --out is refused before loading
        main(["--drafter", "--data", str(data), "--out", str(tmp_path / "d")])


def test_realigning_for_a_fine_tuned_model_reads_its_adapter_and_keeps_the_vocabulary(tmp_path):
    """`finetune --drafter INIT --adapter LORA`: the target is the model with the adapter merged
    (its answers, not the base model's, are the labels), and the draft vocabulary grows from INIT's."""
    import json

    from train_helpers import tiny_dir

    from gemma4.commands.finetune import main
    from gemma4.train import LoraConfig, apply_lora, save_adapter
    from gemma4.weights import load_model
    from gemma4.weights.drafter import read_vocabulary

    model_dir = tiny_dir("tiny-gemma-3-270m")
    target = load_model(model_dir)
    config = LoraConfig(r=2, alpha=4, target_modules=("q_proj", "down_proj"))
    apply_lora(target, config)
    with torch.no_grad():
        for name, p in target.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    save_adapter(target, tmp_path / "lora", config)
    data = _prompts(tmp_path / "p.txt", 8, 3)
    common = ["--model", str(model_dir), "--data", str(data), "--max-steps", "2", "--drafter-new-tokens", "4",
              "--no-progress"]
    assert main(["--drafter", *common, "--out", str(tmp_path / "d")]) == 0
    V = target.config.vocab_size
    first = read_vocabulary(tmp_path / "d", V)
    assert first and set(first) >= set(_ids_of(tmp_path / "p.txt"))
    (tmp_path / "d" / "draft_vocabulary.json").write_text(json.dumps({"token_ids": first + [V - 1]}))
    assert main(["--drafter", str(tmp_path / "d"), *common, "--adapter", str(tmp_path / "lora"),
                 "--out", str(tmp_path / "re")]) == 0
    assert V - 1 in read_vocabulary(tmp_path / "re", V)
    with pytest.raises(SystemExit, match="needs --drafter"):
        main(["--adapter", str(tmp_path / "lora"), *common[:4], "--out", str(tmp_path / "x")])


def _ids_of(path):
    from train_helpers import tiny_tokenizer

    tok = tiny_tokenizer()
    return [i for line in path.read_text().splitlines() if line for i in tok.encode(line, add_bos=True)]
