"""CPU mode: run torchtitan 0.2.2's real Trainer on CPU processes over gloo.

torchtitan 0.2.2 assumes CUDA. `enable_cpu_mode()` adapts it, in place, so that
`torchrun ... -m torchtitan.train` trains on CPU (FSDP2, TP, PP and activation
checkpointing all run over gloo). It must run before the Trainer builds its device,
process group and metrics, i.e. from the module named by
`--experimental.custom_import` (torchtitan imports that first thing in
`Trainer.__init__`). With a GPU present it does nothing.

The adaptations, and why each is needed:

1. `device_type` / `device_module` -> "cpu" / `torch.cpu`.
   `torchtitan.tools.utils` picks the accelerator at import time and falls back to
   "cuda" when there is none; other modules (distributed.utils, parallel_dims,
   components.metrics, tools.profiling, distributed.dual_pipe_v) copy those values at
   import time, so every loaded `torchtitan.*` module is rewritten, and later imports
   read the rewritten `tools.utils`. With "cpu" the Trainer's device is `cpu:<rank>`,
   the process group backend is gloo and the device meshes are CPU meshes.
2. `components.metrics.build_device_memory_monitor` -> a CPU stand-in.
   The CUDA monitor queries `get_device_name`, `get_device_properties`,
   `memory_stats`, none of which `torch.cpu` has. The stand-in reports the process's
   peak RSS against total RAM in the same 6-field `DeviceMemStats`.
3. `distributed.utils.set_pg_timeouts` -> same job, plain `barrier()`.
   The original calls `barrier(device_ids=[device_module.current_device()])`, and
   `torch.cpu.current_device()` returns the string "cpu", which barrier rejects.
4. FSDP2 gradient reduction forced to `ReduceOp.SUM` for CPU tensors.
   FSDP2 divides gradients inside the collective with `ReduceOp.AVG` or
   `ReduceOp.PREMUL_SUM`; gloo supports neither. FSDP2's own
   `force_sum_reduction_for_comms` path (the one it uses for MTIA) sends SUM and
   applies the same divide factor as a separate pre/post division, so gradients are
   unchanged (torchtitan's llama3 sets the factor to 1 and scales the loss by the
   global token count itself).

Not done here: `import torchtitan.train` needs `triton` importable (pip install
triton; it works on CPU), and torchtitan's wheel ships no configs, tokenizer or data.
"""

import functools
import os
import resource
import sys

import torch

_enabled = False


class CPUMemoryMonitor:
    """Stand-in for torchtitan's DeviceMemoryMonitor: peak RSS of this process."""

    def __init__(self):
        self.device_name = "cpu"
        self.device_capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        self.device_capacity_gib = self.device_capacity / 2**30

    def get_peak_stats(self):
        from torchtitan.components.metrics import DeviceMemStats

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        gib, pct = peak / 2**30, 100 * peak / self.device_capacity
        return DeviceMemStats(gib, pct, gib, pct, 0, 0)

    def reset_peak_stats(self):
        pass  # the kernel keeps the peak RSS; it cannot be reset


def _build_cpu_memory_monitor():
    return CPUMemoryMonitor()


def _set_pg_timeouts(timeout, parallel_dims):
    # barrier first, as torchtitan does, so no rank runs under the new (shorter)
    # timeout while another is still in slow start-up work
    torch.distributed.barrier()
    meshes = parallel_dims.get_all_one_dimensional_meshes().values()
    for group in [m.get_group() for m in meshes] + [None]:  # None: the default PG
        torch.distributed.distributed_c10d._set_pg_timeout(timeout, group)


def enable_cpu_mode() -> bool:
    """Adapt torchtitan to CPU + gloo. Returns True if CPU mode is on, False on GPU
    machines (where it changes nothing). Safe to call more than once."""
    global _enabled
    if torch.cuda.is_available():
        return False
    if _enabled:
        return True

    import torch.distributed.fsdp._fully_shard._fsdp_collectives as fsdp_collectives
    import torchtitan.components.metrics as metrics
    import torchtitan.distributed.utils as dist_utils
    import torchtitan.tools.utils  # noqa: F401  (the source of device_type)

    # 1. every loaded torchtitan module that copied the CUDA defaults
    for name, module in list(sys.modules.items()):
        if name.startswith("torchtitan.") and module is not None:
            if getattr(module, "device_type", None) == "cuda":
                module.device_type = "cpu"
            if getattr(module, "device_module", None) is torch.cuda:
                module.device_module = torch.cpu

    # 2, 3. looked up as module globals at call time, so rebinding them is enough
    metrics.build_device_memory_monitor = _build_cpu_memory_monitor
    dist_utils.set_pg_timeouts = _set_pg_timeouts

    # 4. foreach_reduce looks this helper up as a module global on every reduction
    original = fsdp_collectives._get_gradient_divide_factors

    @functools.wraps(original)
    def divide_factors(
        rs_group, ar_group, reduce_dtype, device_type="", factor=None, force_sum_reduction_for_comms=False
    ):
        force = force_sum_reduction_for_comms or device_type == "cpu"
        return original(rs_group, ar_group, reduce_dtype, device_type, factor, force)

    fsdp_collectives._get_gradient_divide_factors = divide_factors
    _enabled = True
    return True
