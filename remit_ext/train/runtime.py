"""What every training stage shares: the process group, atomic checkpoints, the JSONL metrics
log, progress bars and interruption handling.

A stage writes into its own directory::

    config.json      the stage's resolved configuration (a resumed run must match it)
    checkpoint.pt    the latest training state (model, optimizer, step), replaced atomically
    metrics.jsonl    one JSON object per logged step
    final.pt         the finished model; its presence marks the stage as done

Launched by ``torchrun`` (``WORLD_SIZE`` > 1), a stage runs under DistributedDataParallel
(gloo on CPU, nccl on GPU): every rank computes its shard of each global batch, rank 0 alone
writes files. ``midtrain --fsdp / --tp N / --cp N`` runs on a (dp, cp, tp) device mesh instead
(``parallel_setup.ParallelDist``, which overrides the sharded-model hooks below).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from .. import _files

CHECKPOINT, FINAL, METRICS, CONFIG = "checkpoint.pt", "final.pt", "metrics.jsonl", "config.json"


class Dist:
    """This process's place in the job; a single process when not launched by torchrun."""

    def __init__(self, device: Optional[str] = None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            if local >= torch.cuda.device_count():
                raise ValueError(f"--device cuda: local rank {local} needs GPU {local}, but "
                                 f"{torch.cuda.device_count()} GPU(s) are visible; start at most "
                                 f"one process per GPU (or pass --device cpu for gloo)")
            self.device = torch.device("cuda", local)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.owns_group = self.world > 1 and not dist.is_initialized()
        if self.owns_group:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (the batch size must divide by the world size)."""
        if x.shape[0] % self.world:
            raise ValueError(f"batch: expected a size divisible by the world size {self.world}, "
                             f"got {x.shape[0]}")
        return x[self.rank::self.world]

    def mean(self, value: float) -> float:
        """The mean over ranks of a per-rank scalar (for logging)."""
        if self.world == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world

    # Hooks for a sharded model (remit_ext.train.parallel_setup.ParallelDist overrides them;
    # there every rank must call them: they gather).
    def full_state(self, model: nn.Module) -> Optional[dict]:
        """The model's full state dict (rank 0 writes it)."""
        return unwrap(model).state_dict()

    def eval_model(self, model: nn.Module) -> Optional[nn.Module]:
        """The model rank 0 evaluates."""
        return unwrap(model)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> Optional[dict]:
        """The optimizer state a checkpoint holds (None: a sharded run, not resumable)."""
        return optimizer.state_dict()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temporary files a killed writer of ``path`` left beside it (our own pattern
    ``.<name>.tmp<pid>``; ``_files.remove_stale_temps``). Returns what was removed."""
    path = Path(path)
    return _files.remove_stale_temps(path, f".{path.name}.tmp*",
                                     re.escape(f".{path.name}.tmp") + r"(\d+)")


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``: a
    reader (or a resumed run) sees the old file or the new one, never a torn one. Temporary
    files of a killed earlier writer of ``path`` are removed first (``remove_stale_temps``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(text: str, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


_DIST: Optional[Dist] = None


def get_dist(device: Optional[str] = None) -> Dist:
    """The process's Dist. The process group is set up once and torn down at exit, so that the
    flywheel can run several stages in one torchrun job; a single process may ask for another
    device from stage to stage."""
    global _DIST
    if _DIST is None:
        _DIST = Dist(device)
        atexit.register(_DIST.close)
    elif device is not None and torch.device(device).type != _DIST.device.type:
        if _DIST.world > 1:
            raise ValueError(f"--device {device}: this distributed job runs on "
                             f"{_DIST.device.type}")
        return Dist(device)
    return _DIST


def step_generator(seed: int, stage: str, step: int, rank: int = 0,
                   device: torch.device | str = "cpu") -> torch.Generator:
    """Randomness for one step derived from (seed, stage, step, rank) alone, so a resumed run
    draws exactly what the uninterrupted run would have drawn, without saving RNG state."""
    # hashlib, not hash(): str hashes are salted per process.
    digest = hashlib.sha256(f"{seed}/{stage}/{step}/{rank}".encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)
    return g


# Preset fields no stage reads: the flywheel turns post_rl_steps into the post-RL stage's own
# rl_steps (which is compared), so changing it reuses every finished stage it does not affect.
NO_STAGE_READS = ("post_rl_steps",)


class StageRun:
    """Bookkeeping for one stage in ``out_dir``: resume, log, checkpoint, finish."""

    def __init__(self, out_dir: Path, stage: str, config: dict, d: Dist, total_steps: int,
                 ckpt_every: int, progress: bool = True):
        self.dir, self.stage, self.config, self.d = Path(out_dir), stage, config, d
        self.total, self.ckpt_every = total_steps, max(1, ckpt_every)
        self.progress = progress
        # Tensors a stage accumulates over its run (saved in checkpoints, restored in place).
        self.extra_state: dict[str, torch.Tensor] = {}
        if d.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def done(self) -> bool:
        """Whether the stage has finished in this directory *with this configuration*: a
        finished stage of another configuration (another preset field, another init) is
        refused, never reused under the new one's name."""
        if not (self.dir / FINAL).exists():
            return False
        self._check_config()
        return True

    def _check_config(self) -> bool:
        """Refuse a directory whose saved configuration differs from this run's; returns
        whether a configuration was saved there."""
        cfg_path = self.dir / CONFIG
        if not cfg_path.exists():
            return False
        saved = json.loads(cfg_path.read_text())
        mine = json.loads(json.dumps(self.config))
        for key in NO_STAGE_READS:  # never part of what a stage computed
            saved.pop(key, None)
            mine.pop(key, None)
        if saved != mine:
            changed = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
            raise ValueError(
                f"out: {self.dir} holds a {saved.get('stage', '?')} run with another "
                f"configuration (differs in {changed}); use a new --out directory or "
                f"--overwrite")
        return True

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
        """Load the latest checkpoint if there is one; returns the first step to run."""
        cfg_path = self.dir / CONFIG
        if not self._check_config() and self.d.is_main:
            atomic_write_text(json.dumps(self.config, indent=2, sort_keys=True), cfg_path)
        start = 0
        ckpt = self.dir / CHECKPOINT
        if ckpt.exists():
            state = load(ckpt)
            if state.get("optimizer") is None:
                raise ValueError(f"out: {ckpt} was written by a --fsdp / --tp run, which "
                                 f"cannot resume (its optimizer state was sharded); use "
                                 f"--overwrite")
            unwrap(model).load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            for k, v in state.get("extra_state", {}).items():
                self.extra_state[k].copy_(v)
            start = state["step"]
        if self.d.is_main:
            self._truncate_log(start)
        self.d.barrier()
        return start

    def _truncate_log(self, start: int) -> None:
        """Drop log lines past the checkpoint: the resumed run will log those steps again."""
        path = self.dir / METRICS
        if not path.exists():
            return
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        keep = []
        for i, ln in enumerate(lines):
            try:
                record = json.loads(ln)
            except json.JSONDecodeError as err:
                if i == len(lines) - 1:
                    # A kill, a power cut or a full disk mid-append tears the last line only:
                    # drop it (its step is past the checkpoint, or is logged again).
                    print(f"resume: dropped the torn last line of {path} ({err.msg}: "
                          f"{ln[:80]!r})", file=sys.stderr)
                    continue
                raise ValueError(f"out: {path} line {i + 1} is not JSON ({err.msg}) and is not "
                                 f"the last line; the log is damaged, use --overwrite") from err
            if record.get("step", 0) <= start:
                keep.append(ln)
        atomic_write_text("".join(k + "\n" for k in keep), path)

    def log(self, record: dict) -> None:
        if not self.d.is_main:
            return
        record = {"stage": self.stage, **record, "time": round(time.time(), 3)}
        with open(self.dir / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        model_state = self.d.full_state(model)
        optim_state = self.d.optimizer_state(optimizer)
        if self.d.is_main:
            atomic_save({"stage": self.stage, "step": step, "model": model_state,
                         "optimizer": optim_state, "config": self.config,
                         "extra_state": self.extra_state},
                        self.dir / CHECKPOINT)
        self.d.barrier()

    def finish(self, model: nn.Module, extra: Optional[dict] = None) -> None:
        model_state = self.d.full_state(model)
        if self.d.is_main:
            atomic_save({"stage": self.stage, "model": model_state,
                         "model_config": unwrap(model).cfg.to_dict(), "config": self.config,
                         **(extra or {})}, self.dir / FINAL)
            # The finished model supersedes the training state (final.pt exists first).
            (self.dir / CHECKPOINT).unlink(missing_ok=True)
        self.d.barrier()

    @contextlib.contextmanager
    def steps(self, start: int, model: nn.Module,
              optimizer: torch.optim.Optimizer) -> Iterator[Iterator[int]]:
        """Yields the step numbers to run. Saves a checkpoint every ``ckpt_every`` steps, and
        on SIGTERM or Ctrl-C after the step in flight completes, then exits with status 130."""
        state = {"last": start, "stop": False}

        def request_stop(signum, frame):
            state["stop"] = True

        old = signal.signal(signal.SIGTERM, request_stop)
        old_int = signal.signal(signal.SIGINT, request_stop)
        bar = None
        if self.progress and self.d.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total, initial=start, desc=self.stage, dynamic_ncols=True,
                       mininterval=1.0, leave=False)

        def gen():
            for step in range(start, self.total):
                yield step
                state["last"] = step + 1
                if bar is not None:
                    bar.update(1)
                if state["stop"]:
                    break
                if state["last"] % self.ckpt_every == 0 and state["last"] < self.total:
                    self.save(state["last"], model, optimizer)

        try:
            yield gen()
        finally:
            signal.signal(signal.SIGTERM, old)
            signal.signal(signal.SIGINT, old_int)
            if bar is not None:
                bar.close()
        if state["stop"]:
            self.save(state["last"], model, optimizer)
            raise SystemExit(130)
