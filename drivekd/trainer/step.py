"""One optimizer step of Drive-KD training, as named functions, shared by the trainer and the planner.

In the order things happen (drivekd/trainer/loop.py reads the same way):

    for each of grad_accum micro-steps:   micro_step(batch)
        forward()    one student forward with head-mean attention captured at the loss layers;
                     the K row losses (CE, then each teacher term) against the teacher targets
        backward()   one backward per active row into its own gradient row (retain_graph between
                     them), or one backward of the weighted sum on the fast path
        combine()    [data parallel: all-reduce the K x N rows first] AGP / G1 / G2 / none of the
                     rows, added into the flat gradient
    average()        mean over the micro-steps
    clip()           global gradient norm
    optimizer step   AdamW (the loop then steps the schedule, re-weights and logs)

Why one forward + retain_graph rather than one forward per loss: every loss needs the same forward
(the attention losses read maps of the same pass whose logits give the CE), so recomputing it per
loss would cost K-1 extra forwards for nothing; the retained activations are the ones the first
backward needs anyway, so peak memory is about the same. Attention-loss backwards stop at their
layer (a layer-0 perception loss never reaches the upper decoder or the LM head).

With --projection none and no re-weighting nothing needs per-loss gradients: one backward of the
weighted sum (the fast path; per-loss gradient norms are not logged). On the logged steps the loop
picks for --contribution (--contribution-every), the first micro-step instead gets the per-loss
Gram from the Gram engine and one backward of the same sum (lambda = 1 per active row), so the
rows' shares of the update are logged.

Everything here also runs on fake tensors (drivekd/planner): no `.item()`, `.tolist()`,
`bool(tensor)` or `float(tensor)` on a value computed from the weights. The only data-dependent
decisions (skip or stop on a non-finite loss or gradient) go through `HostChecks`, which the
planner replaces with `AssumeFinite`; metrics are read on the host by the loop, outside this module.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
import torch

from drivekd.distributed import Dist
from drivekd.errors import DriveKDError
from drivekd.families.capture import capture_attention, decoder_layers
from drivekd.losses.attention import answer_positions, token_ce
from drivekd.projection import GradBuffers, GramEngine, coefficients, combine, gram
from drivekd.optim.precision import make_optimizer as _make_optimizer
from drivekd.optim.precision import param_dtype
from drivekd.terms import TermForward, term_of
from drivekd.trainer.data import Batch
from drivekd.trainer.fsdp import ShardedGrads, grad_norm_clip_, per_unit_gather, shard_student


class HostChecks:
    """The step's only host syncs on computed values: finiteness checks that decide skip-or-stop."""

    def finite_samples(self, per_sample: torch.Tensor) -> list[bool]:
        """(K, B) per-sample losses -> B booleans: every loss of the sample is finite."""
        return torch.isfinite(per_sample).all(0).tolist()

    def finite(self, t: torch.Tensor) -> bool:
        return bool(torch.isfinite(t).all())


class AssumeFinite(HostChecks):
    """For a run on fake tensors (no values): every loss and gradient is taken as finite."""

    def finite_samples(self, per_sample: torch.Tensor) -> list[bool]:
        return [True] * per_sample.shape[1]

    def finite(self, t: torch.Tensor) -> bool:
        return True


class FlatGrads:
    """The parameters' accumulated gradient as one flat (N,) buffer; each `.grad` is a view.

    Its dtype is the parameters' (autograd accumulates in place only into a `.grad` of the
    parameter's dtype): fp32 for --precision fp32, bf16 for the bf16 modes. Why bf16 there rather
    than an fp32 buffer beside bf16 `.grad`s: an fp32 flat gradient would need a transient bf16
    gradient set per backward as well (4 + 2 bytes/parameter against 2: 22 GiB against 7 GiB for
    a 3.75B student); what bf16 accumulation loses (relative 2^-9 per addition of --grad-accum
    micro-steps, or of the combined K rows) is far below the gradient's own sampling noise, and
    the bf16 optimizers read the gradient in bf16 anyway (BF16AdamW upcasts it per chunk).

    `combine(..., accumulate_into=flat)` then adds the combined gradient with no extra N-vector,
    the data-parallel fast path reduces one tensor, and `GradBuffers.backward` (which points the
    `.grad`s at its rows during a per-loss backward) restores these views afterwards.
    """

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        self.views, o = [], 0
        for p in params:
            self.views.append(self.flat[o : o + p.numel()].view_as(p))
            o += p.numel()
        for p, v in zip(params, self.views):
            p.grad = v

    def check(self) -> None:
        """Autograd accumulates in place into existing grads; make sure it did (not replaced them)."""
        if any(p.grad is None or p.grad.data_ptr() != v.data_ptr() for p, v in zip(self.params, self.views)):
            raise RuntimeError("a parameter's .grad is no longer a view of the flat gradient buffer")


@dataclass
class Losses:
    """One forward's losses."""

    rows: list[torch.Tensor]  # K scalars with graph: CE, then each term's mean_b M[c_b, k] * L_k,b (unweighted)
    per_sample: torch.Tensor  # (K, B) detached, unmixed
    mixw: torch.Tensor  # (B, terms) mixing weights M[c_b, k]


@dataclass
class Micro:
    """What one micro-step leaves for the metrics (tensors; the loop reads them on the host)."""

    losses: Losses | None  # None when the micro-batch was skipped
    active: list[bool]  # rows active on some rank
    info: dict | None  # combine()'s info ("gram", "coef" = lambda, "fired") when per-loss rows were combined or measured
    skipped: list[str]  # sample ids skipped (non-finite, --skip-nonfinite)


def choose_engine(cfg, params: list[torch.nn.Parameter], K: int, device: torch.device,
                  device_memory: int | None = None) -> tuple[str, str]:
    """--grad-engine: rows | gram | auto, and why. auto keeps the rows (faster: each per-loss
    backward stops where its loss starts) while K rows take at most a quarter of the device's
    memory (`device_memory`, default: the GPU's), and switches to the Gram engine beyond (a 1B
    student's four fp32 rows are 14 GiB). On a CPU the process shares the host's memory: rows."""
    if cfg.grad_engine != "auto":
        return cfg.grad_engine, f"--grad-engine {cfg.grad_engine}"
    rows_bytes = K * sum(p.numel() for p in params) * torch.finfo(getattr(torch, cfg.grad_buffer_dtype)).bits // 8
    if device_memory is None and device.type == "cuda":
        device_memory = torch.cuda.get_device_properties(device).total_memory
    if device_memory is None:
        return "rows", f"auto: rows ({rows_bytes / 2**30:.2f} GiB) on {device.type}, whose memory the process shares"
    if rows_bytes <= device_memory / 4:
        return "rows", f"auto: {K} rows take {rows_bytes / 2**30:.2f} GiB, <= 1/4 of the device's {device_memory / 2**30:.0f} GiB"
    return "gram", (f"auto: {K} rows would take {rows_bytes / 2**30:.2f} GiB, > 1/4 of the device's {device_memory / 2**30:.0f} GiB "
                    "(the Gram engine holds no rows but its steps are slower: every loss runs through every layer below its cut)")


def cut_layer(plan, L: int) -> int | None:
    """The decoder layer whose input the Gram engine's forward cuts (None: the LM head's input):
    the first above the deepest layer a loss reads (captured attention, hidden states). Above it
    only the losses that read the top (CE, KL) have a gradient, so the K-batched backward would
    carry K - |S| rows of zeros through those layers. The choice only moves work, never the result
    (GramEngine.gram is exact for any cut)."""
    read = plan.student_layers + plan.hidden_layers
    if not read or max(read) + 1 >= L:
        return None
    return max(read) + 1


def cut_module(model, plan) -> torch.nn.Module:
    """The module whose input `cut_layer` names: that decoder layer, or the LM head."""
    layers = decoder_layers(model)
    c = cut_layer(plan, len(layers))
    return model.get_output_embeddings() if c is None else layers[c]


def hidden_projection(plan, model, device) -> torch.nn.Module | None:
    """The trainable state a term owns beyond the student (`Term.make_state`: the hidden term's
    projection), None without one; seeded by torch's RNG like the model's init. One term per run
    may own state (the step checkpoints keep it under "projection"); the recipes have at most one."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    states = [m for t in plan.terms if (m := term_of(t).make_state(t, int(cfg.hidden_size))) is not None]
    if len(states) > 1:
        raise DriveKDError(f"{len(states)} teacher terms own trainable state; a run holds one (the step's projection)")
    return states[0].to(device) if states else None


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float, precision: str = "fp32",
                   seed: int = 0) -> torch.optim.Optimizer:
    """AdamW for --precision (drivekd/optim/precision.py): torch's on fp32 weights, else BF16AdamW."""
    return _make_optimizer(params, lr, weight_decay, precision, seed)


class TrainStep:
    """The step's state (flat gradient, per-loss rows, optimizer) and its parts.

    `plan` is a RunPlan (terms, row names, mixing); `autocast_dtype` None runs in fp32.
    --precision bf16-*: the model is cast to bf16 here (a no-op when loaded so), the flat gradient
    is bf16, the optimizer is BF16AdamW, and the forward runs under bf16 autocast (the weights are
    bf16; autocast casts the fp32 inputs such as pixel values, and keeps the losses in fp32).
    """

    def __init__(self, model, plan, dist: Dist, autocast_dtype: torch.dtype | None, checks: HostChecks | None = None,
                 device_memory: int | None = None):
        cfg = plan.cfg
        self.model, self.plan, self.cfg, self.dist = model, plan, cfg, dist
        self.device = dist.device
        self.autocast_dtype = autocast_dtype
        self.checks = checks or HostChecks()
        wdtype = param_dtype(getattr(cfg, "precision", "fp32"))
        if any(p.dtype != wdtype for p in model.parameters() if p.is_floating_point()):
            model.to(wdtype)  # in place: the Parameter objects (and tied weights) stay the same
        if wdtype == torch.bfloat16 and autocast_dtype is None:
            self.autocast_dtype = torch.bfloat16
        # --recipe hidden: the learned student -> teacher width maps, trained with the student (same
        # optimizer, gradient rows and projection), saved in step checkpoints, never in the model files.
        # In the weights' dtype: the flat gradient holds every trainable parameter in one dtype.
        self.projection = hidden_projection(plan, model, self.device)
        # --fsdp: the student sharded over the ranks (drivekd/trainer/fsdp.py); its parameters are DTensors.
        self.fsdp = bool(getattr(cfg, "fsdp", False))
        if self.fsdp:
            model = self.model = shard_student(model, self.device, dist.world)
        if self.projection is not None:
            self.projection.to(wdtype)
        self.params = [p for p in model.parameters() if p.requires_grad] + (list(self.projection.parameters()) if self.projection else [])
        self.K = len(plan.row_names)
        # Per-loss rows are needed for a projection, for re-weighting (per-loss gradient norms),
        # or not at all (fast path: one backward of the weighted sum).
        self.per_loss = self.K > 1 and (cfg.projection != "none" or cfg.dynamic_weights)
        self.grads = ShardedGrads(self.params) if self.fsdp else FlatGrads(self.params)
        # Per-loss gradients come from one of two engines (equal updates): K gradient rows
        # (K x N floats, fastest) or the Gram engine (the K x K Gram folded parameter by parameter
        # in one K-batched backward, then one backward of the lambda-weighted sum; no rows).
        self.engine, self.engine_reason = choose_engine(cfg, self.params, self.K, self.device, device_memory) if self.per_loss else ("none", "")
        if self.fsdp and self.per_loss:  # the Gram engine is refused with --fsdp (settings.py; fsdp.py says why)
            self.engine, self.engine_reason = "rows", f"--fsdp: {self.K} sharded rows, 1/{dist.world} of the parameters each per rank"
        self.bufs = None
        self.gram_engine = None
        if self.engine == "rows" and self.fsdp:
            self.bufs = torch.zeros(self.K, self.grads.n, dtype=self.grads.flat.dtype, device=self.grads.flat.device)
        elif self.engine == "rows":
            self.bufs = GradBuffers(self.params, self.K, dtype=getattr(torch, cfg.grad_buffer_dtype))
        elif self.engine == "gram":
            self.gram_engine = GramEngine(self.params, reduce=self.dist.mean_ if self.dist.world > 1 else None)
            # The Gram engine backpropagates what lies above the deepest loss layer (the upper
            # decoder layers and the LM head's vocabulary matmuls) once per loss that reads it
            # instead of K-batched: during the step's forward that module runs on a cut of its
            # input, (h, leaf) kept in self._cut (GramEngine.gram's `cut`).
            cut_module(model, plan).register_forward_pre_hook(self._cut_input, with_kwargs=True)
        self._cutting = False
        self._cut: tuple[torch.Tensor, torch.Tensor] | None = None
        self._gram_info: dict | None = None
        self.share_engine: GramEngine | None = None  # fast path: per-loss Gram on logged steps (built on first use)
        self.optimizer = make_optimizer(self.params, cfg.lr, cfg.weight_decay, getattr(cfg, "precision", "fp32"), cfg.seed)

    # ----- one micro-step -----
    def row_activity(self, weights: list[float], mixw: torch.Tensor) -> tuple[list[bool], list[bool]]:
        """(active on some rank, active here) per row: weight > 0 and, for a teacher term, some
        sample's mixing weight > 0. `mixw` comes from the batch's capability labels (host data)."""
        has = (mixw > 0).any(0).tolist()
        local = [weights[0] > 0] + [weights[k + 1] > 0 and bool(has[k]) for k in range(self.K - 1)]
        return self.dist.any_each(local), local

    def forward(self, batch: Batch, maps: dict[int, torch.Tensor]) -> Losses:
        """Forward + losses, inside a `capture_attention` block whose dict is `maps`."""
        inputs, dev = batch.inputs, self.device
        self._maps = maps  # --fsdp's backwards hook the captured maps (fsdp.per_unit_gather)
        am = inputs.tensors["attention_mask"].bool()
        labels = inputs.padded("labels").to(dev)
        keep, ce_targets = answer_positions(labels)  # logits of the answer span only: (B, P, V)
        text = inputs.padded("text").to(dev)  # (B, T) X
        vision = inputs.padded("vision").to(dev)  # (B, T) V
        mixw = self.plan.mix_weights(batch.capabilities).to(dev)  # (B, terms)
        hidden = {"output_hidden_states": True} if self.plan.hidden_layers else {}
        self._cut, self._cutting = None, self.engine == "gram"
        try:
            with self.autocast():
                out = self.model(**inputs.tensors, logits_to_keep=keep, use_cache=False, **hidden)
        finally:
            self._cutting = False
        ce = token_ce(out.logits, ce_targets)  # (B,)
        per_sample, rows = [ce], [ce.mean()]
        fw = TermForward(out, maps, text, vision, am, self.cfg, self.autocast, self.projection)
        for k, term in enumerate(self.plan.terms):
            lk = term_of(term).loss(term, fw, batch.targets[term.name])  # (B,), unmixed
            per_sample.append(lk)
            rows.append((mixw[:, k] * lk).mean())
        return Losses(rows, torch.stack([v.detach() for v in per_sample]), mixw)

    def _cut_input(self, module, args, kwargs):
        """Forward pre-hook of `cut_module`: its hidden-state input h (B, T, D; positional, or the
        decoder layer's `hidden_states`) is replaced by a new leaf of the same values, so the graph
        above starts at the leaf. Once per forward (a recompute under gradient checkpointing runs
        inside the layer's forward, after the hooks)."""
        if not self._cutting or not torch.is_grad_enabled() or self._cut is not None:
            return None
        h = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(h, torch.Tensor) or not h.requires_grad:
            return None
        leaf = h.detach().requires_grad_()
        self._cut = (h, leaf)
        if args:
            return (leaf, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": leaf}

    def autocast(self, cache: bool = False):
        """A fresh autocast context of the step's dtype (a null context in fp32).

        `cache`: autocast's cache of each weight's low-precision copy, kept until the context exits.
        Off for a forward: each weight is cast once per forward anyway, the copies a backward needs
        are saved by autograd, and under --gradient-checkpointing (which saves none: the backward
        recomputes) the cache alone would hold a bf16 copy of every layer's weights to the end of
        the forward (InternVL3-8B: ~0.45 GiB a layer, planned 13 GiB at 28 layers). On for
        generation, whose every token reuses every weight."""
        if not self.autocast_dtype:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=cache)

    def backward(self, losses: Losses, weights: list[float], active: list[bool], local: list[bool],
                 order: list[int] | None = None, measure: bool = False) -> None:
        """Gradients of the weighted rows: into the K per-loss rows, of their sum into the flat
        gradient (fast path), or - Gram engine - the Gram, lambda, and one backward of the
        lambda-weighted sum into the flat gradient. Rows this rank gives no weight stay zero.
        `measure` (fast path only): also get the per-loss Gram, for the rows' shares."""
        w = torch.tensor(weights, dtype=torch.float32, device=self.device)
        weighted = [w[r] * losses.rows[r] for r in range(self.K)]
        if self.fsdp:
            self._sharded_backward(weighted, active, measure)
            return
        if not self.per_loss:
            if measure and self.K > 1:
                self._measured_sum(weighted, active)
            else:
                sum(weighted[r] for r in range(self.K) if active[r]).backward()
            self.grads.check()
            return
        if self.engine == "gram":
            # Every rank folds the globally active rows (blocks of the same shape, same order);
            # a row with no weight on this rank's samples contributes zeros.
            G = self.gram_engine.gram(weighted, active, cut=self._cut)  # (K, K) fp64, of rank-averaged gradients
            lam, info = coefficients(G, self.cfg.projection, order, active=active, return_info=True)
            self._gram_info = info
            if self.cfg.skip_nonfinite and not self.checks.finite(G):
                self._cut = None
                return  # combine() reports the skip; the graph is freed with the losses
            self.gram_engine.backward(weighted, lam, cut=self._cut)
            self._cut = None
            self.grads.check()
            return
        mine = [r for r in range(self.K) if active[r] and local[r]]
        self.bufs.zero_()
        for i, r in enumerate(mine):
            self.bufs.backward(r, weighted[r], retain_graph=i < len(mine) - 1)

    def _sharded_backward(self, weighted: list[torch.Tensor], active: list[bool], measure: bool) -> None:
        """--fsdp: every rank runs the same backwards (each ends in collectives), one per globally
        active row into its sharded row (per-loss runs, and the fast path's measured micro-steps),
        else one of the weighted sum into the step's gradient. A row this rank's samples give no
        weight backpropagates zeros."""
        rows = [r for r in range(self.K) if active[r]]
        if not self.per_loss and not (measure and self.K > 1):
            self.grads.backward_into(self.grads.flat, sum(weighted[r] for r in rows), retain_graph=False)
            return
        if self.bufs is None:  # the fast path's measured steps: rows built on first use
            self.bufs = torch.zeros(self.K, self.grads.n, dtype=self.grads.flat.dtype, device=self.grads.flat.device)
        self.bufs.zero_()
        with per_unit_gather(self.model, self._maps):  # the K backwards share one forward: see fsdp.py
            for i, r in enumerate(rows):
                self.grads.backward_into(self.bufs[r], weighted[r], retain_graph=i < len(rows) - 1)

    def _sharded_combine(self, order: list[int], active: list[bool]) -> dict:
        """--fsdp: lambda from the Gram of the rank-averaged rows, summed over the ranks' shards
        ((K, K) fp64, one all-reduce), then this rank's shard of the update, lambda @ rows."""
        G = self.dist.sum_(gram(self.bufs) if self.grads.n else torch.zeros(self.K, self.K, dtype=torch.float64, device=self.device))
        if self.per_loss:
            lam, info = coefficients(G, self.cfg.projection, order, active=active, return_info=True)
        else:  # a measured fast-path step: the plain sum, each active row once
            lam = torch.tensor([float(a) for a in active], dtype=G.dtype, device=G.device)
            info = {"gram": G, "coef": lam, "fired": torch.zeros((), dtype=torch.int64, device=G.device), "merged": None, "order": None}
        if not self.cfg.skip_nonfinite or self.checks.finite(G):
            self.grads.flat.addmv_(self.bufs.T, lam.to(self.grads.flat.dtype))
        return info

    def _measured_sum(self, weighted: list[torch.Tensor], active: list[bool]) -> None:
        """The fast path's update (the plain sum of the active weighted rows) with the per-loss Gram
        measured on the way: the Gram engine's K-batched backward, then its backward of the sum.
        Data parallel: the Gram is of the rank-averaged rows (same on every rank); the flat
        gradient stays this rank's, averaged once per step as on the fast path."""
        if self.share_engine is None:
            self.share_engine = GramEngine(self.params, reduce=self.dist.mean_ if self.dist.world > 1 else None)
        G = self.share_engine.gram(weighted, active)  # (K, K) fp64
        lam = torch.tensor([float(a) for a in active], dtype=G.dtype, device=G.device)  # "none": each active row once
        self._gram_info = {"gram": G, "coef": lam, "fired": torch.zeros((), dtype=torch.int64, device=G.device),
                           "merged": None, "order": None}
        self.share_engine.backward(weighted, lam)

    def combine(self, order: list[int], active: list[bool], ids: list[str], where: str,
                measure: bool = False) -> tuple[dict | None, list[str]]:
        """Combine the per-loss rows into the flat gradient. Returns (combine info, skipped ids).
        (The Gram engine combined inside `backward`; here only its finiteness is judged.)"""
        if self.fsdp and (self.per_loss or self.bufs is not None and measure):
            info = self._sharded_combine(order, active)
        elif not self.per_loss:
            info, self._gram_info = self._gram_info, None  # the fast path's measured Gram, if any
            return info, []
        elif self.engine == "gram":
            info, self._gram_info = self._gram_info, None
        elif self.cfg.skip_nonfinite or self.grads.flat.dtype != torch.float32:
            # combine() accumulates in place into fp32 only: bf16 flat gradient (--precision bf16-*)
            # via one transient fp32 N-vector.
            rows = self.dist.mean_(self.bufs.buffer)  # global per-loss gradients before the (non-linear) combine
            vec, info = combine(rows, self.cfg.projection, order, active=active, return_info=True)
            if not self.cfg.skip_nonfinite or self.checks.finite(info["gram"]):
                self.grads.flat.add_(vec)
        else:
            rows = self.dist.mean_(self.bufs.buffer)
            _, info = combine(rows, self.cfg.projection, order, active=active, return_info=True, accumulate_into=self.grads.flat)
        if not self.checks.finite(info["gram"]):
            if self.cfg.skip_nonfinite:
                return info, self.dist.gather_ids(ids)
            raise DriveKDError(f"non-finite gradient at {where} on sample(s) {', '.join(self.dist.gather_ids(ids))}; "
                               "lower --lr or pass --skip-nonfinite")
        return info, []

    def micro_step(self, batch: Batch, weights: list[float], order: list[int], where: str, measure: bool = False) -> Micro:
        """forward -> (finite?) -> backward -> combine. `where` names the step for errors; `measure`:
        on the fast path, also measure the per-loss Gram (see `backward`)."""
        mixw = self.plan.mix_weights(batch.capabilities)
        active, local = self.row_activity(weights, mixw)
        # The backward runs inside the capture block: with gradient checkpointing the recomputed
        # forward must record the maps again.
        with capture_attention(self.model, self.plan.student_layers, grad=True,
                               attention_mask=batch.inputs.tensors["attention_mask"].bool()) as maps:
            losses = self.forward(batch, maps)
            finite = self.checks.finite_samples(losses.per_sample)
            bad_local = [sid for sid, ok in zip(batch.sample_ids, finite) if not ok]
            if self.dist.any(bool(bad_local)):
                bad = self.dist.gather_ids(bad_local)
                if not self.cfg.skip_nonfinite:
                    raise DriveKDError(
                        f"non-finite loss at {where} on sample(s) {', '.join(bad)}; "
                        "check those samples and their targets, lower --lr, or pass --skip-nonfinite to skip such samples"
                    )
                return Micro(None, active, None, bad)
            self.backward(losses, weights, active, local, order, measure)
        info, skipped = self.combine(order, active, batch.sample_ids, where, measure and self.K > 1)
        return Micro(None if skipped else losses, active, info, skipped)

    # ----- the optimizer step -----
    def average(self, n_micro: int) -> None:
        """Mean over the micro-steps that contributed (and, on the fast path, over ranks)."""
        if n_micro:
            self.grads.flat.div_(n_micro)
            if self.fsdp:
                pass  # FSDP's reduce-scatter already averaged every gradient over the ranks
            elif not self.per_loss or self.engine == "gram":
                # The plain sum, and the Gram engine's lambda-weighted backward, are linear in
                # this rank's gradients: reduce once per step.
                self.dist.mean_(self.grads.flat)

    def clip(self) -> torch.Tensor:
        """Clip the global gradient norm to --max-grad-norm (0: off). Returns the norm before clipping (a tensor)."""
        clip = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        if self.fsdp:
            return grad_norm_clip_(self.grads.flat, clip, self.dist.sum_)
        return torch.nn.utils.clip_grad_norm_(self.params, clip)

    def optimizer_step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.grads.flat.zero_()

