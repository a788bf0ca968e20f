"""verl 0.9.1's trainer on a CPU-only machine: a laptop mode for debugging recipes, and how our CI runs verl.

Load it in every process of a run (the driver and each Ray worker) through verl's own hook::

    VERL_USE_EXTERNAL_MODULES=spear.verl.recipe.cpu VERL_PLATFORM=cpu python -m spear.verl.recipe.main \\
        trainer.device=cpu actor_rollout_ref.rollout.name=hf ...

(``spear.verl.recipe.cpu.overrides()`` lists every Hydra override the mode needs.) It is never loaded by the
``verl.plugins`` entry point: on GPUs nothing here is active. What it does, each through an extension point of
verl rather than a patch of its files where one exists:

- registers a ``cpu`` platform (``PlatformRegistry``): device ``cpu``, collective backend ``gloo``, a device
  module that answers ``torch.cuda``'s questions for the CPU, and Ray's ``GPU`` resource (the run asks Ray for
  logical GPUs, one per worker process);
- makes verl's default process group ``gloo`` (verl would build ``"cpu:gloo,cpu:gloo"``, which torch refuses);
- registers verl's own FSDP/FSDP2 engines for the ``cpu`` device (``EngineRegistry``);
- replaces the pinned-memory ``CPUOffloadPolicy`` of the reference model's FSDP2 engine by an unpinned one
  (pinning needs an accelerator);
- registers the ``hf`` rollout (:mod:`spear.verl.recipe.hf_rollout`): token-in/token-out ``transformers``
  generation behind verl's rollout-server interface, with verl's weight sync.

It binds to verl |VERL_VERSION| exactly and refuses any other version with a clear error.
"""

from __future__ import annotations

import contextlib
import os
import types
from typing import Any

import torch

VERL_VERSION = "0.9.1"
__doc__ = __doc__.replace("|VERL_VERSION|", VERL_VERSION)


def check_verl_version() -> None:
    import verl

    if verl.__version__ != VERL_VERSION:
        raise RuntimeError(
            f"spear.verl.recipe.cpu binds to verl=={VERL_VERSION} internals (platform, engines, rollout registry); "
            f"this is verl {verl.__version__}. Install verl=={VERL_VERSION} or run verl on GPUs without this module."
        )


class _CPUDeviceModule(types.ModuleType):
    """Stands in for ``torch.cuda`` where verl asks its device module about the CPU: RNG state, memory figures,
    streams and synchronisation. Anything ``torch.cpu`` has is used; the rest are no-ops that answer 0."""

    def __init__(self):
        super().__init__("spear_cpu_device")

    is_available = staticmethod(lambda: True)
    device_count = staticmethod(lambda: 1)
    current_device = staticmethod(lambda: torch.device("cpu"))
    set_device = staticmethod(lambda *a, **k: None)
    synchronize = staticmethod(lambda *a, **k: None)
    empty_cache = staticmethod(lambda *a, **k: None)
    ipc_collect = staticmethod(lambda *a, **k: None)
    manual_seed = staticmethod(lambda seed: torch.manual_seed(seed))
    manual_seed_all = staticmethod(lambda seed: torch.manual_seed(seed))
    get_rng_state = staticmethod(lambda *a, **k: torch.get_rng_state())
    set_rng_state = staticmethod(lambda state, *a, **k: torch.set_rng_state(state))
    set_per_process_memory_fraction = staticmethod(lambda *a, **k: None)
    get_device_name = staticmethod(lambda *a, **k: "cpu")

    @staticmethod
    def mem_get_info(*args, **kwargs) -> tuple[int, int]:
        pages, page = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
        return pages * page, total

    def __getattr__(self, name: str) -> Any:
        if hasattr(torch.cpu, name):
            return getattr(torch.cpu, name)
        if name.startswith("__"):
            raise AttributeError(name)
        if name[:1].isupper():  # Stream, Event: the CPU's no-op classes
            return getattr(torch.cpu, name, _NoOp)
        return lambda *a, **k: 0  # memory_allocated, max_memory_reserved, reset_peak_memory_stats, ...


class _NoOp(contextlib.nullcontext):
    def __init__(self, *args, **kwargs):
        super().__init__()

    def __getattr__(self, name):
        return lambda *a, **k: None


def _register_platform() -> None:
    from verl.plugin.platform.platform_base import PlatformBase
    from verl.plugin.platform.platform_manager import PlatformRegistry

    device_module = _CPUDeviceModule()

    @PlatformRegistry.register(platform="cpu")
    class PlatformCPU(PlatformBase):
        """verl on the CPU: gloo collectives, Ray ``GPU`` slots standing for worker processes."""

        device_name = "cpu"
        vendor_name = "cpu"

        @property
        def device_module(self):
            return device_module

        def is_available(self) -> bool:
            return True

        def current_device(self):
            return torch.device("cpu")  # verl passes it to .to(...): an int would mean a CUDA device

        def device_count(self) -> int:
            return 1

        def set_device(self, device_index) -> None:
            return None

        def synchronize(self, device_index=None) -> None:
            return None

        def manual_seed(self, seed: int) -> None:
            torch.manual_seed(seed)

        def manual_seed_all(self, seed: int) -> None:
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings: str) -> None:
            return None

        def empty_cache(self) -> None:
            return None

        def get_device_capability(self, device_index: int = 0):
            return None, None

        def communication_backend_name(self) -> str:
            return "gloo"

        def visible_devices_envvar(self) -> str:
            return "CUDA_VISIBLE_DEVICES"

        @contextlib.contextmanager
        def nvtx_range(self, msg: str):
            yield

        def profiler_start(self) -> None:
            return None

        def profiler_stop(self) -> None:
            return None

        def ray_resource_name(self) -> str:
            return "GPU"

        def ray_noset_envvars(self) -> list[str]:
            return []

        def is_ipc_supported(self) -> bool:
            return False

        def cudart(self):
            return None

    # the class attributes above shadow PlatformBase's abstract properties
    PlatformCPU.__abstractmethods__ = frozenset()


def _default_gloo_process_group() -> None:
    import verl.utils.distributed as dist

    # verl builds "cpu:gloo,<device>:<backend>" = "cpu:gloo,cpu:gloo" when no backend is given
    fn = dist.initialize_global_process_group_ray
    fn.__defaults__ = (None, "gloo")


def _register_engines() -> None:
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp import transformer_impl as fsdp

    registry = EngineRegistry._engines
    for model_type, cls in (
        ("language_model", fsdp.FSDPEngineWithLMHead),
        ("value_model", fsdp.FSDPEngineWithValueHead),
    ):
        for backend in ("fsdp", "fsdp2"):
            if "cpu" not in registry.get(model_type, {}).get(backend, {}):
                EngineRegistry.register(model_type=model_type, backend=backend, device="cpu")(cls)

    base = fsdp.CPUOffloadPolicy
    if base is not None and not getattr(base, "_spear_unpinned", False):

        class UnpinnedCPUOffloadPolicy(base):
            """FSDP2's CPU offload without pinned host memory (pinning needs an accelerator)."""

            _spear_unpinned = True

            def __init__(self, pin_memory: bool = True):
                super().__init__(pin_memory=False)

        fsdp.CPUOffloadPolicy = UnpinnedCPUOffloadPolicy


def overrides(n_workers: int = 1) -> list[str]:
    """The Hydra overrides that run verl's trainer here (CPU, one Ray logical GPU per worker process)."""
    return [
        "trainer.device=cpu",
        f"trainer.n_gpus_per_node={n_workers}",
        "trainer.nnodes=1",
        f"+ray_kwargs.ray_init.num_gpus={n_workers}",
        "+ray_kwargs.ray_init.num_cpus=16",
        "actor_rollout_ref.rollout.name=hf",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        "actor_rollout_ref.actor.strategy=fsdp2",
        "actor_rollout_ref.ref.strategy=fsdp2",
        "actor_rollout_ref.actor.fsdp_config.use_torch_compile=false",
        "actor_rollout_ref.ref.fsdp_config.use_torch_compile=false",
        "actor_rollout_ref.model.use_remove_padding=false",
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "reward.num_workers=1",
        "data.dataloader_num_workers=0",
    ]


def install() -> None:
    """Registers everything above (idempotent). Runs on import."""
    check_verl_version()
    _register_platform()
    _default_gloo_process_group()
    _register_engines()
    from . import hf_rollout

    hf_rollout.register()


install()
