"""The typed config: shipped files load, and bad input names the key at fault."""

from pathlib import Path

import pytest

from megatron_vespo.algo.policy_losses import POLICY_LOSSES
from megatron_vespo.config import AlgorithmConfig, ConfigError, flatten, load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("**/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    load_config(path)


def test_every_registered_loss_has_a_config_section_of_its_params_type():
    config = AlgorithmConfig()
    for name, loss in POLICY_LOSSES.items():
        assert isinstance(getattr(config, name), loss.params_type)
        selected = AlgorithmConfig(loss=name)
        assert selected.loss_params is getattr(selected, name)


def test_overrides_are_typed_and_reach_the_selected_loss():
    config = load_config(None, ["algorithm.loss=gspo", "algorithm.gspo.eps_high=5e-4", "parallel.cp=2",
                                "train.world_size=2"])
    assert config.algorithm.loss_params.eps_high == 5e-4 and config.parallel.cp == 2
    flat = flatten(config)
    assert flat["algorithm.vespo.c1_pos"] == 2.0 and flat["parallel.cp"] == 2


@pytest.mark.parametrize("override, message", [
    ("algorithm.vespo.c3=1", r"algorithm\.vespo\.c3: unknown key; allowed: \['c1_neg'"),
    ("algorithm.vespo.c1_pos=abc", r"algorithm\.vespo\.c1_pos: expected a number"),
    ("algorithm.loss=ppo", r"algorithm: loss='ppo' is unknown; allowed: \['bapo', 'cispo'"),
    ("algorithm.correct_mismatch=yes please", r"algorithm\.correct_mismatch: expected true/false"),
    ("algorithm.loss=bapo", r"algorithm\.loss=bapo chooses its clip bounds from the tokens of one loss call"),
    ("parallel.tp=0", r"parallel: tp must be a positive integer"),
    ("algorithm.vespo.c2_neg=-1", r"algorithm\.vespo: kernel c2_neg must be finite and > 0"),
    ("algorithm.sapo.tau_neg=0", r"algorithm\.sapo: sapo temperatures must be > 0"),
    ("algorithm", r"expected dotted\.key=value"),
    ("train.staleness=3", r"train: rollout_batch_size \(16\) must be divisible by staleness \(3\)"),
    ("model.family=llama", r"model: family='llama' is unknown; allowed: \['qwen2'"),
    ("optim.lr=0", r"optim: lr must be > 0"),
    ("rollout.sampling.temperature=0", r"rollout\.sampling\.temperature must be > 0: training "
                                      r"samples drawn greedily"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_vpp_needs_layers_and_micro_batches_the_interleaved_schedule_can_split():
    vpp = ["parallel.pp=2", "parallel.vpp=2", "train.world_size=2", "model.num_hidden_layers=4"]
    assert load_config(None, vpp + ["train.micro_batch_size=8"]).parallel.vpp == 2
    with pytest.raises(ConfigError, match=r"parallel\.vpp: a micro-batch count per rank and step "
                                          r"of 1 .*set train\.micro_batch_size"):
        load_config(None, vpp + ["train.micro_batch_size=16"])
    with pytest.raises(ConfigError, match=r"per rank and step of 1 "):  # DP2: 8 samples per rank
        load_config(None, vpp + ["train.world_size=4", "train.micro_batch_size=8"])
    with pytest.raises(ConfigError, match=r"model\.num_hidden_layers \(2\) must be divisible by "
                                          r"parallel\.pp \* parallel\.vpp \(4\)"):
        load_config(None, vpp[:-1] + ["train.micro_batch_size=8"])


def test_a_file_with_an_unknown_top_level_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algorithm: {loss: vespo}\nrollouts: {}\n")
    with pytest.raises(ConfigError, match=r"^rollouts: unknown key; allowed: \['algorithm', 'model', 'optim', 'parallel', 'rollout', 'slurm', 'task', 'tracking', 'train'\]"):
        load_config(path)


def test_the_learner_takes_the_sampling_temperature():
    config = load_config(None, ["rollout.sampling.temperature=0.7"])
    assert config.loss_settings.temperature == 0.7
    assert load_config(None, []).loss_settings.temperature == 1.0


def test_allgather_under_ep_refuses_route_capture():
    """The allgather dispatcher under EP pads micro-batches across the EP group; routes are
    captured and replayed per unpadded micro-batch, so those are refused, naming the fields."""
    moe = ["model.family=qwen3_moe", "model.num_experts=4", "model.moe_token_dispatcher=allgather",
           "parallel.ep=2", "train.world_size=2"]
    load_config(None, moe)
    for extra in ("algorithm.routing_metrics=true", "algorithm.routing_replay=R2"):
        with pytest.raises(ConfigError, match=r"routing_replay and algorithm\.routing_metrics are "
                                              r"not supported with model\.moe_token_dispatcher="
                                              r"allgather and parallel\.ep > 1"):
            load_config(None, moe + [extra])
