"""--profile: which iterations of which ranks are profiled, and how (Megatron-LM's flags).

Iterations are counted as the log lines count them (from 1); ``--profile-step-start S
--profile-step-end E`` profiles iterations S+1 .. E, as Megatron-LM's Nsight Systems path
does (its capture starts before the iteration after S and stops after E). Counts are global:
a run resumed past E profiles nothing.

* ``--use-pytorch-profiler``: ``torch.profiler`` records iteration S as warm-up (when this
  run runs it) and S+1 .. E; the trace is written when iteration E ends, through
  ``torch.profiler.tensorboard_trace_handler`` into ``--profile-dir`` (default
  ``--tensorboard-dir``, where Megatron-LM of megatron-core 0.16's time writes it) as
  ``rank<R>.<time>.pt.trace.json``: open it in Perfetto (ui.perfetto.dev), chrome://tracing or
  TensorBoard's profile plugin. FPDT's phases are named ranges in it (:mod:`fpdt_ext.profiling`),
  as are the step's forward-backward, all-grads-sync and optimizer.
* otherwise (GPU only): ``cudaProfilerStart`` before iteration S+1 and ``cudaProfilerStop``
  after E, for ``nsys profile --capture-range=cudaProfilerApi``, with the same ranges as NVTX
  ranges meanwhile. This path has not run on a GPU yet.
"""

from __future__ import annotations

from typing import Optional

import torch

from fpdt_ext import profiling


class StepProfiler:
    """Started and stopped by the training loop around each iteration; idle on ranks not in
    --profile-ranks and when --profile is off."""

    def __init__(self, config, *, rank: int, first_iteration: int, device: Optional[torch.device] = None):
        """``config``: an ObservabilityConfig; ``first_iteration``: the iteration this run starts
        after (0, or a resumed run's)."""
        self.start, self.end = config.profile_step_start, config.profile_step_end
        self.torch_profiler = None
        self.nsys = False
        self.active = (config.profile and rank in config.profile_ranks and first_iteration < self.end)
        if not self.active:
            return
        if config.use_pytorch_profiler:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device is not None and torch.device(device).type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            # step() before each iteration: after k steps, iteration first_iteration + k runs;
            # the warm-up is iteration S (or, resumed past S, the step before the first iteration)
            self.torch_profiler = torch.profiler.profile(
                activities=activities,
                schedule=torch.profiler.schedule(wait=max(self.start - first_iteration, 0), warmup=1,
                                                 active=self.end - max(self.start, first_iteration), repeat=1),
                on_trace_ready=torch.profiler.tensorboard_trace_handler(config.trace_dir, worker_name=f"rank{rank}"))
            self.torch_profiler.start()
        else:
            self.nsys = True

    def before_iteration(self, iteration: int) -> None:
        """``iteration`` (from 1) is about to run."""
        if self.torch_profiler is not None:
            self.torch_profiler.step()
        elif self.nsys and iteration > self.start and not profiling.nvtx_on():
            torch.cuda.check_error(torch.cuda.cudart().cudaProfilerStart())
            profiling.set_nvtx(True)

    def after_iteration(self, iteration: int) -> None:
        if self.active and iteration >= self.end:
            self.close()

    def close(self) -> None:
        """Stop (writing the trace) if still recording: at iteration E, or when the run ends first."""
        if self.torch_profiler is not None:
            self.torch_profiler.stop()
            self.torch_profiler = None
        if self.nsys and profiling.nvtx_on():
            profiling.set_nvtx(False)
            torch.cuda.check_error(torch.cuda.cudart().cudaProfilerStop())
        self.active = self.nsys = False
