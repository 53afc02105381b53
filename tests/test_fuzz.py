"""Fuzz the server's own OpenAPI schema with schemathesis (bounded examples): no request to the
chat or completions endpoints may produce a 5xx, and the engine ends idle with no leaked block."""

from __future__ import annotations

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from lmq.llm import build_engine_config
from serve.server import BackgroundServer, make_app


@pytest.fixture(scope="module")
def live(tiny_models):
    config = build_engine_config(str(tiny_models["llama"]), device="cpu", kv_cache_gb=0.05, max_model_len=256,
                                 max_num_seqs=16)
    srv = BackgroundServer(make_app(config, "tiny"))
    yield srv
    srv.stop()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_no_server_errors(live, path):
    schema = schemathesis.openapi.from_dict(live.app.openapi())
    operation = schema.find_operation_by_path("POST", path)

    @given(case=operation.as_strategy())
    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case) -> None:
        if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
            case.body["model"] = "tiny"  # reach the engine (unknown names' 404 is tested in test_server)
        response = case.call(base_url=live.url, timeout=60)
        case.validate_response(response, checks=[not_a_server_error])

    run()


def test_engine_idle_after_fuzzing(live):
    engine = live.app.state.router.base.engine
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and engine.stats().num_free_blocks != engine.stats().num_blocks:
        time.sleep(0.1)
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_blocks and stats.num_running == 0
    counts = {s.labels["status"]: s.value for m in live.app.state.metrics.requests.collect() for s in m.samples
              if s.name.endswith("_total")}
    print("fuzz responses by status:", counts)
    assert counts.get("200", 0) > 20 and counts.get("400", 0) > 20  # the engine was reached, and refusals happened
    assert not any(code.startswith("5") for code in counts)
    engine.call_blocking("block_manager.check_integrity", timeout=30)
