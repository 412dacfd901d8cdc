"""The whole training step as one CUDA graph (`train.cuda_graph`).

A small network on a fast GPU is bound by kernel launches and Python, not by arithmetic: a
step launches dozens of kernels whose work takes a fraction of the time spent launching them.
Here the forward pass, the backward pass, gradient clipping, the optimizer
step and the loss bookkeeping are recorded once into a CUDA graph and replayed for every full
batch, one launch each. Batches are copied into the graph's static input tensors; a batch of
another size (the last one of an epoch) runs eagerly on the same parameters and optimizer state.

What makes the step capturable:
- the learning rate lives in a device tensor. PyTorch's schedulers fill a tensor learning rate
  in place, so they run as usual between replays; the optimizer (Adam, AdamW or SGD) reads it
  on the device. Adam's betas and SGD's momentum are plain numbers baked into the graph, so
  OneCycle's momentum cycling cannot apply (the config refuses it);
- no GradScaler (fp16 is refused: its step keeps state in Python), no closure (LBFGS is
  refused), no torch.compile;
- autocast without its weight cache; three eager warm-up steps on a side stream first, so that
  the optimizer state and the libraries' workspaces exist before the capture.
The loss sum, the step count and the first non-finite step are accumulated on the device, in
the graph, and read once per epoch, as in the eager loop.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

WARMUP_STEPS = 3
log = logging.getLogger("trainyard.train")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def place_step_counters(optimizer: torch.optim.Optimizer) -> None:
    """Fused and capturable optimizers keep their step counters as float32 beside the parameters;
    move any that are elsewhere (a state loaded from a run that used neither)."""
    for group in optimizer.param_groups:
        if not (group.get("fused") or group.get("capturable")):
            continue
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            step = state.get("step")
            if isinstance(step, torch.Tensor) and step.device != p.device:
                state["step"] = step.to(device=p.device, dtype=torch.float32)


def tensor_learning_rates(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Put each group's learning rate in a one-element tensor on `device` (schedulers then fill it in
    place) and mark the groups capturable where the optimizer has the option."""
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
        if "capturable" in group and device.type == "cuda":
            group["capturable"] = True
    place_step_counters(optimizer)


class GraphedStep:
    """Training steps on CUDA: eager warm-up, one capture, replays. Call it once per batch;
    `begin_epoch` and `end_epoch` bracket an epoch's steps."""

    def __init__(
        self,
        parameters: Iterable[nn.Parameter],
        compute_loss: LossFn,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        batch_size: int,
        grad_clip: float = 0.0,
    ):
        self.compute_loss, self.optimizer = compute_loss, optimizer
        self.device, self.batch_size, self.grad_clip = device, batch_size, grad_clip
        self.params = [p for p in parameters if p.requires_grad]
        tensor_learning_rates(optimizer, device)
        self.total = torch.zeros((), device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.steps = torch.zeros((), dtype=torch.long, device=device)
        self.seen = 0
        self.warm = 0
        self.replay: Callable[[], None] | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.side: torch.cuda.Stream | None = None
        self.static_x: torch.Tensor | None = None
        self.static_y: torch.Tensor | None = None
        self.replays = 0
        self.eager_steps = 0
        self.failed = False  # the capture failed: every step runs eagerly

    # -- bookkeeping ----------------------------------------------------------------------------

    def begin_epoch(self) -> None:
        # in place: the graph holds these very tensors
        self.total.zero_()
        self.first_bad.fill_(-1)
        self.steps.zero_()
        self.seen = 0

    def end_epoch(self) -> tuple[float, int, int]:
        """(mean training loss, first non-finite step or -1, steps): the epoch's one read."""
        total, first_bad, steps = torch.stack([self.total, self.first_bad.float(), self.steps.float()]).tolist()
        return total / max(self.seen, 1), int(first_bad), int(steps)

    # -- the step -------------------------------------------------------------------------------

    def _body(self, x: torch.Tensor, y: torch.Tensor) -> None:
        loss = self.compute_loss(x, y)
        loss.backward()
        if self.grad_clip:
            nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        loss = loss.detach()
        self.steps += 1
        self.first_bad.copy_(torch.where((self.first_bad < 0) & ~torch.isfinite(loss), self.steps, self.first_bad))
        self.total += loss * y.shape[0]

    @contextlib.contextmanager
    def _side_stream(self) -> Iterator[None]:
        """Warm-up steps run on a side stream, as PyTorch's CUDA graph notes ask."""
        if self.side is None:  # one stream for every warm-up step, as in PyTorch's example
            self.side = torch.cuda.Stream(self.device)
        side = self.side
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            yield
        torch.cuda.current_stream(self.device).wait_stream(side)

    def _record(self, step: Callable[[], None]) -> Callable[[], None]:
        """Record `step` into a CUDA graph without running it; return what replays it."""
        graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader's pin-memory thread may keep using CUDA during the capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            step()
        self.graph = graph  # kept alive with its memory pool
        return graph.replay

    def _eager(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with warnings.catch_warnings():
            # Adam warns once that capturable=True runs slower outside a graph: these steps are meant to.
            warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
            if self.replay is None:
                self.optimizer.zero_grad(set_to_none=True)
                with self._side_stream():
                    self._body(x, y)
            else:
                # The graph owns the gradient tensors: zero them in place, never drop them.
                for p in self.params:
                    if p.grad is not None:
                        p.grad.zero_()
                self._body(x, y)
        self.eager_steps += 1

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.seen += y.shape[0]
        if self.failed or x.shape[0] != self.batch_size or (self.replay is None and self.warm < WARMUP_STEPS):
            self.warm += x.shape[0] == self.batch_size
            self._eager(x, y)
            return
        if self.replay is None:
            self.static_x, self.static_y = x.clone(), y.clone()
            self.optimizer.zero_grad(set_to_none=True)  # the graph's backward allocates them
            try:
                self.replay = self._record(lambda: self._body(self.static_x, self.static_y))
            except Exception as exc:  # e.g. a model with an operation graphs cannot hold
                first_line = str(exc).splitlines()[0] if str(exc) else ""
                log.warning(
                    "train.cuda_graph: the step could not be recorded (%s: %s); training eagerly",
                    type(exc).__name__,
                    first_line,
                )
                self.failed = True
                self.graph = None
                self.optimizer.zero_grad(set_to_none=True)  # whatever the failed capture left
                self._eager(x, y)
                return
        else:
            self.static_x.copy_(x)
            self.static_y.copy_(y)
        self.replay()
        self.replays += 1
