import pytest

from expertmesh.config import ConfigError
from expertmesh.dist.env import detect


def test_torchrun_slurm_and_single_process_are_read_the_same_way():
    assert detect({}).launcher == "single" and detect({}).world_size == 1
    t = detect({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (t.rank, t.local_rank, t.world_size, t.local_world_size, t.launcher) == (3, 1, 8, 2, "torchrun")
    s = detect({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NNODES": "2",
                "SLURM_NTASKS_PER_NODE": "4", "MASTER_ADDR": "node0"})
    assert (s.rank, s.local_rank, s.world_size, s.local_world_size, s.launcher) == (5, 1, 8, 4, "slurm")
    # Inside a Slurm allocation torchrun's variables win: torchrun per node is the other Slurm layout.
    both = detect({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert both.launcher == "torchrun" and both.world_size == 2


@pytest.mark.parametrize("environ, message", [
    ({"RANK": "4", "WORLD_SIZE": "4"}, "RANK=4 is outside WORLD_SIZE=4"),
    ({"RANK": "x", "WORLD_SIZE": "4"}, "RANK='x' is not an integer"),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"}, "are inconsistent"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "6", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4",
      "MASTER_ADDR": "n0"}, "SLURM_NTASKS=6 != SLURM_NNODES(2) * SLURM_NTASKS_PER_NODE(4)"),
])
def test_inconsistent_environments_are_refused_with_the_numbers(environ, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        detect(environ)
