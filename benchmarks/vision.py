"""Image encode time and peak memory of the Gemma 4 vision towers, random weights, real shapes.

    python benchmarks/vision.py                          # E2B/E4B and 26B/31B towers, 280 and 1120 tokens
    python benchmarks/vision.py --towers gemma-4-e2b --budgets 70 280 --threads 2

One random 1024x768 image is processed as the model's processor does (sides multiples of 48 within
the budget), then encoded by the tower and projected into the text width (what prefill runs once
per image). Each (tower, budget) runs in a child process, so its peak RSS over the loaded tower is
the encode's own activation memory. Times are the best of --repeat.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from child import measure_in_child  # noqa: E402


def _measure(tower: str, budget: int, repeat: int, threads: int | None) -> dict:
    import torch

    from gemma4.config import TextConfig, VisionConfig
    from gemma4.media import gemma4_image_inputs
    from gemma4.model.vision import MultimodalEmbedder, VisionTower
    from gemma4.variants import multimodal_hf_config

    if threads:
        torch.set_num_threads(threads)
    raw = multimodal_hf_config(tower)
    text = TextConfig.from_hf_dict(raw["text_config"])
    vision = VisionConfig.from_hf_dict(raw, text)
    modules = torch.nn.Sequential(VisionTower(vision), MultimodalEmbedder(vision.hidden_size, text.hidden_size,
                                                                          vision.rms_norm_eps)).eval()
    image = torch.randint(0, 256, (3, 768, 1024), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    inputs = gemma4_image_inputs([image], budget)
    pixels, pos = inputs["pixel_values"][0], inputs["image_position_ids"][0]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    with torch.inference_mode():
        for _ in range(repeat):
            start = time.perf_counter()
            soft = modules[1](modules[0](pixels[None], pos[None]))
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params = sum(p.numel() for p in modules.parameters())
    return {"tower": tower, "budget": budget, "soft_tokens": int(soft.reshape(-1, soft.shape[-1]).shape[0]),
            "patches": int((pos[:, 0] >= 0).sum()), "params_m": params / 1e6, "best_s": min(times),
            "weights_mib": params * 4 / 2**20, "activation_peak_mib": (peak - before) / 1024}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--towers", nargs="+", default=["gemma-4-e2b", "gemma-4-26b-a4b"])
    p.add_argument("--budgets", nargs="+", type=int, default=[280, 1120])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_measure(args.child[0], int(args.child[1]), args.repeat, args.threads)))
        return 0
    print("| tower | budget | soft tokens | patches | params (M) | encode, best (s) | activation peak (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for tower in args.towers:
        for budget in args.budgets:
            r = measure_in_child(__file__, [tower, budget], args.repeat, args.threads)
            print(f"| {r['tower']} | {r['budget']} | {r['soft_tokens']} | {r['patches']} | {r['params_m']:.0f} | "
                  f"{r['best_s']:.3f} | {r['activation_peak_mib']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
