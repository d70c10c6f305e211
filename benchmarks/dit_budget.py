"""Issue 25, part 4: FLOPs and memory of one pair's training micro-step for SD3.5-large and Flux.1-dev at
1024 px, LoRA rank 64, counted on meta tensors by ``ncp.flops.dit_step_budget`` (no weights, no GPU), for
the latent (flow) objectives and their NCP forms. Prints a table and writes JSON.

    python benchmarks/dit_budget.py --out benchmarks/results/dit_budget.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="sd3.5-large,flux.1-dev")
    ap.add_argument("--objectives", default="dpo,ncp-dpo")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--out", default=str(HERE / "results" / "dit_budget.json"))
    a = ap.parse_args()
    from ncp.flops import dit_step_budget

    rows = [dit_step_budget(m, a.resolution, o, lora_rank=a.rank) for m in a.models.split(",")
            for o in a.objectives.split(",")]
    print("| model | objective | params (LoRA) | TFLOP a pair | saved for backward, GB: all / checkpointed "
          "| peak estimate, checkpointed, GB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        taps = f" (taps {r['taps']})" if r['objective'].startswith('ncp-') else ''
        print(f"| {r['model']} | {r['objective']}{taps} | {r['params_frozen'] / 1e9:.2f} B "
              f"({r['params_lora'] / 1e6:.0f} M) | {r['flops_per_pair'] / 1e12:.0f} | {r['saved_bytes'] / 1e9:.0f} / "
              f"{r['saved_bytes_checkpointed'] / 1e9:.1f} | {r['peak_bytes_checkpointed'] / 1e9:.1f} |")
    out = {"benchmark": "dit_budget", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(sys.argv), "rows": rows}
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
