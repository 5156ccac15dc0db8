"""One gloo rank of tests/test_sources.py's two-rank check: ``python tests/two_rank_draw.py PORT RANK``.
Each rank draws the sources of 200 steps; rank 0 compares them with every rank's and prints "same"."""
import os
import sys

import torch.distributed as dist

from distill.config import Schedule, source_weights
from distill.sources.mixture import draw_source

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo", rank=int(sys.argv[2]), world_size=2)
weights = source_weights(dataset=Schedule(0.5), student=Schedule(0.0, 1.0, "linear"), skd=Schedule(0.3))
mine = [draw_source(weights, 11, step, 200) for step in range(200)]
everyone = [None, None]
dist.all_gather_object(everyone, mine)
if dist.get_rank() == 0:
    print("same" if everyone[0] == everyone[1] and len(set(mine)) == 3 else f"differ: {everyone}")
dist.destroy_process_group()
