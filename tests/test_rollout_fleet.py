"""A fleet of real SGLang servers (CPU) behind the sglang-router, and the rollout client on it.

One module-scoped fleet of two servers serving a tiny dense Qwen3 (built here, no downloads), started
concurrently (start-up dominates: ~40-60 s). The router runs with its own retries off so that the
kill test exercises the client's retry path, not the router's. The kill test destroys a server, so
it runs last, followed only by the test that restarts that server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math

import numpy as np
import pytest
import requests
import torch
import transformers

from megatron_vespo.rollout.auth import ENV, run_api_key, use_api_key
from megatron_vespo.rollout.client import RolloutClient, RolloutError, SamplingOptions
from megatron_vespo.tasks.base import Prompt
from megatron_vespo.rollout.fleet import Fleet, FleetConfig, FleetError
from megatron_vespo.rollout.router import RouterClient
from megatron_vespo.rollout.server import ServerOptions

pytestmark = pytest.mark.slow

VOCAB = 128
STOP = 5
BASE_PORT, ROUTER_PORT = 32010, 32000
DEAD_URL = "http://127.0.0.1:32999"  # nothing listens there
# sglang sizes its KV cache from free host memory on CPU (~17 GB here); a tiny model needs little.
SERVER = ServerOptions(max_total_tokens=8192)


def make_model(directory) -> None:
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   tie_word_embeddings=False, max_position_embeddings=512)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(directory)


def prompts(count: int, start: int = 0) -> list[Prompt]:
    return [Prompt(g, [1 + g % 100, 7, 3 + g % 11, 9], {"source": f"p{g}"})
            for g in range(start, start + count)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3_tiny")
    make_model(d)
    return d


@pytest.fixture(scope="module")
def fleet(model_dir, tmp_path_factory):
    """Started with an API key, as every fleet of a run is: each test here sends it."""
    use_api_key(run_api_key(tmp_path_factory.mktemp("run")))
    cfg = FleetConfig(num_servers=2, base_port=BASE_PORT, router_port=ROUTER_PORT, server=SERVER,
                      router_extra_args=("--disable-retries",), request_timeout_s=120.0, max_retries=3,
                      max_restarts=0)  # the killed server stays out (restarts: test_online_train.py)
    try:
        with Fleet.launch(str(model_dir), cfg, tmp_path_factory.mktemp("fleet_logs")) as f:
            yield f
    finally:
        use_api_key(None)


def test_fleet_lists_both_servers_healthy(fleet):
    listed = {w.url: w.healthy for w in fleet.router.workers()}
    assert listed == {s.url: True for s in fleet.servers}
    assert fleet.worker_urls == [s.url for s in fleet.servers]
    assert fleet.check_health() == []
    # the router this sglang-router version runs takes the flag: worker health is the fleet's
    assert "--disable-circuit-breaker" in fleet.router_process.argv


def test_servers_and_router_refuse_requests_without_the_runs_key(fleet, model_dir):
    """Before, anyone who reached a port could generate, or replace the weights."""
    generate = ("/generate", {"input_ids": [1, 7], "sampling_params": {}})
    calls = [(fleet.router_url, *generate), (fleet.router_url, "/workers", {"url": DEAD_URL})]
    calls += [(url, path, body) for url in fleet.worker_urls for path, body in
              (generate, ("/update_weights_from_disk", {"model_path": str(model_dir)}))]
    for url, path, body in calls:
        assert requests.get(url + "/health", timeout=10).status_code == 200  # probes stay open
        assert requests.post(url + path, json=body, timeout=30).status_code == 401, (url, path)
        wrong = {"Authorization": "Bearer not-the-key"}
        assert requests.post(url + path, json=body, headers=wrong, timeout=30).status_code == 401
    assert requests.get(fleet.router_url + "/workers", timeout=10).status_code == 401


def test_the_runs_key_is_made_once_private_or_taken_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    key = run_api_key(tmp_path)
    assert len(key) >= 40 and run_api_key(tmp_path) == key
    assert (tmp_path / ".api_key").stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv(ENV, "from-the-environment")
    assert run_api_key(tmp_path) == "from-the-environment"


def test_generation_has_n_samples_with_logprobs_and_version(fleet, model_dir):
    n, max_new = 4, 12
    client = RolloutClient(fleet, SamplingOptions(max_new_tokens=max_new, stop_token_ids=(STOP,)), n=n)
    batch = prompts(6)
    gens = client.generate_batch(batch, progress=False)

    assert [g.sample_id for g in gens] == [f"{p.group_id}-{i}" for p in batch for i in range(n)]
    for g in gens:
        assert 1 <= len(g.response_ids) <= max_new
        assert len(g.engine_logprobs) == len(g.response_ids)
        assert all(math.isfinite(lp) and lp <= 0 for lp in g.engine_logprobs)
        spans, finish = g.metadata["weight_versions"], g.metadata["finish_reason"]
        assert g.policy_version == 0 and spans[0][1] == 0 and spans[-1][2] == len(g.response_ids)
        assert g.metadata["source"] == f"p{g.group_id}" and g.routed_experts is None
        assert math.isnan(g.reward)  # the source scores it
        if finish == "stop":
            assert g.response_ids[-1] == STOP
        else:
            assert finish == "length" and len(g.response_ids) == max_new
    assert client.stats.samples == len(gens) and client.stats.tokens_generated == sum(
        len(g.response_ids) for g in gens)
    assert client.stats.requests_retried == 0 and client.stats.tokens_per_s > 0

    # The engine log-probs are those of the sampled tokens: a transformers forward agrees.
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for g in gens[:4]:
        ids = torch.tensor(np.concatenate([g.prompt_ids, g.response_ids]), dtype=torch.long)[None]
        with torch.no_grad():
            logp = torch.log_softmax(hf(ids).logits[0, :-1].double(), -1)
        ref = logp[len(g.prompt_ids) - 1:].gather(-1, ids[0, len(g.prompt_ids):, None])[:, 0]
        torch.testing.assert_close(torch.tensor(g.engine_logprobs, dtype=torch.float64), ref, atol=1e-4, rtol=0)


def test_routed_experts_requested_from_dense_server_is_an_error(fleet):
    client = RolloutClient(fleet, SamplingOptions(max_new_tokens=2), n=1, return_routed_experts=True,
                           num_moe_layers=2)
    with pytest.raises(RolloutError, match="routed experts were requested"):
        client.generate_batch(prompts(1), progress=False)


def test_no_healthy_server_is_a_fleet_error(fleet):
    # A live router whose only member is dead.
    orphan = Fleet(fleet.cfg, RouterClient(fleet.router_url), [DEAD_URL])
    with pytest.raises(FleetError, match="no healthy rollout server left"):
        orphan.check_health()
    assert orphan.worker_urls == []
    # A router that is gone: requests fail, the health check names it.
    gone = Fleet(FleetConfig(max_retries=1), RouterClient(DEAD_URL), [DEAD_URL])
    with pytest.raises(FleetError, match=f"router {DEAD_URL} is not answering"):
        RolloutClient(gone, SamplingOptions(max_new_tokens=2)).generate_batch(prompts(2), progress=False)
    with pytest.raises(FleetError, match="cannot attach"):
        Fleet.attach(FleetConfig(attach_router_url=DEAD_URL))


@pytest.mark.parametrize("changes, field", [
    (dict(num_servers=0), "num_servers"),
    (dict(base_port=70000), "base_port"),
    (dict(router_port=-1), "router_port"),
    (dict(base_port=32010, num_servers=2, router_port=32011), "router_port"),
    (dict(attach_router_url="127.0.0.1:1"), "attach_router_url"),
    (dict(attach_router_url="http://h:1", attach_worker_urls=("h:2",)), "attach_worker_urls"),
    (dict(attach_worker_urls=("http://h:2",)), "attach_worker_urls"),
    (dict(router_policy="fastest"), "router_policy"),
    (dict(request_timeout_s=0), "request_timeout_s"),
    (dict(max_retries=-1), "max_retries"),
])
def test_fleet_config_errors_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        FleetConfig(**changes)


@pytest.mark.parametrize("changes, field", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(stop_token_ids=(-2,)), "stop_token_ids"),
])
def test_sampling_options_errors_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        SamplingOptions(**changes)


class FakeServer:
    """A canned /generate answering by the prompt's first token (1: well-formed, 2: a NaN log-prob,
    3: HTTP 503 on the first try), acting as router and worker at once. For the client's failure
    handling without real servers."""

    def __init__(self):
        self.calls: dict[int, int] = {}

    async def generate(self, request):
        from aiohttp import web

        body = await request.json()
        mode, n = body["input_ids"][0], body["sampling_params"]["n"]
        self.calls[mode] = self.calls.get(mode, 0) + 1
        if mode == 3 and self.calls[mode] == 1:
            return web.Response(status=503, text="worker unavailable")
        lp = float("nan") if mode == 2 else -1.5
        one = {"output_ids": [10, 11], "meta_info": {
            "finish_reason": {"type": "length", "length": 2}, "weight_version": "4",
            "output_token_logprobs": [[-0.5, 10, None], [lp, 11, None]],
            "weight_versions": [{"version": "3", "start": 0, "end": 1}, {"version": "4", "start": 1, "end": 2}]}}
        return web.Response(text=json.dumps([one] * n), content_type="application/json")

    async def run(self, coro_fn):
        """Serve on 127.0.0.1:32990 while `coro_fn(fleet)` runs."""
        from aiohttp import web

        async def health(request):
            return web.Response(text="ok")

        async def workers(request):
            return web.json_response({"workers": []})

        app = web.Application()
        app.router.add_post("/generate", self.generate)
        app.router.add_get("/health", health)
        app.router.add_get("/workers", workers)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 32990).start()
        url = "http://127.0.0.1:32990"
        try:
            return await coro_fn(Fleet(FleetConfig(max_retries=2), RouterClient(url), [url]))
        finally:
            await runner.cleanup()


def test_client_resends_a_failed_group_and_reads_weight_spans():
    server = FakeServer()

    async def run(fake_fleet):
        client = RolloutClient(fake_fleet, SamplingOptions(max_new_tokens=2), n=2)
        return client, await client.generate([Prompt(0, [1, 5], {}), Prompt(1, [3, 5], {})],
                                             progress=False)

    client, gens = asyncio.run(server.run(run))
    assert [g.sample_id for g in gens] == ["0-0", "0-1", "1-0", "1-1"]
    assert client.stats.requests_retried == 1 and server.calls == {1: 1, 3: 2}
    assert gens[0].policy_version == 3
    assert [v for v, _, _ in gens[0].metadata["weight_versions"]] == [3, 4]


@pytest.mark.parametrize("on_invalid", ["raise", "skip"])
def test_non_finite_logprobs_raise_or_skip_the_group_counted(on_invalid, caplog):
    async def run(fake_fleet):
        client = RolloutClient(fake_fleet, SamplingOptions(max_new_tokens=2), n=2, on_invalid=on_invalid)
        return client, await client.generate([Prompt(0, [1, 5], {}), Prompt(7, [2, 5], {})],
                                             progress=False)

    if on_invalid == "raise":
        with pytest.raises(RolloutError, match="group 7: invalid answer: sample 0: non-finite log-prob"):
            asyncio.run(FakeServer().run(run))
        return
    with caplog.at_level(logging.WARNING):
        client, gens = asyncio.run(FakeServer().run(run))
    assert [g.group_id for g in gens] == [0, 0] and client.stats.groups_skipped == 1
    assert any("group 7: invalid answer, group skipped" in r.getMessage() for r in caplog.records)


def test_killing_a_server_mid_batch_loses_and_duplicates_nothing(fleet, caplog):
    """Runs last: SIGKILLs one of the two servers once a third of the groups are done."""
    n, count = 3, 18
    victim, survivor = fleet.servers
    client = RolloutClient(fleet, SamplingOptions(max_new_tokens=16), n=n, max_in_flight=4)

    async def run():
        async def killer():
            while client.stats.groups < count // 3:
                await asyncio.sleep(0.05)
            await asyncio.to_thread(victim.kill)

        kill = asyncio.create_task(killer())
        gens = await client.generate(prompts(count, start=100), progress=False)
        await kill
        return gens

    with caplog.at_level(logging.WARNING):
        gens = asyncio.run(run())

    assert not victim.alive
    keys = [g.sample_id for g in gens]
    assert sorted(keys) == sorted(f"{100 + g}-{i}" for g in range(count) for i in range(n))  # once each
    assert client.stats.requests_retried >= 1
    assert fleet.worker_urls == [survivor.url]
    assert [w.url for w in fleet.router.workers()] == [survivor.url]
    assert any(victim.url in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_a_restarted_server_rejoins_through_the_router_with_the_runs_key(fleet):
    """After the kill test: the killed server, started again, is registered with the router,
    which must send it the run's key (a worker added without one would answer the router 401)."""
    victim, survivor = fleet.servers
    victim.restart()
    victim.wait_healthy()
    fleet.rejoin([victim.url])
    assert sorted(w.url for w in fleet.router.workers()) == sorted([victim.url, survivor.url])
    client = RolloutClient(fleet, SamplingOptions(max_new_tokens=4), n=2, max_in_flight=4)
    gens = asyncio.run(client.generate(prompts(8, start=300), progress=False))
    assert len(gens) == 16 and client.stats.requests_retried == 0  # round robin: both served


def test_servers_sample_with_seeds_from_the_run():
    from megatron_vespo.rollout.server import ServerOptions, seeded, server_argv

    argv = server_argv("/m", 30000, seeded(ServerOptions(), seed=1234, index=2), cpu=True)
    assert argv[argv.index("--random-seed") + 1] == "1236"
    assert seeded(ServerOptions(random_seed=7), seed=1234, index=1).random_seed == 8
    assert "--random-seed" not in server_argv("/m", 30000, ServerOptions(), cpu=True)
