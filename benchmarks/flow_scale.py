"""Which betas give NCP's flow-space logits the latent objectives' size on a flow world? (issue 25, part 6)

On the SD1.5 world ``error_scale=coef`` logits are ~7x smaller than latent DPO's (NCP-DPO ``coef`` takes
beta 700 against DPO's 5000; NCP-KTO 130 against KTO's 1000: RESULTS.md, issue 26). The DiT's encoder (its
first blocks) and its step (Euler, coefficient ``sigma_i - sigma_{i+1}``) differ, so the ratio is measured
again, the way ``benchmarks/objective_scale.py`` measures it for the U-Net: for a fixed batch of the world's
pairs, each sigma index of a grid (one index for the batch, the same noise for every index) and a trained
LoRA, the median over pairs of

    d_latent = (ERR_theta(w) - ERR_ref(w)) - (ERR_theta(l) - ERR_ref(l))    # Flow-DPO's logit / (-beta)
    d_ncp    = the same with the perceptual errors, error_scale=coef        # NCP-Flow-DPO's
    r_latent = ERR_ref - ERR_theta per image                                # KTO's reward / beta_kto
    r_ncp    = the same, perceptual, coef

and the NCP betas that match the latent defaults: ``default x median over sigma of |latent| / |ncp|``.

    python benchmarks/flow_scale.py --world /work/flowworld --lora runs/flow/dpo-s0/step-000300

Writes benchmarks/results/flow_scale.json.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))

INDEX_GRID = (10, 100, 250, 500, 750, 900, 990)
DEFAULTS = {"beta": 5000.0, "beta_kto": 1000.0}  # the latent objectives' scales ncp runs on every world


def world_pairs(world: Path, n: int, resolution: int) -> tuple[list[str], torch.Tensor]:
    """The first ``n`` untied pairs of the world's data: captions and uint8 images (2n, 3, H, W), winners
    first."""
    import pyarrow.parquet as pq
    from PIL import Image

    table = pq.read_table(sorted((world / "data").glob("*.parquet"))[0],
                          columns=["caption", "jpg_0", "jpg_1", "label_0"]).to_pylist()
    rows = [r for r in table if r["label_0"] in (0, 1)][:n]
    if len(rows) < n:
        raise ValueError(f"{world / 'data'}: {len(rows)} untied pairs, {n} asked for (--pairs)")

    def img(b: bytes) -> np.ndarray:
        im = Image.open(io.BytesIO(b)).convert("RGB").resize((resolution, resolution))
        return np.asarray(im).transpose(2, 0, 1)

    win = [img(r["jpg_0"] if r["label_0"] == 1 else r["jpg_1"]) for r in rows]
    lose = [img(r["jpg_1"] if r["label_0"] == 1 else r["jpg_0"]) for r in rows]
    return [r["caption"] for r in rows], torch.from_numpy(np.stack(win + lose))


@torch.no_grad()
def measure(world: Path, lora: Path, pairs: int, grid: tuple[int, ...], seed: int) -> dict:
    from ncp.criterion import Criterion
    from ncp.families import pipeline_family
    from ncp.sampling import load_pipeline
    from ncp.step import StepNoise, branch_errors, scale_errors
    from ncp.world.pretrain import to_unit

    pipe = load_pipeline(world / "model")
    pipe.load_lora_weights(str(lora))
    fam = pipeline_family(pipe)
    model, vae = pipe.transformer, pipe.vae
    res = pipe.default_sample_size * pipe.vae_scale_factor
    captions, imgs = world_pairs(world, pairs, res)
    x0 = (vae.encode(to_unit(imgs)).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    tokenizers = [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3]
    encoders = [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
    cond = fam.encode(tokenizers, encoders, captions, torch.device("cpu"), torch.float32)
    schedule = fam.training_schedule(pipe.scheduler, torch.device("cpu"))
    units = fam.tap_units(model)
    latent = Criterion.make("dpo", schedule, kind=fam.name, num_down_blocks=units)
    ncp = Criterion.make("ncp-dpo", schedule, kind=fam.name, num_down_blocks=units, taps=["auto"],
                         error_scale="coef")
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(x0[:pairs].shape, generator=g)
    rows = []
    for index in grid:
        noise = StepNoise(torch.full((pairs,), index, dtype=torch.long), eps, torch.zeros_like(eps))
        row = {"index": index, "sigma": float(schedule.sigmas[index])}
        for name, crit in (("latent", latent), ("ncp", ncp)):
            err, ref = branch_errors(crit, model, model, x0, cond, noise)
            weight = crit.image_weights(noise.t, err.shape[0])
            err, ref = (scale_errors(e, crit.error_scale, weight) for e in (err, ref))
            r = ref - err  # KTO's implicit reward per image
            d = (err[:pairs] - ref[:pairs]) - (err[pairs:] - ref[pairs:])
            row[f"d_{name}"] = float(d.abs().median())
            row[f"r_{name}"] = float(r.abs().median())
        rows.append(row)
        print(f"index {index:4d} sigma {row['sigma']:.3f}  |d| latent {row['d_latent']:.3e} ncp {row['d_ncp']:.3e}"
              f"  |r| latent {row['r_latent']:.3e} ncp {row['r_ncp']:.3e}", flush=True)
    ratio_d = float(np.median([r["d_latent"] / r["d_ncp"] for r in rows]))
    ratio_r = float(np.median([r["r_latent"] / r["r_ncp"] for r in rows]))
    return {"rows": rows, "ratio_dpo": ratio_d, "ratio_kto": ratio_r, "taps": [str(t) for t in ncp.taps],
            "suggested": {"ncp-dpo beta": DEFAULTS["beta"] * ratio_d,
                          "ncp-kto beta_kto": DEFAULTS["beta_kto"] * ratio_r}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", required=True, help="a flow world folder (python -m ncp.world build --family sd3)")
    p.add_argument("--lora", required=True, help="a trained LoRA or checkpoint folder of that world's model")
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "results" / "flow_scale.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = measure(Path(args.world), Path(args.lora), args.pairs, INDEX_GRID, args.seed)
    res |= {"command": "python benchmarks/flow_scale.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "torch": torch.__version__}}
    print(f"median |latent| / |ncp| over sigma: dpo {res['ratio_dpo']:.3g}, kto {res['ratio_kto']:.3g} -> "
          + ", ".join(f"{k} {v:.3g}" for k, v in res["suggested"].items()))
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
