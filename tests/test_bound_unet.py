"""`BoundUNet`: the IO-binding rules ORT's CUDA graphs rely on, checked with the CPU provider.

A captured CUDA graph replays fixed device addresses, and capture runs the model more than once in its first call.
So the input and output buffers must be distinct (an output written over its input would be applied twice), new
values must be copied into the buffers bound once (a re-bound buffer is never read by the replayed graph), and each
batch shape needs its own graph id. These tests check each rule on the CPU provider, where IO binding behaves the same.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from ddpm_plugin.bundled import DIGITS_MODEL
from ddpm_plugin.export.onnx_pipeline import BoundUNet, OnnxDDPMPipeline
from ddpm_plugin.export.providers import CPU


@pytest.fixture(scope="module")
def pipe() -> OnnxDDPMPipeline:
    return OnnxDDPMPipeline.from_pretrained(f"{DIGITS_MODEL}/onnx", provider="cpu", num_threads=1)


def test_input_and_output_buffers_are_distinct(pipe):
    unet = pipe.bound_unet(2)
    addresses = [value.data_ptr() for value in unet._values]
    assert len(set(addresses)) == 3
    assert not np.shares_memory(unet.sample, unet.noise_pred)


def test_running_twice_on_the_same_input_gives_the_same_eps(pipe):
    """What makes capture's extra runs harmless: a run never changes its own input."""
    unet = pipe.bound_unet(2)
    np.copyto(unet.sample, np.random.default_rng(0).standard_normal(unet.sample.shape, dtype=np.float32))
    before = unet.sample.copy()
    first = unet(500).copy()
    second = unet(500).copy()
    np.testing.assert_array_equal(unet.sample, before)
    np.testing.assert_array_equal(first, second)


def test_copying_into_the_bound_input_changes_the_output(pipe):
    unet = pipe.bound_unet(3)
    outputs = []
    for seed in (1, 2):
        np.copyto(unet.sample, np.random.default_rng(seed).standard_normal(unet.sample.shape, dtype=np.float32))
        outputs.append(unet(10).copy())
        assert unet._runs[0][1].get_outputs()[0].data_ptr() == unet.noise_pred.ctypes.data  # the buffer bound once
    assert not np.allclose(outputs[0], outputs[1])


def test_the_bound_buffers_cannot_be_replaced(pipe):
    unet = pipe.bound_unet(1)
    for name in ("sample", "timestep", "noise_pred"):
        with pytest.raises(AttributeError):
            setattr(unet, name, np.zeros_like(getattr(unet, name)))


def test_an_output_bound_over_its_input_is_applied_once_per_run():
    """The hazard the distinct buffers avoid, on a model y = x + 1: two runs over one buffer add 2."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])], "add_one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)  # old runtimes too
    session = ort.InferenceSession(model.SerializeToString(), providers=[CPU])
    shared = np.zeros(2, dtype=np.float32)
    value = ort.OrtValue.ortvalue_from_numpy(shared)
    binding = session.io_binding()
    binding.bind_ortvalue_input("x", value)
    binding.bind_ortvalue_output("y", value)
    session.run_with_iobinding(binding)
    session.run_with_iobinding(binding)
    np.testing.assert_array_equal(shared, [2.0, 2.0])


def test_each_batch_size_gets_its_own_cuda_graph_id(pipe):
    graphs = OnnxDDPMPipeline(pipe.session, pipe.scheduler_config, pipe.metadata, cuda_graph=True)
    ids = {size: graphs.bound_unet(size).run_options.get_run_config_entry("gpu_graph_id") for size in (1, 4, 2)}
    assert ids == {1: "1", 4: "2", 2: "3"}
    assert graphs.bound_unet(4).run_options.get_run_config_entry("gpu_graph_id") == "2"  # reused, not captured anew
    assert pipe.bound_unet(1).run_options is None  # no graphs, no RunOptions


def test_bound_unet_on_cpu_samples_what_session_run_gives(pipe):
    unet = BoundUNet(pipe.session, (2, *pipe.image_shape), "cpu")
    x = np.random.default_rng(3).standard_normal(unet.sample.shape, dtype=np.float32)
    np.copyto(unet.sample, x)
    names = [i.name for i in pipe.session.get_inputs()]
    (expected,) = pipe.session.run(None, {names[0]: x, names[1]: np.full(2, 7, dtype=np.int64)})
    np.testing.assert_allclose(unet(7), expected, rtol=1e-6, atol=1e-6)
