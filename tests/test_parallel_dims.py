"""The parallel dimensions: computed once from the config and the world size, carried by the world, and
the one place a bad mesh shape is refused (one line naming the key, exit 2, nothing written)."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY
from sdd_train.config import ConfigError, ParallelConfig
from sdd_train.distributed.dims import ParallelDims
from sdd_train.distributed.world import World, init_world
from sdd_train.train.__main__ import main


@pytest.mark.parametrize("replicate,shard,world,want", [
    (1, -1, 1, (1, 1)), (1, -1, 4, (1, 4)), (2, -1, 4, (2, 2)), (2, 2, 4, (2, 2)), (1, 2, 2, (1, 2)), (4, 1, 4, (4, 1)),
])
def test_dims_from_config(replicate, shard, world, want):
    dims = ParallelDims.from_config(ParallelConfig(dp_replicate=replicate, dp_shard=shard), world)
    assert (dims.dp_replicate, dims.dp_shard, dims.world_size) == (*want, world)


@pytest.mark.parametrize("replicate,shard,world,key", [
    (2, -1, 1, "parallel.dp_replicate"), (3, -1, 4, "parallel.dp_replicate"), (1, 3, 4, "parallel.dp_shard"),
    (2, 1, 4, "parallel.dp_shard"),
])
def test_a_bad_mesh_shape_is_a_config_error_naming_the_key(replicate, shard, world, key):
    with pytest.raises(ConfigError) as err:
        ParallelDims.from_config(ParallelConfig(dp_replicate=replicate, dp_shard=shard), world)
    message = str(err.value)
    assert message.startswith(f"{key}:") and str(world) in message and len(message.splitlines()) == 1


@pytest.mark.parametrize("ep,replicate,world,shard", [
    (2, 1, 2, 1), (2, 2, 4, 1), (4, 1, 4, 1), (2, 1, 4, 2), (2, 1, 8, 4), (2, 1, 1, 0), (4, 2, 4, 0), (3, 1, 4, 0),
])
def test_expert_parallelism_splits_the_shard_ranks(ep, replicate, world, shard):
    """EP groups of ep ranks within a shard group; each expert sharded over the dp_shard / ep ranks that hold it
    (``shard`` 0: a shape that is refused)."""
    par = ParallelConfig(dp_replicate=replicate, ep=ep)
    if shard:
        dims = ParallelDims.from_config(par, world)
        assert dims.ep == ep and dims.expert_shard == shard and dims.ep * shard == dims.dp_shard
        assert "experts split over" in dims.describe() and (f"sharded over {shard}" in dims.describe()) == (shard > 1)
        return
    with pytest.raises(ConfigError, match=r"^parallel\.ep: ") as err:
        ParallelDims.from_config(par, world)
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize("overrides,fragment", [
    (["parallel.ep=2"], "needs an MoE"),
    (["model.ffn=moe", "model.moe.n_experts=6", "model.moe.top_k=2", "parallel.ep=4"], "do not split over 4"),
    (["parallel.ep=0"], "parallel.ep"),
])
def test_expert_parallelism_on_a_model_it_cannot_split_exits_2(overrides, fragment, tmp_path, capsys):
    assert main([TINY, f"run_dir={tmp_path / 'run'}", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


def test_mesh_dims_and_description():
    fsdp, hsdp, one = ParallelDims(1, 2, 2), ParallelDims(2, 2, 4), ParallelDims(1, 1, 1)
    assert fsdp.mesh_dims() == (("dp_shard", 2),)
    assert hsdp.mesh_dims() == (("dp_replicate", 2), ("dp_shard", 2))
    assert fsdp.describe() == "FSDP2 over 2 ranks"
    assert hsdp.describe() == "HSDP over 4 ranks (2 replicas x 2 shards)"
    assert fsdp.sharded and hsdp.sharded and not one.sharded
    with pytest.raises(ValueError):
        ParallelDims(2, 2, 2)


def test_the_world_carries_its_dims():
    assert init_world("cpu", ParallelConfig()).dims == ParallelDims(1, 1, 1)
    by_hand = World(rank=0, world_size=4, local_rank=0, device=torch.device("cpu"))
    assert by_hand.dims == ParallelDims.data_parallel(4) == ParallelDims(1, 4, 4)
    with pytest.raises(ValueError):
        World(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), dims=ParallelDims(1, 4, 4))


def test_a_bad_mesh_shape_exits_2_before_anything_is_written(tmp_path, capsys):
    run, cache = tmp_path / "run", tmp_path / "cache"
    assert main([TINY, "parallel.dp_replicate=2", f"run_dir={run}", f"data.cache_dir={cache}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("config error: parallel.dp_replicate:") and len(err.splitlines()) == 1
    assert not run.exists() and not cache.exists()



def test_experts_whose_features_the_sharing_ranks_do_not_divide_are_refused_before_the_run_starts():
    """6 ranks with parallel.ep=2: 3 ranks share each expert; they split the up+gate projection's 192 output
    features but not the down projection's d_model 64. With ep=3 (2 ranks share each expert) both divide; with
    ep=1 FSDP2 shards the experts as any parameter.
    check_world runs before the data or the run directory is touched."""
    from sdd_train.config import load_config
    from sdd_train.train.launch import check_world

    cfg = load_config(str(TINY).replace("tiny.yaml", "tiny_moe.yaml"),
                      ["train.global_batch_size=48", "train.micro_batch_size=8", "model.d_model=64",
                       "model.moe.expert_hidden=96"])

    def world(ep: int) -> World:
        return World(rank=0, world_size=6, local_rank=0, device=torch.device("cpu"), dims=ParallelDims(1, 6, 6, ep=ep))

    with pytest.raises(ConfigError, match=r"^parallel.ep: 3 ranks share each expert \(dp_shard 6 / ep 2\) and split"
                                          r" its 64 output features"):
        check_world(cfg, world(2))
    check_world(cfg, world(3))
    check_world(cfg, world(1))  # no expert parallelism: FSDP2 shards the experts with their block, padded
