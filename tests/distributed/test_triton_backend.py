"""`moe.backend = "triton"` in training, its kernels run by Triton's interpreter on the CPU ranks: under the
layouts and features of the compatibility matrix, every step equals the C++ backend's reference
(tests/combinations.py: TRITON_PROOFS)."""

import importlib.util

import pytest
from combinations import TRITON_COMBINED
from test_combinations import _compare

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")]


@pytest.mark.parametrize("name", list(TRITON_COMBINED))
def test_the_triton_backend_trains_as_the_cpp_backend(run_distributed, tmp_path, name):
    world, run, ref, ref_world, rel = TRITON_COMBINED[name]
    _compare(run_distributed, tmp_path, name, world, run, ref, ref_world, rel)
