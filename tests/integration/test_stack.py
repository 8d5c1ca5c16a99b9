"""The embedded servers themselves: start, serve, stop without leftovers."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import redis
import tritonclient.grpc as grpcclient
from records import wait_until

from streamrec.stack.process import group_members, pid_alive
from streamrec.stack.servers import shm_regions, start_triton, stop_service

pytestmark = pytest.mark.integration


def test_triton_starts_serves_and_stops_without_leftovers(tmp_path):
    service = start_triton(tmp_path / "triton", timeout=90)
    try:
        client = grpcclient.InferenceServerClient(service.endpoint)
        assert client.is_server_ready()
        assert client.is_model_ready("ping")
        x = grpcclient.InferInput("INPUT", [4], "FP32")
        x.set_data_from_numpy(np.array([0.5, 1, 2, -3], dtype=np.float32))
        out = client.infer("ping", [x]).as_numpy("OUTPUT")
        np.testing.assert_array_equal(out, [1, 2, 4, -6])
        assert shm_regions(service.extra["shm_prefix"])  # the stub's region exists while serving
        assert len(group_members(service.pid)) >= 2  # server + Python-backend stub
        client.close()
    finally:
        stop_service(service)
    assert not pid_alive(service.pid)
    assert group_members(service.pid) == []
    assert shm_regions(service.extra["shm_prefix"]) == []


def test_valkey_is_a_real_server_with_persistence(redis_url):
    r = redis.Redis.from_url(redis_url)
    key = f"test-stack-{uuid.uuid4().hex}"  # outside every project; gone afterwards
    try:
        r.set(key, "1")
        assert r.get(key) == b"1"
    finally:
        r.delete(key)
    assert r.config_get("appendonly")["appendonly"] == "yes"
    assert r.info("server")["executable"].endswith("valkey-server")


def test_stack_records_services_and_stops_them_by_pid(base_settings, tmp_path):
    from streamrec.stack import EmbeddedStack, StackNotRunning

    settings = base_settings.model_copy(update={"run_dir": tmp_path / "run"})
    stack = EmbeddedStack(settings)
    stack.up(("kafka", "redis"))
    services = stack.services()
    assert {s["service"]: s["state"] for s in stack.status()} == {
        "kafka": "running",
        "redis": "running",
        "triton": "stopped",
    }
    assert sorted(stack.down(("kafka", "redis"))) == ["kafka", "redis"]
    assert not any(pid_alive(s.pid) for s in services.values())
    with pytest.raises(StackNotRunning, match="streamrec stack up"):
        stack.endpoint("kafka")


def test_external_endpoints_are_used_and_nothing_is_started(base_settings, tmp_path):
    from streamrec.stack import EmbeddedStack

    settings = base_settings.model_copy(
        update={"run_dir": tmp_path / "run", "kafka_bootstrap": "kafka.example:9092"}
    )
    stack = EmbeddedStack(settings)
    started = stack.up(("kafka",))
    assert started == {}
    assert stack.endpoint("kafka") == "kafka.example:9092"


def test_a_dead_service_is_healed_on_its_port_with_its_data(base_settings, tmp_path):
    import os
    import signal

    from streamrec.stack import EmbeddedStack

    stack = EmbeddedStack(base_settings.model_copy(update={"run_dir": tmp_path / "run"}))
    try:
        before = stack.up(("redis",))["redis"]
        client = redis.Redis.from_url(before.endpoint)
        client.set("streamrec:kept", "yes")
        client.execute_command("WAITAOF", 1, 0, 1000)  # on disk, as the workers make sure
        os.kill(before.pid, signal.SIGKILL)
        wait_until(lambda: not pid_alive(before.pid), 10, "Valkey to die of SIGKILL")
        assert {s["service"]: s["state"] for s in stack.status()}["redis"] == "dead"
        after = stack.up(("redis",))["redis"]
        assert after.pid != before.pid and after.endpoint == before.endpoint
        assert redis.Redis.from_url(after.endpoint).get("streamrec:kept") == b"yes"
    finally:
        stack.down()
