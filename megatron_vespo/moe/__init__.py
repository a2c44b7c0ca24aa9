"""MoE routing tools for the learner: routing replay (R2: the learner's own old-policy routes, R3: the
rollout engine's routes) on top of megatron-core's `RouterReplay`, and per-token route capture."""

from .capture import RouteCapture, RouterCapture
from .replay import (REPLAY_MODES, RoutingReplay, align_to_router_order, engine_position_routes,
                     micro_batch_engine_routes, attach_engine_routes, router_order_to_positions,
                     router_token_positions)

__all__ = ["REPLAY_MODES", "RouteCapture", "RouterCapture", "RoutingReplay", "align_to_router_order",
           "engine_position_routes", "micro_batch_engine_routes", "attach_engine_routes",
           "router_order_to_positions", "router_token_positions"]
