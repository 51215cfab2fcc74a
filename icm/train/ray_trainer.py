"""The project's one training harness: runs a Ray-free per-worker loop (``icm.train``) on Ray
Train V2 — scaling from config, checkpoints through ``ray.train.report``, automatic resume when a
run with the same name and storage path is started again, restarts after worker failures.

Loops take ``(config, session)``; ``RayTrainSession`` gives them rank, device, DDP preparation,
their batches of the run's ``Stream`` (a function of seed and epoch, read through Ray Data, resumed
at the checkpoint's position) and checkpoint save/restore. This module and ``icm.data.ray_io`` are the only
Ray adapters inside ``icm``: Ray Train workers must be able to import the harness, which a
driver-side script folder does not guarantee.
"""

from __future__ import annotations

import pickle
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import ray
import ray.data
import ray.train
import ray.train.torch
import torch
import torch.distributed
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from icm import console
from icm.data.ray_io import live_progress, quiet_ray_data
from icm.train.session import StreamSession, load_state, progress_line, save_state
from icm.train.stream import Stream, WindowRows, window_parts, worker_windows


class RayTrainSession(StreamSession):
    """Each worker reads its share of every stream (``config["streams"]``) through a Ray Data
    pipeline it builds per epoch: its windows in order, expanded and decoded by Ray Data tasks on
    the cluster's CPUs with the order preserved (``icm.train.stream``). ``in_process`` streams
    are read in the worker itself. Workers agree through ``torch.distributed`` on when an epoch
    ends and on the positions a checkpoint saves."""

    def __init__(self, config: dict, progress=None):
        ctx = ray.train.get_context()
        self._progress = progress if ctx.get_world_rank() == 0 else None   # the driver's progress line
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        if ray.get_gpu_ids() and self.device.type != "cuda":
            from icm.maa.stage import resolve_device

            resolve_device("auto")   # raises, naming the driver/build mismatch
        if not console.is_verbose():   # the streams' per-worker Ray Data pipelines: no INFO lines on the console
            quiet_ray_data()
        streams = {split: replace(s, items=ray.get(s.items)) if isinstance(s.items, ray.ObjectRef) else s
                   for split, s in (config.get("streams") or {}).items()}
        super().__init__(streams)

    def _distributed(self) -> bool:
        return self.world_size > 1 and torch.distributed.is_initialized()

    def _rows(self, split, epoch, start):
        stream = self.streams[split]
        if stream.in_process:
            return super()._rows(split, epoch, start)
        return ray_data_rows(stream, epoch, self.rank, self.world_size, start)

    def _all(self, flag):
        if not self._distributed():
            return flag
        have = torch.tensor([int(flag)], device=self.device)
        torch.distributed.all_reduce(have, op=torch.distributed.ReduceOp.MIN)
        return bool(have.item())

    def _gather(self, obj):
        if not self._distributed():
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def progress(self, done: int, total: int) -> None:
        if self._progress is not None:
            self._progress(done, total)

    def prepare(self, module):
        # Moves to the worker's device; wraps in DDP when there is more than one worker.
        return ray.train.torch.prepare_model(module)

    def _save(self, metrics, state):
        if self.rank == 0:
            print(progress_line(metrics, state is not None), flush=True)
        if state is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_state(state, tmp)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def _load(self):
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            return load_state(directory)


def ray_data_rows(stream: Stream, epoch: int, rank: int, world_size: int, start: tuple[int, int] = (0, 0)
                  ) -> Iterator[tuple[int, int, Any]]:
    """``(w, k, row)`` of worker ``rank``'s epoch from position ``start`` — what ``local_rows``
    gives, expanded and decoded by Ray Data tasks (``stream.num_cpus`` each) with the order preserved."""
    windows = worker_windows(stream, epoch, rank, world_size)
    plan = [{"parts": pickle.dumps(window_parts(stream, window), protocol=5), "rank": rank, "w": w,
             "skip": start[1] if w == start[0] else 0}
            for w, window in enumerate(windows) if w >= start[0]]
    if not plan:
        return
    ds = ray.data.from_items(plan, override_num_blocks=min(len(plan), 256)).map_batches(
        WindowRows(replace(stream, items=(), sizes=None), epoch), batch_size=None, batch_format="numpy", num_cpus=stream.num_cpus)
    ds.context.execution_options.preserve_order = True   # rows in window order: the stream is deterministic
    ds.context.enable_progress_bars = False
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
        for w, k, row in zip(batch["w"], batch["k"], batch["row"]):
            yield int(w), int(k), pickle.loads(row)


def _run_loop(loop: Callable[[dict, Any], None], progress=None):
    def train_fn(config: dict) -> None:
        loop(config, RayTrainSession(config, progress))
    return train_fn


def fit(loop: Callable[[dict, Any], None], loop_config: dict, *, name: str, storage_path: str | Path,
        streams: dict[str, Stream] | None = None, num_workers: int = 1, use_gpu: bool = False,
        cpus_per_worker: float = 1, max_failures: int = 2, keep_checkpoints: int = 2, report_to_tune: bool = False,
        label: str | None = None):
    """Run ``loop`` on Ray Train; rerunning with the same ``name``/``storage_path`` resumes, and
    a worker failure restarts the workers from the latest checkpoint (``max_failures`` times) —
    both at the saved stream positions. ``streams``: split → ``Stream`` (its items travel once
    through the object store). ``storage_path`` is a local/shared directory or a URI (``s3://…``)
    every worker can reach. ``report_to_tune``: the run is a Ray Tune trial's (Train V2 inside a
    function trainable, as Ray 2.60 documents it); every report is forwarded to the trial (ASHA
    reads them), and the sweep's driver shows the progress (``TrialProgress``). Otherwise the
    driver shows the loop's steps (``session.progress``) on one line named ``label`` (default
    ``name``). Ray Train's own INFO lines stay in its log files and the dashboard unless
    ``--verbose``."""
    callbacks = []
    if report_to_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    config = dict(loop_config)
    if streams:
        config["streams"] = {split: replace(s, items=ray.put(list(s.items))) for split, s in streams.items()}

    def run(progress=None):
        trainer = TorchTrainer(
            _run_loop(loop, progress), train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": cpus_per_worker}),
            run_config=RunConfig(name=name, storage_path=str(storage_path) if "://" in str(storage_path)
                                 else str(Path(storage_path).resolve()),
                                 failure_config=FailureConfig(max_failures=max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints), callbacks=callbacks,
                                 logging_config=LoggingConfig(log_level="INFO" if console.is_verbose() else "WARNING")))
        return trainer.fit()

    if report_to_tune:
        return run()
    with live_progress(f"training {label or name}", "steps") as progress:
        return run(progress)


def report_trial(metrics: dict) -> None:
    """A Ray Tune trial's final result (the RD point of its codec)."""
    from ray import tune

    tune.report(metrics)


def final_state(result) -> dict:
    """The state saved with a finished run's latest checkpoint."""
    if result.checkpoint is None:
        raise RuntimeError(f"training run {result.path} finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        return load_state(directory)


def per_rate_point_asha(cfg: dict, max_steps: int):
    """ASHA early stopping among the trials of one rate point only: RD losses at different λ
    (or quality) are not comparable, so each rate point gets its own ASHA bracket.
    ``cfg``: ``{metric: loss, grace_period: steps, reduction_factor: 2}``."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    def make():
        return ASHAScheduler(time_attr="step", metric=cfg.get("metric", "loss"), mode="min", max_t=max_steps,
                             grace_period=int(cfg.get("grace_period", max(1, max_steps // 4))),
                             reduction_factor=float(cfg.get("reduction_factor", 2)))

    class PerRatePointScheduler(FIFOScheduler):
        def __init__(self):
            super().__init__()
            self.groups: dict = {}

        def _asha(self, trial):
            return self.groups.setdefault(trial.config["rate_point"], make())

        def set_search_properties(self, metric, mode, **spec):
            return True

        def on_trial_add(self, tune_controller, trial):
            self._asha(trial).on_trial_add(tune_controller, trial)

        def on_trial_result(self, tune_controller, trial, result):
            return self._asha(trial).on_trial_result(tune_controller, trial, result)

        def on_trial_complete(self, tune_controller, trial, result):
            self._asha(trial).on_trial_complete(tune_controller, trial, result)

        def on_trial_remove(self, tune_controller, trial):
            self._asha(trial).on_trial_remove(tune_controller, trial)

        def on_trial_error(self, tune_controller, trial):
            self._asha(trial).on_trial_error(tune_controller, trial)

    return PerRatePointScheduler()


def trial_progress(label: str, trial_count: int, steps_per_trial: int):
    """A Ray Tune callback (run on the sweep's driver) that shows the sweep on one line: training
    steps over all trials (each trial's reports carry its ``step``), and trials finished."""
    from ray import tune

    class TrialProgress(tune.Callback):
        def __init__(self):
            self.steps: dict[str, int] = {}
            self.finished: set[str] = set()
            self.line: console.Progress | None = None

        def _show(self) -> None:
            done = sum(self.steps.values())
            note = f"{len(self.finished)}/{trial_count} trials finished"
            if self.line is None:
                self.line = console.Progress(label, trial_count * steps_per_trial, "steps", start=done, note=note)
            self.line.update(done, note=note)

        def on_trial_result(self, iteration, trials, trial, result, **info):   # Tune passes these by name
            if "step" not in result:      # the trial's evaluation report: its training steps stay counted
                return
            step = min(int(result["step"]), steps_per_trial)
            self.steps[trial.trial_id] = max(self.steps.get(trial.trial_id, 0), step)   # a restart re-reports
            self._show()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.steps[trial.trial_id] = steps_per_trial
            self.finished.add(trial.trial_id)
            self._show()

        def on_experiment_end(self, trials, **info):
            if self.line is not None:
                self.line.close()

        def __getstate__(self):   # Tune stores its run config with the experiment; the line is this process's
            return {"steps": self.steps, "finished": self.finished}

        def __setstate__(self, state):
            self.__dict__.update(state, line=None)

    return TrialProgress()
