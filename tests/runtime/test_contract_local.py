"""The shared runtime contract, run against the local (runc) runtime."""

from __future__ import annotations

import pytest
from runtime_contract import AppSpec, RuntimeContract

from kiln.runtime import Runtime
from kiln.runtime.local import LocalRuntime


class TestLocalRuntimeContract(RuntimeContract):
    @pytest.fixture
    def runtime(self, local_runtime: LocalRuntime) -> Runtime:
        assert isinstance(local_runtime, Runtime)
        return local_runtime

    @pytest.fixture
    def app_spec(self, make_spec: AppSpec) -> AppSpec:
        return make_spec
