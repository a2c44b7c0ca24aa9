"""The parallel layout as one object: sizes, validation, and the megatron-core process groups.

`ParallelLayout` holds the degrees a user configures; `initialize()` builds megatron-core's
`parallel_state` groups once and returns them as `ParallelGroups`, the handles every other module
of the parallel layer takes. Nothing else in the project calls `initialize_model_parallel`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelLayout:
    """Parallel degrees; data parallelism is whatever the world size leaves over."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: Optional[int] = None  # expert tensor parallelism; None: the same as tp (megatron's default)
    vpp: Optional[int] = None
    sequence_parallel: bool = False

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp", "ep", "expert_tp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.vpp is not None and (self.vpp < 2 or self.pp < 2):
            raise ValueError("vpp needs pp >= 2 and vpp >= 2 (virtual stages per rank)")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("sequence_parallel needs tp > 1")

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    def dp(self, world_size: int) -> int:
        """Data-parallel size for `world_size` ranks (dense layers: world / (tp * pp * cp))."""
        model_parallel = self.tp * self.pp * self.cp
        if world_size % model_parallel:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp*cp = {model_parallel}"
            )
        dp = world_size // model_parallel
        expert_model_parallel = self.expert_tp * self.ep * self.pp
        if world_size % expert_model_parallel:
            raise ValueError(
                f"world size {world_size} is not divisible by etp*ep*pp = {expert_model_parallel}"
            )
        return dp

    def initialize(self) -> "ParallelGroups":
        """Build megatron-core's process groups on an initialised default group."""
        from megatron.core import parallel_state as ps

        self.dp(dist.get_world_size())
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ps.initialize_model_parallel(
            tensor_model_parallel_size=self.tp,
            pipeline_model_parallel_size=self.pp,
            virtual_pipeline_model_parallel_size=self.vpp,
            context_parallel_size=self.cp,
            expert_model_parallel_size=self.ep,
            expert_tensor_parallel_size=self.expert_tp,
        )
        return ParallelGroups.from_parallel_state()


@dataclass(frozen=True)
class ParallelGroups:
    """The process groups of an initialised layout, and this rank's place in them."""

    tp: dist.ProcessGroup
    cp: dist.ProcessGroup
    pp: dist.ProcessGroup
    dp: dist.ProcessGroup  # data parallel without CP: ranks holding different sequences
    dp_cp: dist.ProcessGroup  # data x context parallel: ranks holding different tokens

    @classmethod
    def from_parallel_state(cls) -> "ParallelGroups":
        from megatron.core import parallel_state as ps

        return cls(
            tp=ps.get_tensor_model_parallel_group(),
            cp=ps.get_context_parallel_group(),
            pp=ps.get_pipeline_model_parallel_group(),
            dp=ps.get_data_parallel_group(with_context_parallel=False),
            dp_cp=ps.get_data_parallel_group(with_context_parallel=True),
        )

    @property
    def tp_size(self) -> int:
        return dist.get_world_size(self.tp)

    @property
    def tp_rank(self) -> int:
        return dist.get_rank(self.tp)

    @property
    def cp_size(self) -> int:
        return dist.get_world_size(self.cp)

    @property
    def cp_rank(self) -> int:
        return dist.get_rank(self.cp)

    @property
    def dp_size(self) -> int:
        return dist.get_world_size(self.dp)

    @property
    def dp_rank(self) -> int:
        return dist.get_rank(self.dp)
