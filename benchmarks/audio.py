"""Audio encode time and peak memory of the Gemma 4 audio side, random weights, real shapes.

    python benchmarks/audio.py                               # E2B/E4B conformer and the 12B frames, 30 s clips
    python benchmarks/audio.py --models gemma-4-e2b --seconds 10 30 --threads 2
    python benchmarks/audio.py --tiny --repeat 1             # the tiny test shape: checks the script in seconds

One random clip (noise at speech level) of each length is turned into the model's inputs as the
processor does (log-mel features for the conformer, raw 640-sample frames for the 12B), then encoded
and projected into the text width: what prefill runs once per clip. Each (model, length) runs in a
child process, so its peak RSS over the loaded weights is the encode's own activation memory. Times
are the best of --repeat; the feature extraction is timed apart from the encode.
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


def _measure(name: str, seconds: float, repeat: int, threads: int | None) -> dict:
    import torch

    from gemma4.config import AudioConfig, TextConfig
    from gemma4.media import SAMPLING_RATE, gemma4_audio_inputs
    from gemma4.model.audio import AudioTower
    from gemma4.model.vision import MultimodalEmbedder
    from gemma4.variants import multimodal_hf_config

    if threads:
        torch.set_num_threads(threads)
    raw = multimodal_hf_config(name)
    text = TextConfig.from_hf_dict(raw["text_config"])
    audio = AudioConfig.from_hf_dict(raw, text)
    if audio is None:
        raise SystemExit(f"{name} takes no audio")
    tower = AudioTower(audio).eval() if audio.kind == "conformer" else None
    embedder = MultimodalEmbedder(audio.output_proj_dims, text.hidden_size, audio.rms_norm_eps).eval()
    clip = torch.randn(int(seconds * SAMPLING_RATE), generator=torch.Generator().manual_seed(0)) * 0.1
    unified = audio.kind == "unified"
    feature_times, times = [], []
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.inference_mode():
        for _ in range(repeat):
            start = time.perf_counter()
            inputs = gemma4_audio_inputs([clip], unified=unified)
            feature_times.append(time.perf_counter() - start)
            x, mask = inputs["input_features"], inputs["input_features_mask"]
            start = time.perf_counter()
            if tower is None:
                soft = embedder(x)[mask]
            else:
                hidden, valid = tower(x, mask)
                soft = embedder(hidden)[valid]
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params = sum(p.numel() for p in embedder.parameters()) + (
        sum(p.numel() for p in tower.parameters()) if tower is not None else 0)
    return {"model": name, "seconds": seconds, "soft_tokens": int(soft.shape[0]), "params_m": params / 1e6,
            "features_s": min(feature_times), "best_s": min(times), "weights_mib": params * 4 / 2**20,
            "activation_peak_mib": (peak - before) / 1024}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gemma-4-e2b", "gemma-4-12b"])
    p.add_argument("--seconds", nargs="+", type=float, default=[30.0])
    p.add_argument("--tiny", action="store_true", help="the tiny test shape (tiny-e2b) instead of --models")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_measure(args.child[0], float(args.child[1]), args.repeat, args.threads)))
        return 0
    models = ["tiny-e2b"] if args.tiny else args.models
    print("| model | clip (s) | soft tokens | params (M) | features (s) | encode, best (s) | activation peak (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for name in models:
        for seconds in args.seconds:
            r = measure_in_child(__file__, [name, seconds], args.repeat, args.threads)
            print(f"| {r['model']} | {r['seconds']:g} | {r['soft_tokens']} | {r['params_m']:.1f} | "
                  f"{r['features_s']:.3f} | {r['best_s']:.3f} | {r['activation_peak_mib']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
