"""Data-parallel training with Horovod, top to bottom.

    python -m app.prepare data=shakespeare
    horovodrun -np 2 python -m app.train model=llama_small
    mpirun -np 2 python -m app.train model=llama_small sync=param_average

One step: every rank runs grad_accum_steps forward/backward passes on its own slice of the
global batch; Horovod's hooks allreduce the gradients once, after the last backward; we wait
for them (optimizer.synchronize), unscale and clip the averaged gradients, and step.
"""
import logging
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from app import checkpoint, cli, config, cores, dist, fileio, metrics, models, optim, prepare, runtime, tasks, tokenizer

log = logging.getLogger("app.train")


class StopRequest:
    """SIGTERM or SIGUSR1 (what SLURM sends before a time limit) asks for a checkpoint and a clean exit."""

    def __init__(self):
        self.requested = False
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, self._handle)

    def _handle(self, signum, _frame):
        self.requested = True

    def agreed(self) -> bool:
        """True on every rank if any rank was signalled, so all ranks stop at the same step."""
        flag = torch.tensor([1.0 if self.requested else 0.0])
        return bool(dist.sum_over_ranks(flag, name="stop_request").item() > 0)


def restore(resume_from: Path, model, optimizer, scaler, state: checkpoint.TrainState, seed: int) -> None:
    """Rank 0 reads the checkpoint; every rank receives weights, optimizer and train state."""
    rank, world = dist.rank(), dist.size()
    payload = None
    if dist.is_main():
        try:
            saved = checkpoint.read_state(resume_from)
            checkpoint.check_compatible(saved, model, state.tokenizer_sha256, resume_from)
            checkpoint.load_weights(resume_from, model)
            optimizer.load_state_dict(checkpoint.load_optimizer_state(resume_from))
            payload = {"state": saved, "rng": checkpoint.load_rng_states(resume_from)}
        except (ValueError, FileNotFoundError) as error:
            payload = {"error": str(error)}
    # Every rank learns of a refused checkpoint, so none is left waiting in a collective.
    payload = dist.broadcast_object(payload, name="resume_payload")
    if "error" in payload:
        raise ValueError(payload["error"])
    dist.broadcast_model_and_optimizer(model, optimizer, resumed=True)
    saved = payload["state"]
    state.step, state.samples_seen, state.tokens_seen = saved.step, saved.samples_seen, saved.tokens_seen
    if saved.world_size == world:
        torch.set_rng_state(payload["rng"][rank])
    else:
        # The data position is a global sample count, valid for any world size; only the
        # per-rank dropout RNG cannot carry over, so it is re-derived from (seed, rank, step).
        torch.manual_seed(seed + rank + 1_000_003 * state.step)
        log.warning("resuming a %d-rank checkpoint on %d ranks: data position re-derived", saved.world_size, world)
    if scaler is not None and saved.grad_scaler:
        scaler.load_state_dict(saved.grad_scaler)
    log.info("resumed from %s at step %d (%d samples seen)", resume_from, state.step, state.samples_seen)


def setup_logging(run_dir: Path) -> None:
    level = logging.INFO if dist.is_main() else logging.WARNING
    logging.getLogger().setLevel(level)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(f"[%(asctime)s][rank {dist.rank()}][%(levelname)s] %(message)s"))
    if dist.is_main():
        file_handler = logging.FileHandler(run_dir / "train.log")
        file_handler.setFormatter(logging.Formatter("[%(asctime)s][%(levelname)s] %(message)s"))
        logging.getLogger().addHandler(file_handler)


@dataclass
class Window:
    """What happens between two log steps on this rank; summed over ranks when logged."""
    loss: torch.Tensor  # summed on the device: reading it back each step would sync a GPU
    steps: int = 0
    tokens: int = 0
    tokens_counted: int = 0  # of `tokens`, how many are already in state.tokens_seen
    compute_s: float = 0.0
    wait_s: float = 0.0
    data_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)


def train(cfg, run_dir: Path) -> dict:
    # --- ranks, threads, seeds --------------------------------------------------------------
    rank, world = dist.rank(), dist.size()
    device = runtime.pick_device(cfg.train.device, dist.local_rank())
    threads = dist.place_rank(cfg.train.threads_per_rank, cfg.train.bind_cores)
    torch.set_num_threads(threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        fileio.write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    setup_logging(run_dir)
    log.info(
        "run dir %s | task %s | %d ranks (%s), %d threads each, device %s, precision %s",
        run_dir, cfg.task, world, dist.controller(), threads, device, cfg.train.precision,
    )
    log.info("Horovod start-up settings: %s", ", ".join(f"{k}={v}" for k, v in dist.settings_in_effect().items()))

    # --- data --------------------------------------------------------------------------------
    if dist.is_main():
        prepare.prepare(cfg, log=log.info)
        # A copy beside the checkpoints makes the run directory self-contained for export/generate.
        with fileio.staged_directory(checkpoint.run_tokenizer_dir(run_dir)) as staging:
            tokenizer.load(cfg.data.dir).save_pretrained(staging)
    dist.barrier()
    task = tasks.build(cfg, rank, world)

    # --- model (the same seed everywhere; rank 0's weights are broadcast anyway) --------------
    torch.manual_seed(cfg.train.seed)
    model = task.build_model().to(device)
    torch.manual_seed(cfg.train.seed + rank)  # dropout and masking noise differ per rank
    flops_per_token = task.flops_per_token(model)
    log.info("model %s: %.2fM parameters, %.1f MFLOPs/token", cfg.model.name,
             models.count_parameters(model) / 1e6, flops_per_token / 1e6)

    # --- optimizer, schedule, Horovod -------------------------------------------------------
    optimizer = optim.build_optimizer(model, cfg.optim, optim.lr_at(0, cfg.optim, cfg.train.max_steps, world))
    # Wrap before restoring: DistributedOptimizer rebuilds the optimizer from its param groups,
    # so state loaded into the inner one would be dropped.
    optimizer = dist.wrap_optimizer(optimizer, model, cfg.sync, cfg.train.grad_accum_steps)
    if cfg.sync.param_average_every and cfg.sync.param_average_backend == "mpi":
        dist.check_mpi_world()
    scaler = torch.amp.GradScaler("cuda") if cfg.train.precision == "fp16" else None
    precision_ctx = runtime.autocast_context(cfg.train.precision, device)

    # --- resume -----------------------------------------------------------------------------
    state = checkpoint.TrainState(
        world_size=world, model_signature=checkpoint.model_signature(model), tokenizer_sha256=task.tokenizer_sha256,
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    resume_from = dist.broadcast_object(
        checkpoint.resolve_resume(cfg.train.resume, run_dir) if dist.is_main() else None, name="resume_from"
    )
    if resume_from is not None:
        restore(resume_from, model, optimizer, scaler, state, cfg.train.seed)
    else:
        dist.broadcast_model_and_optimizer(model, optimizer, resumed=False)

    def flush_token_count(window: Window) -> None:
        # Token counts differ per rank with padding; they are summed only where ranks meet anyway.
        new_tokens = torch.tensor([window.tokens - window.tokens_counted], dtype=torch.float64)
        state.tokens_seen += int(dist.sum_over_ranks(new_tokens, name="tokens").item())
        window.tokens_counted = window.tokens

    def save_checkpoint(window: Window) -> None:
        flush_token_count(window)
        rng_states = dist.allgather_object(torch.get_rng_state(), name="rng_gather")
        if dist.is_main():
            state.grad_scaler = scaler.state_dict() if scaler is not None else None
            path = checkpoint.save(run_dir, model, optimizer, state, rng_states, cfg.train.keep_last)
            log.info("checkpoint %s", path)

    # --- observability (rank 0 writes; the others hold a logger that does nothing) -----------
    peak_tflops = cfg.train.peak_tflops or metrics.measure_matmul_tflops(
        torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32, device
    )
    log.info("peak %.3f TFLOP/s per rank (%s)", peak_tflops, "configured" if cfg.train.peak_tflops else "measured")
    logger = (
        metrics.RunLogger(run_dir, cfg.train.max_steps, state.step, cfg.train.progress_bar)
        if dist.is_main() else metrics.NullLogger()
    )
    logger.text("config", "```\n" + OmegaConf.to_yaml(cfg) + "\n```")
    stop = StopRequest()

    # --- the loop ---------------------------------------------------------------------------
    model.train()
    window, last = Window(loss=torch.zeros((), device=device)), {}
    while state.step < cfg.train.max_steps:
        lr = optim.lr_at(state.step, cfg.optim, cfg.train.max_steps, world)
        optim.set_lr(optimizer, lr)
        step_started = time.perf_counter()
        for micro_step in range(cfg.train.grad_accum_steps):
            data_started = time.perf_counter()
            batch = task.micro_batch(state.samples_seen, micro_step)
            window.tokens += task.tokens_in(batch)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
            window.data_s += time.perf_counter() - data_started
            with precision_ctx:
                loss = task.loss(model, batch)
            scaled = loss / cfg.train.grad_accum_steps
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            window.loss += loss.detach().float() / cfg.train.grad_accum_steps
        wait_started = time.perf_counter()
        dist.synchronize_gradients(optimizer)
        window.wait_s += time.perf_counter() - wait_started
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            if cfg.train.grad_clip > 0 else None
        )
        with dist.step_without_sync(optimizer):
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        optimizer.zero_grad()  # set_to_none is the default; Horovod's wrapper takes no arguments
        state.step += 1
        state.samples_seen += task.stream.global_batch
        if cfg.sync.param_average_every and state.step % cfg.sync.param_average_every == 0:
            wait_started = time.perf_counter()
            dist.average_parameters(model.parameters(), cfg.sync.param_average_backend)
            window.wait_s += time.perf_counter() - wait_started
        window.steps += 1
        window.compute_s += time.perf_counter() - step_started

        # Logging is the only place that reads values back from the device or talks to other
        # ranks outside the gradient allreduce, and only every log_every steps.
        if state.step % cfg.train.log_every == 0 or state.step == cfg.train.max_steps:
            elapsed = time.perf_counter() - window.started
            rank_tokens_per_s = window.tokens / elapsed
            summed = dist.sum_over_ranks(
                torch.tensor([
                    window.loss.item() / window.steps, rank_tokens_per_s, window.wait_s,
                    window.compute_s - window.wait_s, window.data_s, float(metrics.process_memory_bytes(device)),
                ], dtype=torch.float64),
                name="log_metrics",
            )
            mean = (summed / world).tolist()
            flush_token_count(window)
            last = {
                "train/loss": mean[0],
                "lr": lr,
                "tokens_per_second": summed[1].item(),
                "tokens_per_second_per_rank": rank_tokens_per_s,
                "mfu": metrics.mfu(flops_per_token, mean[1], peak_tflops),
                "time/allreduce_wait_s_per_step": mean[2] / window.steps,
                "time/compute_s_per_step": mean[3] / window.steps,
                "time/data_s_per_step": mean[4] / window.steps,
                "memory/rss_gib_mean": mean[5] / 2**30,
                "tokens_seen": state.tokens_seen,
            }
            if grad_norm is not None:
                last["grad_norm"] = grad_norm.item()
            if last["mfu"] > 1 and not cfg.train.peak_tflops:
                log.warning("MFU above 100%%: the start-up peak measurement was disturbed by other load; "
                            "set train.peak_tflops to this machine's peak (python -m app.bench sections=[peak])")
            logger.log(state.step, last)
            logger.progress(window.steps, {"loss": f"{mean[0]:.3f}", "tok/s": f"{summed[1].item():,.0f}"})
            log.info(
                "step %d/%d | loss %.4f | lr %.2e | %s tok/s | mfu %.1f%% | wait %.0f ms/step",
                state.step, cfg.train.max_steps, mean[0], lr, f"{summed[1].item():,.0f}", 100 * last["mfu"],
                1000 * last["time/allreduce_wait_s_per_step"],
            )
            window = Window(loss=torch.zeros((), device=device))
        if cfg.train.eval_every and (state.step % cfg.train.eval_every == 0 or state.step == cfg.train.max_steps):
            eval_started = time.perf_counter()
            evaluation = task.evaluate(model, device, precision_ctx, cfg.train.micro_batch_size,
                                       cfg.train.eval_batches, logger=logger, step=state.step)
            last.update(evaluation)
            logger.log(state.step, evaluation)
            log.info("step %d | %s", state.step, " | ".join(  # headline numbers; per-class ones go to TensorBoard
                f"{k} {v:.4f}" for k, v in evaluation.items() if isinstance(v, float) and k.count("/") == 1))
            window.started += time.perf_counter() - eval_started  # throughput counts training only
        # Ranks agree on a stop at log steps only, so a signal costs no per-step collective.
        stop_now = state.step % cfg.train.log_every == 0 and stop.agreed()
        if stop_now or (cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0):
            save_checkpoint(window)
        if stop_now:
            log.warning("stop requested by signal: checkpointed at step %d, exiting", state.step)
            logger.close()
            return last

    if not cfg.train.checkpoint_every or state.step % cfg.train.checkpoint_every:
        save_checkpoint(window)
    logger.hparams(
        {"task": cfg.task, "model": cfg.model.name, "optim": cfg.optim.name, "lr": cfg.optim.lr, "sync": cfg.sync.name,
         "precision": cfg.train.precision, "world_size": world, "global_batch": task.stream.global_batch},
        {"hparam/" + k.replace("/", "_"): v for k, v in last.items() if k in ("train/loss", "val/loss", "val/accuracy")},
    )
    replicas = dist.allgather_object(
        {"rank": rank, "host": socket.gethostname(), "cores": cores.affinity(), "run_dir": str(run_dir),
         "param_sha256": models.parameter_checksum(model)},
        name="replicas",
    )
    if dist.is_main():
        identical = len({r["param_sha256"] for r in replicas}) == 1
        log.info("parameters identical on all %d ranks: %s", world, identical)
        fileio.write_json(run_dir / "summary.json", {
            "step": state.step, "tokens_seen": state.tokens_seen, "world_size": world, "task": cfg.task,
            "controller": dist.controller(), "horovod": dist.settings_in_effect(), "metrics": last,
            "replicas": replicas, "replicas_identical": identical,
        })
    task.finish(model, run_dir, logger, log)
    logger.close()
    return last


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def hydra_main(cfg) -> None:
    try:
        config.validate(cfg)
        train(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (config.ConfigError, FileNotFoundError, ValueError) as error:
        log.error("%s", error)
        sys.exit(2)


def main() -> None:
    dist.init(cli.startup_config(sys.argv[1:]).horovod)
    stamp = dist.run_stamp()
    OmegaConf.register_new_resolver("run_stamp", lambda: stamp, replace=True)
    config.register()
    hydra_main()


if __name__ == "__main__":
    main()
