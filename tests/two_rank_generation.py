"""One gloo rank of tests/test_distributed.py's generation check: ``python tests/two_rank_generation.py
PORT RANK``. A ZeRO-3 teacher is gathered for a generation round in which the ranks run different
numbers of forwards (as ranks decoding responses of different lengths do, or a rank whose batch is
cached, none); after the round the ranks must still be in step, and the teacher sharded again with
its hooks back. Rank 0 prints "in step" when every check holds."""
import os
import sys

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK=sys.argv[2], WORLD_SIZE="2",
                  LOCAL_RANK=sys.argv[2], DS_ACCELERATOR="cpu")
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from distill.config import ASSETS, DistillConfig, ModelConfig, TeacherConfig  # noqa: E402
from distill.distributed import Engine  # noqa: E402
from distill.models import load_model  # noqa: E402

rank = int(sys.argv[2])
cfg = DistillConfig(teacher=TeacherConfig(path=str(ASSETS / "teacher")),
                    student=ModelConfig(path=str(ASSETS / "student")))
cfg.deepspeed.stage, cfg.trainer.batch_size = 3, 2
engine = Engine(cfg, torch.device("cpu"))
with engine.loading("teacher"):
    teacher = engine.wrap_teacher(load_model(cfg.teacher, "teacher", torch.device("cpu")))
reference = AutoModelForCausalLM.from_pretrained(ASSETS / "teacher").eval()
ids = torch.tensor([[2, 10, 11, 12, 13]])
with torch.no_grad():
    for forwards in ((0, 3), (1, 4), (2, 1)):  # per rank: none, one, several
        with engine.generation(teacher):
            assert teacher.get_output_embeddings().weight.shape[0] > 0, "not gathered"
            for _ in range(forwards[rank]):
                teacher(input_ids=ids)
        assert engine.all_gather(rank) == [0, 1], "out of step"
        # Sharded again, hooks back: a forward with every rank gathers layer by layer.
        assert teacher.get_output_embeddings().weight.numel() == 0, "still gathered"
        got = teacher(input_ids=ids).logits
        assert torch.allclose(got, reference(input_ids=ids).logits, atol=1e-5), "wrong logits after the round"
        assert engine.all_sum(1) == 2
if rank == 0:
    print("in step")
