"""The few names Tessera shares with Ray's internals, pinned: Ray exports no public name for them, so a
Ray upgrade that renames one fails here, by name, instead of silently changing what the code does."""

from __future__ import annotations

import inspect

import pytest

from pipeline import ray_cluster, ray_train


def test_worker_group_timeout_variable_is_the_one_ray_train_reads():
    from ray.train.v2._internal import constants

    assert ray_train.WORKER_GROUP_START_TIMEOUT == constants.WORKER_GROUP_START_TIMEOUT_S_ENV_VAR
    assert ray_train.RAY_TRAIN_V2 == constants.V2_ENABLED_ENV_VAR


@pytest.mark.parametrize("value", [None, "0", "1", "true", "False", "yes"])
def test_v2_switch_reads_as_ray_reads_it(monkeypatch, value):
    from ray.train.v2._internal.constants import is_v2_enabled

    if value is None:
        monkeypatch.delenv(ray_train.RAY_TRAIN_V2, raising=False)
    else:
        monkeypatch.setenv(ray_train.RAY_TRAIN_V2, value)
    assert ray_train.v2_enabled() == is_v2_enabled()


def test_placement_group_cleaner_logger_name_is_rays():
    from ray.train.v2._internal.execution.controller import placement_group_cleaner

    assert placement_group_cleaner.logger.name == ray_cluster.PLACEMENT_GROUP_CLEANER_LOGGER


def test_loopback_switch_is_the_variable_and_constant_ray_reads():
    from ray._private import ray_constants, services

    assert ray_cluster.LOOPBACK_ONLY == ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    assert isinstance(ray_constants.ENABLE_RAY_CLUSTER, bool)
    assert "ray_constants.ENABLE_RAY_CLUSTER" in inspect.getsource(services.get_node_ip_address)


def test_loopback_cluster_node_patches_the_function_ray_start_rewrites_addresses_with():
    from ray._private import services
    from ray.scripts import scripts

    start = inspect.getsource(scripts.start.callback)
    assert "services.resolve_ip_for_localhost(node_ip_address)" in start
    assert "resolve_ip_for_localhost(host)" in inspect.getsource(services.canonicalize_bootstrap_address)
    assert "if not ray_constants.ENABLE_RAY_CLUSTER:" in start  # its refusal to join a head


def test_auth_names_are_rays():
    from ray._private.authentication import authentication_token_setup
    from ray._raylet import AuthenticationTokenLoader

    assert ray_cluster.AUTH_MODE == authentication_token_setup.AUTH_MODE_ENV_VAR
    assert callable(authentication_token_setup._enable_token_auth)
    assert isinstance(AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True), bool)


def test_a_worker_group_start_timeout_is_a_controller_failure_ray_retries_by_its_limit():
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
    from ray.train.v2._internal.execution.failure_handling import default

    assert WorkerGroupStartupTimeoutError in default.RETRYABLE_CONTROLLER_ERRORS
    assert "controller_failure_limit" in inspect.getsource(default.DefaultFailurePolicy.make_decision)


@pytest.mark.parametrize(
    ("address", "host"),
    [("127.0.0.1:6379", "127.0.0.1"), ("ray://head:10001", "head"), ("[::1]:6379", "::1"), ("h.x:1", "h.x")],
)
def test_address_host(address, host):
    assert ray_cluster.address_host(address) == host
