"""Run under torchrun (2 CPU processes, gloo) by test_distributed.py: two optimizer steps through the real
trainer, then each rank dumps the pair indices it consumed and its LoRA weights."""
import sys

import torch

from ncp.config import load_config
from ncp.data.contract import endless
from ncp.trainer import optimizer_step, setup


def main(out_dir: str, *overrides: str) -> None:
    cfg = load_config(None, [o for o in overrides if not o.startswith("--")])
    tr = setup(cfg)
    seen = []
    source_iter = endless(tr.source)

    def recording():
        for batch in source_iter:
            seen.extend(batch.indices.tolist())
            yield batch

    data = recording()
    for _ in range(2):
        assert optimizer_step(tr, data) is not None
        tr.step += 1
    lora = {n: p.detach().clone() for n, p in tr.base.named_parameters() if "lora_" in n}
    torch.save({"indices": seen, "lora": lora}, f"{out_dir}/rank{tr.accelerator.process_index}.pt")
    tr.accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:])
