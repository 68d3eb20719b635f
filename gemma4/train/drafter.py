"""Training an MTP drafter by self-distillation: the target's own greedy outputs are the labels.

1. Prompts (a JSONL file of chat or text lines, or a text file of one prompt per line) are run
   through the target greedily (`TokenGenerator`); each prompt plus its continuation is one sequence.
2. The target reads each sequence once (`Gemma.decode`, no gradient): its final-normed hidden states
   and the K/V of its store layers (`DecoderOutput.shared_kv`), exactly what the drafter gets at
   inference. They are kept (on the CPU) for the whole run, so training runs the drafter only.
3. For every position p of a continuation, the drafter runs k chained steps from the same p as at
   inference: step 1 reads the embedding of token p and the target's hidden state at p-1; step j+1
   reads the embedding of token p+j (the target's greedy token: what the draft is when accepted)
   and the drafter's own hidden output of step j. Step j is trained to predict token p+j (cross-
   entropy through the tied head, in chunks). Its keys are positions < p, as at inference.

A new drafter takes the target's geometry where it must (head dims, KV heads, window, RoPE) and
starts from the target's embedding table when its width equals the target's (the head then already
knows the vocabulary; it stays frozen unless `train_embeddings`). `init` re-aligns an existing
drafter instead. `acceptance` replays greedy speculative decoding on held-out sequences.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import FULL, SLIDING, DrafterConfig, TextConfig, kv_store_layers
from ..engine.generate import TokenGenerator
from ..engine.sampling import SamplingParams
from ..model.attention import KV
from ..model.drafter import Drafter
from ..weights.drafter import check_fits, load_drafter, read_vocabulary, save_drafter, save_vocabulary
from ..weights.save import check_target
from .data import DataError, chat_segments
from .loss import chunked_cross_entropy

log = logging.getLogger(__name__)


@dataclass
class DrafterTrainConfig:
    steps: int | None = None  # optimizer steps; None: `epochs` passes over the prompts
    epochs: float = 1.0
    batch_size: int = 8  # sequences per step
    lr: float = 1e-3  # AdamW peak; linear warm-up, cosine decay to 0
    warmup_steps: int = 10
    draft_steps: int = 3  # k: chained steps in the loss (and drafted per round when measuring)
    queries: int = 32  # positions p trained per sequence and step (sampled; 0 = all)
    negatives: int = 4096  # sampled softmax: labels + this many random tokens (0 or >= vocab: full softmax)
    max_new_tokens: int = 64  # greedy continuation per prompt
    max_length: int = 1024  # longer prompts are skipped
    hidden_size: int | None = None  # a new drafter's width (default: the target's)
    intermediate_size: int | None = None  # its MLP width (default: 4 x its width, at most the target's)
    sparse: bool = False  # a new drafter gets the sparse head: `centroids` clusters, the top `centroid_top_k` open
    centroids: int = 2048
    centroid_top_k: int = 32
    train_embeddings: bool = False  # forced on when a new drafter's width differs from the target's
    seed: int = 0
    progress: bool = True


@dataclass
class DrafterTrainResult:
    out: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # mean CE over the k steps, per optimizer step
    seconds: float = 0.0
    acceptance: dict | None = None  # on the validation prompts, if any


# ------------------------------------------------------------------------------------------------
# A new drafter for a target


def new_drafter(target, config: DrafterTrainConfig) -> Drafter:
    """A randomly initialised 4-layer drafter (3 sliding + 1 full) that fits `target`'s cache."""
    tc: TextConfig = target.config
    store = kv_store_layers(tc)
    if set(store) != {SLIDING, FULL}:
        raise ValueError(f"the target has store layers of types {sorted(store)}; a drafter needs a sliding and a "
                         "full-attention layer to read K/V from")
    d = config.hidden_size or tc.hidden_size
    sliding, full = store[SLIDING], store[FULL]
    heads = max(tc.num_attention_heads, sliding.num_kv_heads, full.num_kv_heads)
    text = dict(
        model_type="gemma4_text", vocab_size=tc.vocab_size, hidden_size=d,
        intermediate_size=config.intermediate_size or min(4 * d, max(tc.intermediate_size, d)),
        num_hidden_layers=4, layer_types=[SLIDING, SLIDING, SLIDING, FULL], num_attention_heads=heads,
        head_dim=sliding.head_dim, global_head_dim=full.head_dim, num_key_value_heads=sliding.num_kv_heads,
        # The full layers' KV-head count is a separate field only with k_eq_v (no K/V weights here either way).
        attention_k_eq_v=full.num_kv_heads != sliding.num_kv_heads, num_global_key_value_heads=full.num_kv_heads,
        sliding_window=tc.sliding_window, rope_parameters=tc.rope_parameters,
        max_position_embeddings=tc.max_position_embeddings, rms_norm_eps=tc.rms_norm_eps,
        hidden_size_per_layer_input=0, num_kv_shared_layers=4, final_logit_softcapping=None,
        pad_token_id=tc.pad_token_id, bos_token_id=tc.bos_token_id, eos_token_id=tc.eos_token_id,
    )
    raw = dict(model_type="gemma4_assistant", text_config=text, backbone_hidden_size=tc.hidden_size,
               use_ordered_embeddings=config.sparse, num_centroids=config.centroids,
               centroid_intermediate_top_k=config.centroid_top_k)
    dc = DrafterConfig.from_hf_dict(raw)
    check_fits(dc, tc, "the new drafter")
    torch.manual_seed(config.seed)
    param = next(target.parameters())
    model = Drafter(dc).to(device=param.device, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, p.shape[-1] ** -0.5)
            else:
                p.fill_(1.0)
        table = target.model.embed_tokens.weight
        if d == tc.hidden_size:
            model.model.embed_tokens.weight.copy_(table.float())
        if model.masked_embedding is not None:
            # Clusters of consecutive ids; the centroid scores learn which clusters to open.
            model.masked_embedding.token_ordering.copy_(torch.arange(tc.vocab_size))
    return model


# ------------------------------------------------------------------------------------------------
# Data: prompts -> the target's greedy continuations -> the target's states


def read_prompts(path: str | Path, tokenizer, chat_format, max_length: int) -> list[list[int]]:
    """Prompt ids from a JSONL file (chat lines: the conversation before its last assistant turn,
    rendered with the generation prompt; text lines: <bos> + text; {"prompt": ...}: one user turn)
    or from a text file (one user prompt per line)."""
    path = Path(path)
    prompts, skipped = [], 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ids = _prompt_ids(line, path.suffix == ".jsonl", tokenizer, chat_format)
            except (ValueError, TypeError, KeyError) as e:
                raise DataError(f"{path}:{lineno}: {e}") from None
            if len(ids) > max_length:
                skipped += 1
                continue
            prompts.append(ids)
    if skipped:
        log.warning("%s: skipped %d prompt(s) longer than %d tokens", path, skipped, max_length)
    if not prompts:
        raise DataError(f"{path} has no usable prompt")
    return prompts


def _prompt_ids(line: str, jsonl: bool, tokenizer, chat_format) -> list[int]:
    def user(text: str) -> list[int]:
        if chat_format is None:
            return tokenizer.encode(text, add_bos=True)
        rendered = chat_format.render([{"role": "user", "content": text}], None, add_generation_prompt=True)
        return tokenizer.encode(rendered, add_bos=False)

    if not jsonl:
        return user(line.rstrip("\n"))
    obj = json.loads(line)
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object with 'messages', 'text' or 'prompt'")
    if "messages" in obj:
        messages = obj["messages"]
        last = max((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"),
                   default=len(messages))
        if last == 0:
            raise ValueError("the conversation starts with an assistant turn: no prompt before it")
        chat_segments(chat_format, messages[:last] + [{"role": "assistant", "content": ""}], obj.get("tools"))
        rendered = chat_format.render(messages[:last], obj.get("tools"), add_generation_prompt=True)
        return tokenizer.encode(rendered, add_bos=False)
    if isinstance(obj.get("text"), str) and obj["text"]:
        return tokenizer.encode(obj["text"], add_bos=True)
    if isinstance(obj.get("prompt"), str) and obj["prompt"]:
        return user(obj["prompt"])
    raise ValueError("a line needs 'messages' (chat), 'text' or 'prompt'")


@dataclass
class Sequence:
    """A prompt plus the target's greedy continuation (ids[start:]), and the target's states on it:
    final-normed hidden [T, D] and the store layers' K/V {type: (K [Hkv, T, d], V)}."""

    ids: list[int]
    start: int
    hidden: torch.Tensor | None = None
    kv: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None


@torch.no_grad()
def distill(target, prompts: list[list[int]], max_new_tokens: int, batch: int = 8) -> list[Sequence]:
    """The target's greedy continuations (ending at its stop token, which is kept) and its states."""
    stops = set(target.config.eos_token_id)
    greedy = SamplingParams(temperature=0.0)
    out: list[Sequence] = []
    for lo in range(0, len(prompts), batch):
        chunk = prompts[lo : lo + batch]
        new: list[list[int]] = [[] for _ in chunk]
        for events in TokenGenerator(target, chunk, [greedy] * len(chunk), [max_new_tokens] * len(chunk), stops):
            for i, e in enumerate(events):
                if e is not None and e.token is not None:
                    new[i].append(e.token)
        out += [Sequence(p + n, len(p)) for p, n in zip(chunk, new) if n]
    for lo in range(0, len(out), batch):
        _target_states(target, out[lo : lo + batch])
    return out


def _target_states(target, seqs: list[Sequence]) -> None:
    device = next(target.parameters()).device
    ids, pos = _pad([s.ids for s in seqs], device)
    res = target.decode(ids, positions=pos)
    for b, s in enumerate(seqs):
        n = len(s.ids)
        s.hidden = res.hidden[b, :n].float().cpu()
        s.kv = {t: (k[b, :, :n].float().cpu(), v[b, :, :n].float().cpu()) for t, (k, v, _) in res.shared_kv.items()}


def _pad(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    pos = torch.full((len(rows), T), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r)
        pos[b, : len(r)] = torch.arange(len(r))
    return ids.to(device), pos.to(device)


# ------------------------------------------------------------------------------------------------
# The loss: k chained steps from each chosen position


@dataclass
class _Batch:
    ids: torch.Tensor  # [B, T] (0 at padding)
    p: torch.Tensor  # [B, Q] query positions (-1: padding query)
    h: torch.Tensor  # [B, Q, D] target hidden at p-1
    kv: dict[str, KV]


def _batch(seqs: list[Sequence], queries: int, rng: random.Random, device) -> _Batch:
    """Queries p with p+1 in the continuation (p >= start - 1), p >= 1; at most `queries` per row."""
    chosen = []
    for s in seqs:
        ps = list(range(max(s.start - 1, 1), len(s.ids) - 1))
        chosen.append(sorted(rng.sample(ps, queries)) if 0 < queries < len(ps) else ps)
    B, Q, T = len(seqs), max(1, max(len(c) for c in chosen)), max(len(s.ids) for s in seqs)
    ids, pos = _pad([s.ids for s in seqs], "cpu")
    p = torch.full((B, Q), -1, dtype=torch.long)
    h = torch.zeros(B, Q, seqs[0].hidden.shape[-1])
    kv = {}
    for t in seqs[0].kv:
        k0 = seqs[0].kv[t][0]
        K = torch.zeros(B, k0.shape[0], T, k0.shape[2])
        V = torch.zeros_like(K)
        for b, s in enumerate(seqs):
            K[b, :, : len(s.ids)], V[b, :, : len(s.ids)] = s.kv[t]
        kv[t] = (K.to(device), V.to(device), pos.to(device))
    for b, (s, c) in enumerate(zip(seqs, chosen)):
        if c:
            p[b, : len(c)] = torch.tensor(c)
            h[b, : len(c)] = s.hidden[torch.tensor(c) - 1]
    return _Batch(ids.to(device), p.to(device), h.to(device), kv)


def _chain(drafter: Drafter, embed, batch: _Batch, k: int):
    """Yield (z [B, Q, d], labels [B, Q] with -1 where no label) for steps 1..k, chaining h."""
    T = batch.ids.shape[1]
    valid = batch.p >= 0
    p = batch.p.clamp(min=0)
    x, h = embed(batch.ids.gather(1, p)), batch.h
    for j in range(1, k + 1):
        at = (p + j).clamp(max=T - 1)
        labels = batch.ids.gather(1, at)
        ok = valid & (p + j < T) & (batch.kv[SLIDING][2].gather(1, at) >= 0)  # a real token at p+j
        z, h = drafter.run(x, h, batch.kv, batch.p)
        yield z, labels.masked_fill(~ok, -1)
        x = embed(labels)


def drafter_loss(drafter: Drafter, embed, batch: _Batch, k: int, negatives: int = 0,
                 generator: torch.Generator | None = None, chunk: int = 256) -> tuple[torch.Tensor, int]:
    """Summed CE over the k steps' labelled queries (and the sparse head's cluster CE), and their count.

    `negatives` > 0: a sampled softmax, over the batch's labels plus that many random tokens (the
    same set for every query), instead of the whole vocabulary: on gemma-3-270m the full head is
    ~260 GFLOP a step (768 queries x 262144 x 640, forward and backward), which a CPU cannot afford."""
    table = drafter.model.embed_tokens.weight
    total, count = None, 0
    head = drafter.masked_embedding
    V = table.shape[0]
    for z, labels in _chain(drafter, embed, batch, k):
        keep = labels >= 0
        zs, ts = z[keep], labels[keep]
        if 0 < negatives < V:
            sample = torch.randint(0, V, (negatives,), generator=generator).to(ts.device)
            cand, inverse = torch.unique(torch.cat([ts, sample]), return_inverse=True)
            rows = table[cand]
            loss = chunked_cross_entropy(lambda x: F.linear(x, rows), zs, inverse[: ts.numel()], chunk)
        else:
            loss = chunked_cross_entropy(lambda x: F.linear(x, table), zs, ts, chunk)
        if head is not None:  # which cluster holds the label: the sparse head opens the top clusters
            cluster = torch.empty_like(head.token_ordering)
            cluster[head.token_ordering] = torch.arange(cluster.numel(), device=cluster.device) // (
                cluster.numel() // head.num_centroids)
            loss = loss + F.cross_entropy(head.centroids(zs).float(), cluster[ts], reduction="sum")
        total = loss if total is None else total + loss
        count += int(keep.sum())
    return total, count


# ------------------------------------------------------------------------------------------------
# Acceptance: greedy speculative decoding replayed on the target's own greedy sequences


@torch.no_grad()
def acceptance(drafter: Drafter, target, seqs: list[Sequence], k: int, batch: int = 8) -> dict:
    """Rounds as the engine runs them: at p (t_p just produced, h = target hidden at p-1) k drafts;
    m = how many match the target's greedy tokens; the target adds one; the next round is at p+m+1.
    Returns drafted, accepted, rate = accepted/drafted, and tokens per target forward."""
    device = next(drafter.parameters()).device
    drafted = accepted = rounds = produced = 0
    embed = _embedder(target)
    for lo in range(0, len(seqs), batch):
        group = seqs[lo : lo + batch]
        b = _batch(group, 0, random.Random(0), device)
        guesses = []
        x, h = embed(b.ids.gather(1, b.p.clamp(min=0))), b.h
        for _ in range(k):
            z, h = drafter.run(x, h, b.kv, b.p)
            tok = drafter.logits(z).argmax(-1)
            guesses.append(tok)
            x = embed(tok)
        guesses = torch.stack(guesses, -1).cpu()  # [B, Q, k]
        for row, s in enumerate(group):
            qs = b.p[row].tolist()
            where = {p: i for i, p in enumerate(qs) if p >= 0}
            p = s.start  # the first round: the target has just produced the token at `start`
            while p < len(s.ids) - 1:
                n = min(k, len(s.ids) - 1 - p)
                want = s.ids[p + 1 : p + 1 + n]
                got = guesses[row, where[p], :n].tolist()
                m = next((i for i in range(n) if got[i] != want[i]), n)
                drafted, accepted, rounds = drafted + n, accepted + m, rounds + 1
                produced += min(m + 1, len(s.ids) - 1 - p)
                p += m + 1
    return {"drafted": drafted, "accepted": accepted, "rate": accepted / max(drafted, 1),
            "tokens_per_round": produced / max(rounds, 1), "rounds": rounds, "k": k}


# ------------------------------------------------------------------------------------------------


def train_drafter(target, tokenizer, chat_format, data: str | Path, out: str | Path, *,
                  init: str | Path | Drafter | None = None, val: str | Path | None = None,
                  config: DrafterTrainConfig | None = None) -> DrafterTrainResult:
    """Train (or with `init`, re-align) a drafter for `target` on `data`'s prompts; save it to `out`
    in the released layout (`load_drafter` / `--draft-model` read it)."""
    config = config or DrafterTrainConfig()
    out = check_target(out)
    say = log.info
    t0 = time.perf_counter()
    device = next(target.parameters()).device
    target.eval().requires_grad_(False)
    if isinstance(init, Drafter):
        check_fits(init.config, target.config)
        drafter = init.float()
    elif init is not None:
        drafter = load_drafter(init, target.config, dtype=torch.float32, device=device)
    else:
        drafter = new_drafter(target, config)
    train_embed = config.train_embeddings or (init is None and drafter.config.text.hidden_size !=
                                              target.config.hidden_size)
    drafter.model.embed_tokens.weight.requires_grad_(train_embed)

    prompts = read_prompts(data, tokenizer, chat_format, config.max_length)
    say(f"distilling: {len(prompts)} prompts, up to {config.max_new_tokens} greedy tokens each")
    seqs = distill(target, prompts, config.max_new_tokens)
    held = distill(target, read_prompts(val, tokenizer, chat_format, config.max_length),
                   config.max_new_tokens) if val else []
    say(f"target outputs ready in {time.perf_counter() - t0:.0f} s ({sum(len(s.ids) - s.start for s in seqs)} "
        "tokens); training the drafter")
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    rng = random.Random(config.seed)
    steps = config.steps or max(1, math.ceil(config.epochs * len(seqs) / config.batch_size))
    result = DrafterTrainResult(out, steps)
    embed = _embedder(target)
    gen = torch.Generator().manual_seed(config.seed)
    drafter.train()
    order: list[int] = []
    bar = _progress(config, steps)
    for step in range(steps):
        lr = config.lr * min(1.0, (step + 1) / max(config.warmup_steps, 1))
        if step >= config.warmup_steps:
            lr = config.lr * 0.5 * (1 + math.cos(math.pi * (step - config.warmup_steps)
                                                 / max(steps - config.warmup_steps, 1)))
        for g in opt.param_groups:
            g["lr"] = lr
        if len(order) < config.batch_size:
            more = list(range(len(seqs)))
            rng.shuffle(more)
            order += more
        picked, order = order[: config.batch_size], order[config.batch_size :]
        b = _batch([seqs[i] for i in picked], config.queries, rng, device)
        loss, n = drafter_loss(drafter, embed, b, config.draft_steps, config.negatives, gen)
        opt.zero_grad(set_to_none=True)
        (loss / max(n, 1)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        result.losses.append(loss.item() / max(n, 1))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
        elif step % 10 == 0 or step == steps - 1:
            say(f"step {step + 1}/{steps}: loss {result.losses[-1]:.4f}")
    if bar is not None:
        bar.close()
    drafter.eval()
    result.seconds = time.perf_counter() - t0
    if held:
        result.acceptance = acceptance(drafter, target, held, config.draft_steps)
        say(f"held-out greedy acceptance: {result.acceptance}")
    save_drafter(out, drafter, num_assistant_tokens=config.draft_steps)
    # The tokens of its training prompts and answers (and an INIT drafter's): what the CPU fast path scores.
    seen = [i for s in seqs for i in s.ids]
    if isinstance(init, (str, Path)):
        seen += read_vocabulary(init, target.config.vocab_size) or []
    save_vocabulary(out, seen)
    (out / "train_log.json").write_text(json.dumps({"losses": result.losses, "seconds": result.seconds,
                                                    "acceptance": result.acceptance}) + "\n")
    return result


def _embedder(target):
    """ids -> the target's scaled embeddings in float32 (the drafter trains in float32)."""
    return lambda ids: target.model.embed(ids).float()


def _progress(config: DrafterTrainConfig, steps: int):
    if not config.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=steps, desc="drafter", unit="step")
