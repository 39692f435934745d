"""Where a generation's time goes, ours and diffusers': each stage timed with forward hooks (text encoder, each
transformer forward, VAE decoder) on bench_engine.py's mid model, one implementation per process, one untimed
generation first (then our prompt cache is emptied, so the text encoder runs in both); `--profile` adds
torch.profiler's op table for one CFG forward of our transformer. Then one CFG forward of ours and diffusers'
transformer on the same tensors, alternated in one process (the firm ratio: the stage times come from two
processes).

    .venv/bin/python bench/bench_stages.py                 # both implementations
    .venv/bin/python bench/bench_stages.py --profile       # and the op table of one forward

CPU and fp32 (bench_engine.py's settings). The figures are seconds on a shared machine: read them as shares.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def stages(impl: str, folder: Path) -> None:
    """One warm-up generation, then one timed: total, and the seconds of each hooked module's forwards."""
    from bench.bench_engine import _page_in, load_impl
    from host.lowvram.prompt_cache import shared_cache

    pipe, generate = load_impl(impl, folder)
    _page_in(pipe)
    seconds: dict[str, list[float]] = {}

    def timed(module, name: str) -> None:  # noqa: ANN001 - a torch module
        started: list[float] = []
        module.register_forward_pre_hook(lambda m, a: started.append(time.perf_counter()))
        module.register_forward_hook(lambda m, a, o: seconds.setdefault(name, []).append(time.perf_counter() - started.pop()))

    if getattr(pipe, "text_encoder", None) is not None:
        timed(pipe.text_encoder, "text encoder")
    timed(pipe.transformer, "transformer")
    timed(pipe.vae.decoder, "VAE decoder")
    generate()
    seconds.clear()
    shared_cache().clear()  # our prompt cache would skip the text encoder: time it, as for a new prompt
    start = time.perf_counter()
    generate().save(folder.parent / f"{impl}.png")
    total = time.perf_counter() - start
    parts = ", ".join(f"{name} {sum(s):.2f} s ({len(s)} x {sum(s) / len(s):.2f})" for name, s in seconds.items())
    print(f"{impl}: {total:.2f} s = {parts}; transformer {sum(seconds['transformer']) / total:.0%} of the total")


def cfg_forward(rounds: int = 6) -> None:
    """One CFG forward (one latent, two captions of the same padded length), ours and diffusers' transformer on
    the very same tensors (bench_transformer.py's pair, mid config), alternated in this process: medians."""
    import statistics

    import torch

    from bench.bench_transformer import CONFIGS, build_pair

    ours, ref = build_pair(CONFIGS["mid"], "cpu", torch.float32)
    x, t = torch.randn(1, 16, 64, 64).repeat(2, 1, 1, 1), torch.full((2,), 0.3)
    captions = [torch.randn(20, 1024), torch.randn(12, 1024)]
    calls = {"ours": lambda: ours(x, t, captions),
             "diffusers": lambda: torch.stack(ref(list(x.unsqueeze(2).unbind(0)), t, captions, return_dict=False)[0]).squeeze(2)}
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        a, b = calls["ours"](), calls["diffusers"]()
        for round_ in range(rounds):
            for name in list(calls) if round_ % 2 == 0 else list(calls)[::-1]:
                start = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"one CFG forward, alternated {rounds} rounds: ours {median['ours']:.3f} s, diffusers {median['diffusers']:.3f} s, "
          f"ours / diffusers {median['ours'] / median['diffusers']:.3f}; outputs differ by "
          f"{float((a - b).norm() / b.norm()):.1e} (relative L2)")


def profile(folder: Path) -> None:
    """torch.profiler's table of one CFG forward of our transformer (the mid config, 1024 image tokens)."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from bench.bench_engine import load_impl

    transformer = load_impl("ours", folder)[0].transformer
    x, t = torch.randn(1, 16, 64, 64).repeat(2, 1, 1, 1), torch.full((2,), 0.3)
    captions = [torch.randn(20, transformer.config.cap_feat_dim), torch.randn(12, transformer.config.cap_feat_dim)]
    with torch.no_grad():
        transformer(x, t, captions)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            transformer(x, t, captions)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help="also the op table of one transformer forward")
    args = parser.parse_args()
    if args.child:
        stages(args.child[0], Path(args.child[1]))
        return
    from bench.bench_engine import build

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "mid"
        build(folder)
        for impl in ("ours", "diffusers"):  # each in its own process, like bench_engine's memory runs
            subprocess.run([sys.executable, __file__, "--child", impl, str(folder)], check=True)
        cfg_forward()
        if args.profile:
            profile(folder)


if __name__ == "__main__":
    main()
