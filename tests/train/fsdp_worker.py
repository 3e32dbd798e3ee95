"""`keel sft ARGV` as torchrun runs it, plus what sharding left on this process, for tests/test_fsdp.py.

    torchrun --standalone --nproc_per_node 2 tests/fsdp_worker.py SHARDS_DIR sft --fsdp fsdp2 ...

Writes SHARDS_DIR/rank{N}.json: {"shares": {parameter: [elements held here, elements in all]}, "units": the
modules that are FSDP units}, taken right after keel sft's setup.
"""

import json
import sys
from pathlib import Path

import keel.train.sft as sft
from keel.cli import main
from keel.train.distributed import shard_shares


def record_shards(folder: Path):
    setup = sft.setup

    def recorded(*configs):
        import torch.distributed as dist
        from torch.distributed.fsdp import FSDPModule

        run = setup(*configs)
        units = [name for name, m in run.model.named_modules() if isinstance(m, FSDPModule)]
        (folder / f"rank{dist.get_rank()}.json").write_text(json.dumps({"shares": shard_shares(run.model),
                                                                        "units": units}))
        return run

    sft.setup = recorded


if __name__ == "__main__":
    record_shards(Path(sys.argv[1]))
    main(sys.argv[2:])
