"""Loader throughput: the Rust loader vs the PyTorch DataLoader + PIL baseline vs the latent cache.

Generates a Pick-a-Pic-format parquet of 512 px JPEG pairs (--image-px), then measures pairs/s of
  1. the Rust loader (ncp_dataloader.PairLoader via RustPairSource), all cores and one thread;
  2. the PyTorch baseline (ncp.data.torch_source: torch DataLoader + PIL), best num_workers of 0, 1, 2;
  3. the latent cache (CachedPairSource), built once with an SD1.5-shaped VAE (latents 4x64x64)
     and text encoder (77x768) of random weights;
and the share of one core that a concurrent pure-Python thread keeps while the Rust
loader runs (the GIL is released while it decodes and waits).

Prints a table and writes benchmarks/results/loader.json.

    python benchmarks/loader.py [--pairs 256] [--resolution 512] [--image-px 512] [--batch-size 8] [--seconds 20]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def picture(size: int, rng: np.random.Generator) -> bytes:
    """A photo-like JPEG: smooth colour fields, texture and edges (q=90, 4:2:0); ~110 KB at 512 px."""
    small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC), dtype=np.int16)
    img = img + rng.normal(0, 12, img.shape).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_parquet(path: Path, pairs: int, size: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rows = {k: [] for k in ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "image_0_uid", "image_1_uid")}
    for i in range(pairs):
        rows["caption"].append(f"a photo of thing {i % 97} in style {i % 13}")
        rows["jpg_0"].append(picture(size, rng))
        rows["jpg_1"].append(picture(size, rng))
        rows["label_0"].append(float(i % 2))
        rows["label_1"].append(1.0 - float(i % 2))
        rows["image_0_uid"].append(f"{i}a")
        rows["image_1_uid"].append(f"{i}b")
    table = pa.table({k: (pa.array(v, pa.binary()) if k.startswith("jpg") else pa.array(v)) for k, v in rows.items()})
    pq.write_table(table, path, row_group_size=32)
    return path


def timed_pairs(src, seconds: float, warmup_batches: int = 1) -> float:
    """Pairs/s of a source (set_epoch / iter) over whole epochs until `seconds` have passed (after a warm-up)."""
    epoch = 0
    src.set_epoch(epoch)
    it = iter(src)
    for _ in range(warmup_batches):
        next(it, None)
    n, start = 0, time.perf_counter()
    while True:
        for b in it:
            n += len(b)
        if time.perf_counter() - start >= seconds:
            break
        epoch += 1
        src.set_epoch(epoch)
        it = iter(src)
    return n / (time.perf_counter() - start)


def rust_source(path: Path, args, threads: int, **kw):
    from ncp.data.rust import RustPairSource

    return RustPairSource([str(path)], args.resolution, batch_size=args.batch_size, random_flip=True,
                          num_threads=threads, seed=0, **kw)


def bench_rust(path: Path, args, threads: int, seconds: float, **kw) -> float:
    return timed_pairs(rust_source(path, args, threads, **kw), seconds)


def bench_rust_build(path: Path, args, build: str, seconds: float) -> float:
    """The Rust loader of another build (e.g. an earlier commit's): `build` is `PKG[:PY]`, a folder holding
    that build's `ncp_dataloader` package and optionally that commit's `python/` folder, both put first on
    sys.path of a subprocess; all threads, default arguments."""
    code = ("import sys; sys.path[:0] = sys.argv[1].split(':'); from pathlib import Path; from ncp.data.rust import "
            "RustPairSource; sys.path.insert(0, sys.argv[5]); import loader; "
            "src = RustPairSource([sys.argv[2]], int(sys.argv[3]), batch_size=int(sys.argv[4]), random_flip=True, "
            "num_threads=0, seed=0); print(loader.timed_pairs(src, float(sys.argv[6])))")
    out = subprocess.run([sys.executable, "-c", code, build, str(path), str(args.resolution), str(args.batch_size),
                          str(ROOT / "benchmarks"), str(seconds)], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def bench_torch(path: Path, args, workers: int, seconds: float) -> float:
    from ncp.data.torch_source import ItemDataset, TorchPairSource

    ds = ItemDataset([str(path)], args.resolution, random_flip=True)
    return timed_pairs(TorchPairSource(ds, args.batch_size, num_workers=workers), seconds)


class InMemoryPIL(torch.utils.data.Dataset):
    """The floor of any PIL loader: encoded bytes already in memory, decode + resize + crop + flip per pair."""

    def __init__(self, path: Path, resolution: int):
        t = pq.read_table(path, columns=["jpg_0", "jpg_1"])
        self.pairs = list(zip(t.column("jpg_0").to_pylist(), t.column("jpg_1").to_pylist()))
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        from ncp.data.torch_source import crop_box, decode_rgb, resize_crop

        flip = bool(np.random.default_rng([0, i]).random() < 0.5)
        out = []
        for data in self.pairs[i]:
            img = decode_rgb(data)
            new_w, new_h, top, left = crop_box(img.size, self.resolution, None)
            out.append(torch.from_numpy(resize_crop(img, new_w, new_h, top, left, self.resolution, flip)))
        return out


class _Epochs:
    """set_epoch/iter over a DataLoader (shuffled per epoch by its sampler)."""

    def __init__(self, loader):
        self.loader = loader

    def set_epoch(self, epoch: int) -> None:
        torch.manual_seed(epoch)

    def __iter__(self):
        for w, _ in self.loader:
            yield w


def bench_pil_in_memory(path: Path, args, workers: int, seconds: float) -> float:
    ds = InMemoryPIL(path, args.resolution)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=workers,
                                         drop_last=True)
    return timed_pairs(_Epochs(loader), seconds)


def build_sd15_shaped_encoders(folder: Path) -> Path:
    """VAE (factor 8, 4 latent channels) and CLIP text encoder (77 x 768) of random weights, few channels."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures import write_char_tokenizer

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(4, 4, 4, 4), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=4, norm_num_groups=2, sample_size=512)
    vae.save_pretrained(folder / "vae")
    write_char_tokenizer(folder / "tokenizer")
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer", model_max_length=77)
    tok.save_pretrained(folder / "tokenizer")
    cfg = CLIPTextConfig(hidden_size=768, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
                         vocab_size=514, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
                         pad_token_id=513)
    CLIPTextModel(cfg).save_pretrained(folder / "text_encoder")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def make_cache(path: Path, args, work: Path) -> tuple[Path, float, list[int]]:
    from ncp.data.cache import build_cache, read_index

    model = build_sd15_shaped_encoders(work / "model")
    start = time.perf_counter()
    out = build_cache(str(model), [str(path)], work / "cache", args.resolution, flip=True, dtype="float32",
                      batch_size=args.batch_size)
    return out, time.perf_counter() - start, read_index(out)["latent_shape"]


def bench_cache(cache_dir: Path, args, seconds: float) -> float:
    from ncp.data.cache import CachedPairSource

    src = CachedPairSource(cache_dir, args.batch_size, random_flip=True, empty_prompt_prob=0.2)
    return timed_pairs(src, seconds)


def spin_rate(seconds: float, busy=None, pin: int | None = None) -> float:
    """Increments per second of a pure-Python loop, alone or while `busy()` runs in the main thread."""
    count, stop = [0], threading.Event()

    def spin():
        if pin is not None:
            os.sched_setaffinity(0, {pin})
        c = 0
        while not stop.is_set():
            c += 1
        count[0] = c

    t = threading.Thread(target=spin)
    start = time.perf_counter()
    t.start()
    if busy is None:
        time.sleep(seconds)
    else:
        busy()
    stop.set()
    t.join()
    return count[0] / (time.perf_counter() - start)


def bench_gil(path: Path, args, seconds: float) -> dict:
    """The share of one core that a pure-Python thread keeps while a 1-thread Rust loader runs.

    The spinner is pinned to one core, the main thread and the loader's thread to the other. On a
    shared machine other jobs crowd onto the spinner's core when the loader's core is busy, so the
    same is measured with a separate process burning the loader's core (the control, no GIL
    involved); share / control isolates the GIL (held: near 0; released: near 1).
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return {"skipped": "needs 2 cores"}
    os.sched_setaffinity(0, {cpus[0]})  # this thread; the loader's pool, created now, inherits it
    try:
        src = rust_source(path, args, 1)
        n = [0]

        def run():
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                for b in src:
                    n[0] += len(b)
                    if time.perf_counter() >= end:
                        break

        def burn():  # the control: core 0 busy in another process, no GIL shared
            code = (f"import os, time; os.sched_setaffinity(0, {{{cpus[0]}}}); end = time.time() + {seconds}\n"
                    "while time.time() < end: pass")
            subprocess.run([sys.executable, "-c", code], check=True)

        before = spin_rate(seconds / 2, pin=cpus[1])
        start = time.perf_counter()
        shared = spin_rate(0, busy=run, pin=cpus[1])
        rate = n[0] / (time.perf_counter() - start)
        control = spin_rate(0, busy=burn, pin=cpus[1])
        after = spin_rate(seconds / 2, pin=cpus[1])
    finally:
        os.sched_setaffinity(0, set(cpus))
    alone = (before + after) / 2
    return {"core_share": shared / alone, "core_share_control": control / alone,
            "share_vs_control": shared / control, "loader_pairs_per_s_meanwhile": rate}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--image-px", type=int, default=512,
                   help="side of the generated JPEGs (1024: sources resized to --resolution, an additional scenario)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seconds", type=float, default=24.0, help="measuring time per configuration (all turns)")
    p.add_argument("--rounds", type=int, default=3, help="turns per configuration (the best is kept)")
    p.add_argument("--skip-cache", action="store_true")
    p.add_argument("--skip-pil", action="store_true", help="skip the PIL-with-bytes-in-memory rows")
    p.add_argument("--skip-gil", action="store_true", help="skip the GIL measurement")
    p.add_argument("--rust-build", action="append", default=[], metavar="NAME=PKG[:PY]",
                   help="also measure another build of the Rust loader (see bench_rust_build), as row 'NAME'")
    p.add_argument("--gil-only", action="store_true", help="only the GIL measurement (updates that entry of the JSON)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "loader.json"))
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path = make_parquet(work / "pairs.parquet", args.pairs, args.image_px)
        results: dict = {"pairs_in_file": args.pairs, "image_px": args.image_px, "resolution": args.resolution,
                         "batch_size": args.batch_size, "parquet_mb": round(path.stat().st_size / 2**20, 1)}
        cores = os.cpu_count() or 1
        if args.gil_only:  # re-measure only this, into the existing JSON
            gil = bench_gil(path, args, args.seconds / 2)
            print(json.dumps(gil))
            out = Path(args.out)
            old = json.loads(out.read_text()) if out.is_file() else {}
            old["python_thread_core_share"] = {**gil, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                                               "command": "python benchmarks/loader.py " + " ".join(sys.argv[1:])}
            out.write_text(json.dumps(old, indent=1))
            return
        # Configurations are measured in turns, `rounds` times each, and the best turn is kept: the
        # machine is shared, and interleaving spreads other jobs' load evenly over the configurations.
        configs = {
            f"Rust loader, {cores} threads": lambda sec: bench_rust(path, args, 0, sec),
            "Rust loader, 1 thread": lambda sec: bench_rust(path, args, 1, sec),
            # the row-group cache off: every batch reads its row groups again (selected rows only)
            f"Rust loader, {cores} threads, row-group cache off": lambda sec: bench_rust(
                path, args, 0, sec, row_group_cache_mb=0),
        }
        for w in (0, 1, 2):
            configs[f"PyTorch DataLoader + PIL, num_workers={w}"] = lambda sec, w=w: bench_torch(path, args, w, sec)
        for spec in args.rust_build:
            name, build = spec.split("=", 1)
            configs[name] = lambda sec, build=build: bench_rust_build(path, args, build, sec)
        if not args.skip_pil:
            for w in (0, 1, 2):
                configs[f"PIL, bytes in memory, num_workers={w}"] = lambda sec, w=w: bench_pil_in_memory(
                    path, args, w, sec)
        if not args.skip_cache:
            cache_dir, build_s, shape = make_cache(path, args, work)
            results["cache"] = {"build_seconds": build_s, "latent_shape": shape, "embeds": [77, 768],
                                "dtype": "float32", "flips": 2}
            configs["latent cache (CachedPairSource)"] = lambda sec: bench_cache(cache_dir, args, sec)
        turns: dict[str, list[float]] = {name: [] for name in configs}
        for r in range(args.rounds):
            for name, fn in configs.items():
                turns[name].append(fn(args.seconds / args.rounds))
                print(f"round {r}: {name:<44} {turns[name][-1]:>8.1f} pairs/s", flush=True)
        best = {name: max(v) for name, v in turns.items()}
        results["turns"] = turns
        results["rust_all_cores"] = best[f"Rust loader, {cores} threads"]
        results["rust_1_thread"] = best["Rust loader, 1 thread"]
        torch_rates = {w: best[f"PyTorch DataLoader + PIL, num_workers={w}"] for w in (0, 1, 2)}
        pil_rates = {w: best[f"PIL, bytes in memory, num_workers={w}"] for w in (0, 1, 2) if not args.skip_pil}
        results["torch_by_workers"] = torch_rates
        results["pil_in_memory_by_workers"] = pil_rates
        top = max(torch_rates, key=torch_rates.get)
        results["torch_best"] = {"num_workers": top, "pairs_per_s": torch_rates[top]}
        rows = list(best.items())
        if not args.skip_cache:
            results["cache"]["pairs_per_s"] = best["latent cache (CachedPairSource)"]
        gil = {} if args.skip_gil else bench_gil(path, args, args.seconds / 2)
        if gil:
            results["python_thread_core_share"] = gil
    base = results["torch_best"]["pairs_per_s"]
    results["speedup_rust_vs_baseline"] = results["rust_all_cores"] / base
    if results["pil_in_memory_by_workers"]:
        results["speedup_rust_vs_pil_in_memory"] = results["rust_all_cores"] / max(
            results["pil_in_memory_by_workers"].values())
    if "cache" in results:
        results["speedup_cache_vs_baseline"] = results["cache"]["pairs_per_s"] / base
    results["machine"] = {"cpus": cores, "processor": platform.processor() or platform.machine(),
                          "python": platform.python_version(), "torch": torch.__version__,
                          "load_avg_at_start": load_at_start, "load_avg_at_end": os.getloadavg()}
    results["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    results["command"] = "python benchmarks/loader.py " + " ".join(sys.argv[1:])
    print(f"\n{'configuration':<44} {'pairs/s':>10} {'vs baseline':>12}")
    for name, r in rows:
        print(f"{name:<44} {r:>10.1f} {r / base:>11.2f}x")
    if "core_share" in gil:
        print(f"a pure-Python thread keeps {gil['core_share']:.0%} of its core while a 1-thread Rust loader runs "
              f"on the other ({gil['loader_pairs_per_s_meanwhile']:.1f} pairs/s meanwhile); "
              f"{gil['core_share_control']:.0%} while a separate process burns that core (control, no GIL): "
              f"{gil['share_vs_control']:.0%} of the control")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
