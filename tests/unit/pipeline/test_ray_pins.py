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
