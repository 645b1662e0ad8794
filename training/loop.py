"""The training loop: one flat loop that reads top to bottom.

Each step: set the learning rate, take the next window of every lane, run the
model from the state the last window left, step AdamW, carry the state
(detached) into the next window. Every ``eval_interval`` steps, and when the run
stops, rank 0 evaluates, samples, logs and checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from . import nodes
from . import resume as resume_state
from .batches import Lanes, Windows, train_lanes, val_lanes
from .checkpoint import BEST, LAST, is_better, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .model import CharRNN
from .optim import lr_at, make_optimizer
from .runlog import RunLog
from .runtime import Runtime, any_rank, broadcast_from_main, seed_everything, start_runtime, stop_runtime
from .sampling import sample_text

SAMPLE_TEMPERATURES = (0.5, 1.0)


class DivergedError(RuntimeError):
    """The training loss became NaN/inf or grew past ``divergence_factor`` times its first value."""


@dataclass
class RunResult:
    step: int  # optimizer steps of the whole run
    val_loss: float  # at the final evaluation
    best_val_loss: float
    stopped_by: str  # "max_steps" | "max_time" | "patience"


def run_training(cfg: TrainConfig) -> RunResult:
    rt = start_runtime(cfg.device, cfg.threads, cfg.precision)
    finished = False
    try:
        result = _train(cfg, rt)
        finished = True
        return result
    finally:
        stop_runtime(rt, finished)


def _train(cfg: TrainConfig, rt: Runtime) -> RunResult:
    out = Path(cfg.out)
    say = tqdm.write if rt.is_main else (lambda *_: None)
    ckpt = load_checkpoint(out / LAST) if cfg.resume and (out / LAST).is_file() else None
    nodes.check_same_checkpoint(rt, out, ckpt["step"] if ckpt else None)  # one --out for every node
    for warning in nodes.launch_warnings(rt, cfg.resume):
        say(f"warning: {warning}")
    if ckpt is not None:
        ckpt = resume_state.upgrade(ckpt)
        resume_state.check_compatible(cfg, ckpt, rt.world)
    # Every rank must have read rank 0's corpus; tokens.bin is written once per run folder, then mapped.
    corpus = nodes.prepare_corpus_on_every_rank(rt, cfg.data, out, cfg.errors, ckpt["vocab"] if ckpt else None)
    if ckpt is not None:
        resume_state.check_corpus(corpus, ckpt)
    windows = Windows(cfg.seq_len, cfg.epoch_offset, cfg.seq_len_sd, cfg.seq_len_half_prob, cfg.seed)
    lanes = train_lanes(corpus.train, cfg.batch_size, cfg.seq_len, rt.rank, rt.world, reach=windows.reach)
    val = val_lanes(corpus.val, cfg.seq_len)  # checked on every rank, used on rank 0
    say(f"corpus: {corpus.info.chars:,} characters in {len(corpus.info.sources)} file(s), vocabulary {len(corpus.vocab)},"
        f" train {len(corpus.train):,} / val {len(corpus.val):,}; {lanes.windows} batches per epoch")

    seed_everything(cfg.seed + rt.rank)  # ranks draw different dropout masks
    model_cfg = dataclasses.replace(cfg.model, vocab_size=len(corpus.vocab))
    model = CharRNN(model_cfg).to(rt.device)
    optimizer = make_optimizer(model, cfg, rt.cuda)
    ema = make_ema(model, cfg.ema_decay)
    run = resume_state.fresh()
    if ckpt is not None:
        run = resume_state.restore(ckpt, model, optimizer, ema, windows, rt)
        say(f"resumed from {out / LAST} at step {run.step}")
    else:
        run.cursor = windows.epoch_start()  # the first epoch starts at its own offset too
    log = RunLog(out) if rt.is_main else None
    if log:
        log.restart_at(run.step)
    say(f"model: {model_cfg.cell} {model_cfg.layers}x{model_cfg.hidden}, {sum(p.numel() for p in model.parameters()):,} parameters,"
        f" device {rt.device}{' bf16' if rt.bf16 else ' fp32'}{f', {rt.world} ranks' if rt.distributed else ''}")
    net = torch.nn.parallel.DistributedDataParallel(model) if rt.distributed else model

    if cfg.max_steps and run.step >= cfg.max_steps:
        say(f"nothing to do: the run already took {run.step} of --max-steps {cfg.max_steps} steps")
        return RunResult(run.step, ckpt["val_loss"], run.best_val_loss, "max_steps")
    if cfg.patience and run.evals_since_best >= cfg.patience:  # it stopped by patience before it was killed or rerun
        say(f"nothing to do: the run already had {run.evals_since_best} evaluations without a better validation loss"
            f" (--patience {cfg.patience}; a larger --patience, or 0, continues it)")
        return RunResult(run.step, ckpt["val_loss"], run.best_val_loss, "patience")
    if cfg.patience:
        say(f"early stop: after {cfg.patience} evaluations (every {cfg.eval_interval} steps) without a better validation loss"
            " (--patience; 0 trains to the budget)")
    bar = tqdm(total=cfg.max_steps or None, initial=run.step, disable=not rt.is_main, unit="step", dynamic_ncols=True)
    started = time.perf_counter() - run.elapsed  # so elapsed counts the whole run across resumes
    # Since the last evaluation: when it ended, the training losses, the characters trained on (all ranks).
    period_start, period_losses, period_chars = time.perf_counter(), [], 0
    pending: list[tuple[torch.Tensor, float, int]] = []  # (loss, lr, length) not yet read back (a sync on CUDA)
    stopped_by = ""
    val_loss = math.nan
    model.train()
    while not stopped_by:
        length = windows.next_length()  # seq_len, or drawn around it (--seq-len-sd, --seq-len-half-prob)
        if not lanes.fits(run.cursor, length):  # the lanes are used up: a new epoch starts (at a random offset)
            run.cursor, run.epoch, run.carried = windows.epoch_start(), run.epoch + 1, None
        # AWD-LSTM's rule for varied windows: the step size follows the window's length.
        lr = lr_at(cfg, run.step, time.perf_counter() - started) * length / cfg.seq_len
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = (torch.from_numpy(a).to(rt.device, non_blocking=True) for a in lanes.read(run.cursor, length))  # [B, length]
        state = run.carried if run.carried is not None else model.init_state(cfg.batch_size, rt.device)
        with rt.autocast():
            logits, new_state = net(x, state)  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if ema is not None:
            ema.update_parameters(model)
        run.carried = tuple(s.detach().float() for s in new_state)  # truncated BPTT: no gradient into the past
        run.cursor += length
        run.step += 1
        pending.append((loss.detach(), lr, length))

        eval_due = run.step % cfg.eval_interval == 0
        limit = bool(cfg.max_steps and run.step >= cfg.max_steps)
        # On one CPU process reading the loss costs nothing, so every step is checked at once;
        # on CUDA or across ranks, only every log_interval steps.
        if run.step % cfg.log_interval == 0 or eval_due or limit or not (rt.cuda or rt.distributed):
            losses = torch.stack([loss for loss, _, _ in pending]).tolist()
            records = [{"step": run.step - len(pending) + i + 1, "loss": v, "lr": step_lr, "seq_len": step_len}
                       for i, (v, (_, step_lr, step_len)) in enumerate(zip(losses, pending))]
            period_chars += sum(step_len for _, _, step_len in pending) * cfg.batch_size * rt.world
            pending.clear()
            if run.first_loss is None:
                run.first_loss = losses[0]
            bad = next((r for r in records if not math.isfinite(r["loss"]) or r["loss"] > cfg.divergence_factor * run.first_loss), None)
            if any_rank(rt, bad is not None):
                bar.close()
                where = f"at step {bad['step']} the training loss was {bad['loss']}" if bad else "on another rank"
                raise DivergedError(
                    f"training diverged: {where} (first loss {run.first_loss:.4f}, limit {cfg.divergence_factor}x);"
                    f" {out / LAST} keeps the last good state (step {run.checkpoint_step}); try a smaller --lr"
                )
            period_losses += losses
            if log:
                log.add_steps(records)
            if run.step % cfg.log_interval == 0 or eval_due or limit:
                rate = period_chars / max(1e-9, time.perf_counter() - period_start)
                bar.set_postfix(loss=f"{sum(losses) / len(losses):.4f}", chars_per_sec=f"{rate:,.0f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(len(losses))
            out_of_time = bool(cfg.max_time and time.perf_counter() - started >= cfg.max_time)
            stopped_by = "max_steps" if limit else "max_time" if any_rank(rt, out_of_time) else ""

        if not (eval_due or stopped_by):
            continue
        # Evaluate, sample, log and checkpoint. Every rank hands rank 0 its resume state first.
        train_seconds = time.perf_counter() - period_start
        ranks = resume_state.gather(run, model, rt)
        if rt.is_main:
            val_loss = evaluate(model, val, cfg.eval_iters, rt)
            ema_loss = evaluate(ema.module, val, cfg.eval_iters, rt) if ema is not None else math.nan
            # best.pt keeps whichever weights score lower: the average, once it has caught up with training.
            best_model, best_loss = (ema.module, ema_loss) if is_better(ema_loss, val_loss) else (model, val_loss)
            improved = is_better(best_loss, run.best_val_loss)
            run.best_val_loss = best_loss if improved else run.best_val_loss
            run.evals_since_best = 0 if improved else run.evals_since_best + 1
            if not stopped_by and cfg.patience and run.evals_since_best >= cfg.patience:
                stopped_by = "patience"
            record = {
                "step": run.step, "epoch": run.epoch,
                "train_loss": sum(period_losses) / max(1, len(period_losses)), "val_loss": val_loss,
                **({"ema_val_loss": ema_loss} if ema is not None else {}),
                "best_val_loss": run.best_val_loss, "lr": lr,
                "chars_per_sec": round(period_chars / max(1e-9, train_seconds), 1),
                "elapsed": round(time.perf_counter() - started, 3),
                **({"stopped_by": stopped_by} if stopped_by else {}),  # the last line says why the run ended
            }
            log.add_metrics(record)
            say(f"step {run.step}: train {record['train_loss']:.4f}  val {val_loss:.4f}"
                f"{f'  ema {ema_loss:.4f}' if ema is not None else ''}  best {run.best_val_loss:.4f}"
                f"  lr {lr:.2e}  {record['chars_per_sec']:,.0f} chars/s")
            if cfg.sample_chars:
                prime = corpus.decode(corpus.val[:1])
                samples = [(t, prime + sample_text(model, corpus.vocab, prime, cfg.sample_chars, t, cfg.seed + run.step))
                           for t in SAMPLE_TEMPERATURES]
                say(log.add_samples(run.step, val_loss, samples))
            log.draw_curves()
            run.elapsed = time.perf_counter() - started
            payload = resume_state.payload(cfg, model_cfg, model, corpus, run, val_loss)
            if improved:
                save_checkpoint(out / BEST, resume_state.payload(cfg, model_cfg, best_model, corpus, run, best_loss,
                                                                 weights="ema" if best_model is not model else "raw"))
            save_checkpoint(out / LAST, {**payload, **resume_state.extra(optimizer, ema, windows, run, ranks)})
            run.checkpoint_step = run.step
            if stopped_by == "patience":
                say(f"stopping: {cfg.patience} evaluations without a better validation loss than {run.best_val_loss:.4f}"
                    f" (--patience {cfg.patience}); best.pt holds that model")
        stopped_by = broadcast_from_main(rt, stopped_by)
        period_start, period_losses, period_chars = time.perf_counter(), [], 0
    bar.close()
    say(f"done at step {run.step} ({stopped_by}): val loss {val_loss:.4f}, best {run.best_val_loss:.4f}; checkpoints in {out}")
    return RunResult(run.step, val_loss, run.best_val_loss, stopped_by)


def make_ema(model: CharRNN, decay: float) -> AveragedModel | None:
    """An exponential moving average of the weights (updated after every step), or None when decay is 0.

    Its step counter stays on the CPU (AveragedModel's default), so updating it costs no host sync on CUDA.
    """
    if not decay:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))


@torch.inference_mode()
def evaluate(model: CharRNN, val: Lanes, iters: int, rt: Runtime) -> float:
    """Mean loss (nats/char) over the first ``iters`` windows of every validation lane (all when 0).

    Deterministic: dropout off, each lane starts from a zero state and carries it window to window.
    """
    model.eval()
    state = model.init_state(val.count, rt.device)
    total = torch.zeros((), device=rt.device, dtype=torch.float64)
    windows = min(iters, val.windows) if iters else val.windows
    for i in range(windows):
        x, y = (torch.from_numpy(a).to(rt.device, non_blocking=True) for a in val.window(i))
        with rt.autocast():
            logits, state = model(x, state)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
    model.train()
    return float(total) / (windows * val.count * val.seq_len)
