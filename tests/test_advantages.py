import pytest
import torch

from megatron_vespo.algo.advantages import group_relative_advantages


def test_group_mean_and_optional_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 5.0, 7.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    a = group_relative_advantages(rewards, groups)
    torch.testing.assert_close(a, torch.tensor([0.75, -0.25, -0.25, -0.25, -1.0, 1.0]))
    s = group_relative_advantages(rewards, groups, scale_by_std=True)
    std0 = torch.tensor([1.0, 0.0, 0.0, 0.0]).std()
    torch.testing.assert_close(s[:4], a[:4] / (std0 + 1e-6))
    torch.testing.assert_close(s[4:], torch.tensor([-1.0, 1.0]) / (2 ** 0.5 + 1e-6))


def test_singleton_and_constant_groups_get_zero():
    a = group_relative_advantages(torch.tensor([3.0, 2.0, 2.0]), torch.tensor([0, 1, 1]),
                                  scale_by_std=True)
    torch.testing.assert_close(a, torch.zeros(3))


def test_bad_rewards_are_rejected():
    with pytest.raises(ValueError, match="NaN"):
        group_relative_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="1-D"):
        group_relative_advantages(torch.ones(3), torch.zeros(2, dtype=torch.long))
