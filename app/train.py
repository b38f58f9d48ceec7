"""Training with Horovod, top to bottom: set-up, resume, the loop.

    python -m app.prepare data=shakespeare
    horovodrun -np 2 python -m app.train model=llama_small
    mpirun -np 2 python -m app.train model=llama_small sync=param_average
    scripts/launch.sh --elastic --min-np 1 --max-np 4 --hostfile hosts.txt ...   # app/elastic.py

One step (app/step.py): every rank runs grad_accum_steps forward/backward passes on its own
slice of the global batch; the layout (app/parallel) reduces the gradients, which are then
unscaled, clipped by their global norm and applied. Around the step this file logs, evaluates,
checkpoints and stops on a signal; rank 0 alone writes, into the run directory all ranks share,
except each rank's own boxes of a checkpoint (app/checkpoint.py).
"""
import sys

from app import allocator

if __name__ == "__main__":
    # Before the imports below: a rank that re-executes itself under jemalloc (ZeRO's malloc,
    # app/allocator.py) then imports torch, transformers and Horovod once, not twice.
    allocator.ensure_at_launch(sys.argv[1:])

import json
import logging
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from app import (checkpoint, cli, compilation, config, cores, dist, elastic, fileio, metrics, models,
                 optim, plan, prepare, runtime, saving, stop, tokenizer)
from app.plan import training as planning
from app.state_dicts import full_model_order
from app.profiling import StepProfiler
from app.step import PhaseTimer, StepOutput, Training, build_training, train_step

log = logging.getLogger("app.train")


def start_rank(cfg, run_dir: Path) -> torch.device:
    """This rank's device, determinism and logging; rank 0 creates the run directory."""
    device = runtime.pick_device(cfg.train.device, dist.local_rank())
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        fileio.write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    runtime.configure_logging(run_dir, dist.rank())
    log.info("run dir %s | task %s | %d ranks (%s), device %s, precision %s",
             run_dir, cfg.task, dist.size(), dist.controller(), device, cfg.train.precision)
    log.info("Horovod start-up settings: %s", ", ".join(f"{k}={v}" for k, v in dist.settings_in_effect().items()))
    return device


def place_threads(cfg) -> None:
    """Pin this rank to its share of its host's cores; a collective (ranks compare core masks)."""
    threads = dist.place_rank(cfg.train.threads_per_rank, cfg.train.bind_cores)
    torch.set_num_threads(threads)
    malloc = allocator.active()
    if config.allocator(cfg) == allocator.JEMALLOC and malloc != allocator.JEMALLOC:
        log.warning("jemalloc is not installed: glibc's malloc runs (apt-get install libjemalloc2)")
    if malloc == allocator.JEMALLOC:
        log.info("%d threads per rank; malloc: jemalloc (train.keep_freed_memory is glibc's)", threads)
        return
    keep = config.keeps_freed_memory(cfg)
    taken = runtime.set_freed_memory(keep)
    log.info("%d threads per rank; malloc: glibc, freed memory %s", threads,
             "(allocator default: not glibc)" if not taken else "kept for reuse" if keep else "returned to the kernel")


def copy_tokenizer(cfg, run_dir: Path) -> None:
    """The tokenizer beside the checkpoints, so the run directory alone serves export and generation."""
    with fileio.staged_directory(checkpoint.run_tokenizer_dir(run_dir)) as staging:
        tokenizer.load(cfg.data.dir).save_pretrained(staging)


def prepare_data(cfg, run_dir: Path) -> None:
    """Rank 0 prepares the data (idempotent) and copies the tokenizer into the run directory."""
    prepare.prepare_data(cfg.data, log=log.info)
    copy_tokenizer(cfg, run_dir)


def resume_or_start(cfg, run_dir: Path, training: Training, state: checkpoint.TrainState) -> None:
    """Continue from the checkpoint train.resume names (rank 0 finds and verifies it; every rank
    reads its own part of it), or start every rank from rank 0's fresh weights."""
    found = dist.run_on_main(lambda: checkpoint.resolve_resume(cfg.train.resume, run_dir, warn=log.warning),
                             name="resume_from")
    if found is None:
        training.parallel.start(None)
        return
    saved = dist.run_on_main(lambda: checkpoint.compatible_state(found, training.model, state.tokenizer_sha256),
                             name="resume_state")
    training.parallel.start(checkpoint.Reader(found, full_model_order(training.model)))
    state.step, state.samples_seen, state.tokens_seen = saved.step, saved.samples_seen, saved.tokens_seen
    if saved.world_size == dist.size():
        checkpoint.restore_rng_state(checkpoint.load_rng_states(found)[dist.rank()], training.device)
    else:
        # The data position is a global sample count, valid for any world size; only the
        # per-rank dropout RNG cannot carry over, so it is re-derived from (seed, rank, step).
        torch.manual_seed(cfg.train.seed + dist.noise_rank() + 1_000_003 * state.step)
        log.warning("resuming a %d-rank checkpoint on %d ranks: data position re-derived", saved.world_size,
                    dist.size())
    if training.scaler is not None and saved.grad_scaler:
        training.scaler.load_state_dict(saved.grad_scaler)
    log.info("resumed from %s at step %d (%d samples seen)", found, state.step, state.samples_seen)


@dataclass
class Window:
    """What happens on this rank between two log steps; summed over ranks when logged."""
    device: torch.device
    loss: torch.Tensor = None  # summed on the device: reading it back each step would sync a GPU
    steps: int = 0
    tokens: int = 0
    tokens_counted: int = 0  # of `tokens`, how many are already in state.tokens_seen
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self):
        self.loss = torch.zeros((), device=self.device)

    def add(self, output: StepOutput) -> None:
        self.loss += output.loss
        self.steps += 1
        self.tokens += output.tokens

    def count_tokens(self, state: checkpoint.TrainState) -> None:
        """Add the window's new tokens, summed over ranks (they differ with padding), to the state."""
        new_tokens = torch.tensor([self.tokens - self.tokens_counted], dtype=torch.float64)
        state.tokens_seen += int(dist.sum_over_ranks(new_tokens, name="tokens").item())
        self.tokens_counted = self.tokens


def window_metrics(window: Window, seconds: dict, state, lr: float, output: StepOutput, flops_per_token: float,
                   peak_tflops: float) -> dict:
    """The window's metrics as means over ranks (throughput summed); a collective."""
    rank_tokens_per_s = window.tokens / (time.perf_counter() - window.started)
    per_step = [seconds.get(p, 0.0) / window.steps for p in ("data", "forward", "backward", "optimizer",
                                                               "allreduce_wait", "parameter_average", "pipeline_wait")]
    summed = dist.sum_over_ranks(torch.tensor([
        window.loss.item() / window.steps, rank_tokens_per_s, *per_step,
        float(metrics.process_memory_bytes(window.device)),
    ], dtype=torch.float64), name="log_metrics")
    mean = (summed / dist.size()).tolist()
    window.count_tokens(state)
    row = {
        "train/loss": mean[0], "lr": lr, "tokens_per_second": summed[1].item(),
        "tokens_per_second_per_rank": rank_tokens_per_s, "mfu": metrics.mfu(flops_per_token, mean[1], peak_tflops),
        "time/data_s_per_step": mean[2], "time/compute_s_per_step": mean[3] + mean[4] + mean[5],
        "time/allreduce_wait_s_per_step": mean[6] + mean[7], "time/pipeline_wait_s_per_step": mean[8],
        "memory/rss_gib_mean": mean[9] / 2**30,
        "tokens_seen": state.tokens_seen, "world_size": dist.size(),
    }
    if output.grad_norm is not None:
        row["grad_norm"] = output.grad_norm.item()
    return row


def log_window(row: dict, state, cfg, logger, window: Window) -> None:
    if row["mfu"] > 1 and not cfg.train.peak_tflops:
        log.warning("MFU above 100%%: the start-up peak measurement was disturbed by other load; "
                    "set train.peak_tflops to this machine's peak (python -m app.bench sections=[peak])")
    logger.log(state.step, row)
    logger.progress(window.steps, {"loss": f"{row['train/loss']:.3f}", "tok/s": f"{row['tokens_per_second']:,.0f}"})
    log.info("step %d/%d | loss %.4f | lr %.2e | %s tok/s | mfu %.1f%% | wait %.0f ms/step", state.step,
             cfg.train.max_steps, row["train/loss"], row["lr"], f"{row['tokens_per_second']:,.0f}",
             100 * row["mfu"], 1000 * row["time/allreduce_wait_s_per_step"])


def evaluate(cfg, training: Training, state, logger) -> dict:
    with training.parallel.evaluation_model() as (model, share), compilation.eager():  # eager: other shapes
        result = training.task.evaluate(model, share, training.device, training.precision_ctx,
                                        cfg.train.micro_batch_size, cfg.train.eval_batches, logger=logger,
                                        step=state.step)
    logger.log(state.step, result)
    log.info("step %d | %s", state.step, " | ".join(  # headline numbers; per-class ones go to TensorBoard
        f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float) and k.count("/") == 1))
    return result


def save_checkpoint(run: "Run", training: Training, state, window: Window) -> None:
    """A collective: every rank holding a counted box writes it (train.checkpoint_async: a copy,
    in the background); rank 0 writes the rest. The loop's stall goes to TensorBoard."""
    pending = run.saver.start(state.step, checkpoint.World(rank=dist.rank(), broadcast=dist.broadcast_object,
                                                           gather=dist.gather_object))
    window.count_tokens(state)
    state.world_size = dist.size()  # an elastic run's changes; the RNG states below are this world's
    shard = training.parallel.checkpoint_shard()
    rng_states = dist.allgather_object(checkpoint.capture_rng_state(training.device), name="rng_gather")
    state.grad_scaler = training.scaler.state_dict() if training.scaler is not None else None
    run.saver.save(pending, shard, state, rng_states)
    run.logger.scalars(state.step, {"checkpoint/stall_s": pending.record.stall_s})


def finish_run(cfg, run_dir: Path, training: Training, state, last: dict, run: "Run") -> None:
    """Hyperparameters, the run summary (layout, replicas' agreement, the plan against what was
    measured) and the task's own ending."""
    logger = run.logger
    # First, so the summary's layout counts what the sample gathered. Eagerly: generation grows
    # its input token by token, no shape to compile once.
    with compilation.eager():
        training.task.finish(training.parallel.sampling_model, run_dir, logger, log)
    logger.hparams(
        {"task": cfg.task, "model": cfg.model.name, "optim": cfg.optim.name, "lr": cfg.optim.lr,
         "sync": cfg.sync.name, "precision": cfg.train.precision, "world_size": dist.size(),
         "global_batch": training.task.stream.global_batch},
        {"hparam/" + k.replace("/", "_"): v for k, v in last.items()
         if k in ("train/loss", "val/loss", "val/accuracy")},
    )
    replicas = dist.allgather_object(
        {"rank": dist.rank(), "host": socket.gethostname(), "cores": cores.affinity(), "run_dir": str(run_dir),
         "param_sha256": training.parallel.parameter_checksum(),
         "replica_group": training.parallel.replica_group(), "memory": run.memory,
         "median_step_s": planning.median_step_s(run.step_seconds), "checkpoint": run.saver.summary()},
        name="replicas",
    )
    saves = [replica.pop("checkpoint") for replica in replicas]  # the summary's own block, not per replica
    if dist.is_main():
        # Ranks that hold the same parameters (all of them, or one pipeline stage's) must agree.
        identical = all(len({r["param_sha256"] for r in replicas if r["replica_group"] == group}) == 1
                        for group in {r["replica_group"] for r in replicas})
        log.info("parameters identical on all %d ranks holding the same part: %s", dist.size(), identical)
        plan_block = run.plan.block(replicas)
        logger.scalars(state.step, planning.scalars(plan_block))
        log.info("plan: %s", plan_block)
        fileio.write_json(run_dir / "summary.json", {
            "step": state.step, "tokens_seen": state.tokens_seen, "world_size": dist.size(), "task": cfg.task,
            "controller": dist.controller(), "horovod": dist.settings_in_effect(),
            "layout": training.parallel.layout(), "metrics": last, "replicas": replicas,
            "replicas_identical": identical, "plan": plan_block,
            "checkpoint": saving.summary_block(run.saver.asynchronous, saves),
        })


def measure_peak(cfg, device: torch.device) -> float:
    peak = cfg.train.peak_tflops or metrics.measure_matmul_tflops(
        torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32, device)
    log.info("peak %.3f TFLOP/s per rank (%s)", peak, "configured" if cfg.train.peak_tflops else "measured")
    return peak


@dataclass
class Run:
    """What the loop needs beside the training: rank 0's sinks, the MFU inputs, the memory
    figures for the summary, and a hook called after every optimizer step (elastic training
    commits there)."""
    run_dir: Path
    max_steps: int
    progress_bar: bool
    flops_per_token: float
    peak_tflops: float
    memory: dict
    after_step: Callable[[Window], None] = lambda window: None
    logger: metrics.NullLogger = field(default_factory=metrics.NullLogger)
    profiler: Optional[StepProfiler] = None  # train.profile_steps; rank 0 records
    saver: Optional[saving.Saver] = None  # the checkpoint saves and their stalls
    # The planner's prediction for this run (rank 0's: app/plan/training.py) and what the loop
    # measured against it: each optimizer step's seconds on this rank, the compile warm-up left out.
    plan: planning.PlannedRun = field(default_factory=planning.PlannedRun)
    step_seconds: List[float] = field(default_factory=list)

    def open_logger(self, step: int) -> None:
        """Rank 0's TensorBoard, metrics.jsonl and progress bar (appending: an elastic run whose rank
        0 changed stays one log), a silent logger elsewhere."""
        self.logger.close()
        self.logger = (metrics.RunLogger(self.run_dir, self.max_steps, step, self.progress_bar) if dist.is_main()
                       else metrics.NullLogger())


def train(cfg, run_dir: Path) -> dict:
    elastic.check_launch(cfg)
    device = start_rank(cfg, run_dir)
    # Under elastic a worker may join mid-run while the others come from a reset, so no collective
    # may run before the loop (app/elastic.py): threads are placed on entering it, the data is
    # prepared before the job (launch.sh --elastic does) and rank 0 alone resumes.
    if not cfg.train.elastic:
        place_threads(cfg)
        dist.run_on_main(lambda: prepare_data(cfg, run_dir), name="prepare")  # its errors reach every rank
    # Model-state memory is the peak less this: the interpreter and libraries do not shrink with sharding.
    memory = {"before_model_bytes": metrics.process_memory_bytes(device), "malloc": allocator.active()}
    training = build_training(cfg, device)  # task, plain model, optimizer, parallelism
    if cfg.train.elastic and dist.is_main():
        copy_tokenizer(cfg, run_dir)
    flops_per_token = training.flops_per_token
    log.info("model %s: %.2fM parameters, %.1f MFLOPs/token; layout %s; compile %s", cfg.model.name,
             training.parameters / 1e6, flops_per_token / 1e6, training.parallel.layout(),
             config.compilation_mode(cfg.train.compile))
    shortfall = plan.shortfall_warning(cfg, models.count_parameters(training.model), dist.size(), dist.local_size(),
                                       device)
    if shortfall:
        log.warning(shortfall)
    state = checkpoint.TrainState(
        world_size=dist.size(), model_signature=checkpoint.model_signature(training.model),
        tokenizer_sha256=training.task.tokenizer_sha256, config=OmegaConf.to_container(cfg, resolve=True),
    )
    start_error = None
    if cfg.train.elastic:
        start_error = elastic.resume_on_main(cfg, run_dir, training, state)
    else:
        resume_or_start(cfg, run_dir, training, state)
    run = Run(run_dir, cfg.train.max_steps, cfg.train.progress_bar, flops_per_token, measure_peak(cfg, device), memory)
    if dist.is_main() or cfg.train.elastic:  # rank 0 writes the plan block; an elastic world's rank 0 may change
        run.plan = planning.predict_run(cfg, dist.size(), log.warning, log.info)
    run.open_logger(state.step)
    run.logger.text("config", "```\n" + OmegaConf.to_yaml(cfg) + "\n```")
    timeline = dist.start_timeline(run_dir)
    if timeline:
        log.info("Horovod timeline: %s", timeline)
    run.saver = saving.Saver(run_dir, training.model, cfg.train.keep_last, cfg.train.checkpoint_async)
    run.profiler = StepProfiler(list(cfg.train.profile_steps), run_dir, device, enabled=dist.is_main())
    if cfg.train.elastic:
        return elastic.run_loop(cfg, training, state, run, train_steps, start_error)
    return train_steps(cfg, run_dir, training, state, run)


def record_samples(run_dir: Path, step: int, samples: List[range]) -> None:
    """train.record_samples: the global sample indices this rank trained on in optimizer step
    `step`, appended to its own file. Every rank writes here, as it checks what each rank read;
    a line is one write, whole even when the process is killed right after."""
    row = {"step": step, "rank": dist.rank(), "world_size": dist.size(), "time": time.time(),
           "samples": [index for micro_batch in samples for index in micro_batch]}
    with open(run_dir / f"samples.rank{dist.rank()}.jsonl", "a", encoding="utf-8") as file:
        file.write(json.dumps(row) + "\n")


def end_compile_warmup(window: Window, timer: PhaseTimer, state, logger, seconds: float) -> Window:
    """The first step also compiled the model: its time is reported on its own
    (time/compile_warmup_s, the mean over ranks) and throughput is measured from the next step."""
    window.count_tokens(state)  # its tokens were trained on: they count, only not in tokens/s
    timer.take()
    warmup_s = dist.sum_over_ranks(torch.tensor([seconds], dtype=torch.float64), name="compile_warmup").item()
    warmup_s /= dist.size()
    logger.log(state.step, {"time/compile_warmup_s": warmup_s, "tokens_seen": state.tokens_seen})
    log.info("step %d also compiled the model: %.1f s, left out of tokens/s and MFU", state.step, warmup_s)
    logger.progress(window.steps)  # the window is dropped, its step still done
    return Window(window.device)


def stop_recording(run_dir: Path, training: Training, profiler: StepProfiler) -> None:
    """End what ran beside the steps: the batch thread, the profiler, Horovod's timeline and autotuner."""
    training.batches.close()
    profiler.close()
    dist.stop_timeline()
    autotune_log = dist.save_autotune_log(run_dir)
    if autotune_log:
        log.info("Horovod autotune log: %s", autotune_log)


def train_steps(cfg, run_dir: Path, training: Training, state, run: Run) -> dict:
    """The loop from state.step to train.max_steps, then the run's end; returns the last metrics."""
    training.model.train()
    timer, window, last = PhaseTimer(training.device), Window(training.device), {}
    warmup_pending = training.compiled
    while state.step < cfg.train.max_steps:
        lr = optim.lr_at(state.step, cfg.optim, cfg.train.max_steps, dist.data_position()[1])
        optim.set_lr(training.optimizer, lr)
        run.profiler.before_step(state.step + 1)
        step_started = time.perf_counter()
        output = train_step(training, state.samples_seen, state.step, timer)
        step_s = time.perf_counter() - step_started
        state.step += 1
        state.samples_seen += training.task.stream.global_batch
        if cfg.train.record_samples:
            record_samples(run_dir, state.step, output.samples)
        window.add(output)
        run.profiler.after_step(state.step)
        if warmup_pending:
            window = end_compile_warmup(window, timer, state, run.logger, step_s)
            warmup_pending = False
        else:
            run.step_seconds.append(step_s)
        # Logging is the only place that reads values back from the device or talks to other
        # ranks outside the layout's own traffic, and only every log_every steps.
        if window.steps and (state.step % cfg.train.log_every == 0 or state.step == cfg.train.max_steps):
            last = window_metrics(window, timer.take(), state, lr, output, run.flops_per_token, run.peak_tflops)
            log_window(last, state, cfg, run.logger, window)
            window = Window(training.device)
        if cfg.train.eval_every and (state.step % cfg.train.eval_every == 0 or state.step == cfg.train.max_steps):
            eval_started = time.perf_counter()
            last.update(evaluate(cfg, training, state, run.logger))
            window.started += time.perf_counter() - eval_started  # throughput counts training only
        # Ranks agree on a stop at log steps only, so a signal costs no per-step collective.
        stop_now = state.step % cfg.train.log_every == 0 and stop.agreed()
        if stop_now or (cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0):
            save_checkpoint(run, training, state, window)
        if stop_now:
            run.saver.finish()
            log.warning("stop requested by signal: checkpointed at step %d, exiting", state.step)
            stop_recording(run_dir, training, run.profiler)
            run.logger.close()
            return last
        run.after_step(window)

    run.memory["training_peak_bytes"] = metrics.peak_memory_bytes(training.device)  # before the final gathers
    training.parallel.finish()
    if cfg.train.final_checkpoint and (not cfg.train.checkpoint_every or state.step % cfg.train.checkpoint_every):
        save_checkpoint(run, training, state, window)
    run.saver.finish()
    stop_recording(run_dir, training, run.profiler)
    finish_run(cfg, run_dir, training, state, last, run)
    run.logger.close()
    return last


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def hydra_main(cfg) -> None:
    try:
        config.validate(cfg)
        train(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (config.ConfigError, FileNotFoundError, ValueError) as error:  # a CheckpointError is a ValueError
        log.error("%s", error)
        sys.exit(2)


def main() -> None:
    stop.install()  # first: a signal during start-up still ends in a checkpoint
    try:
        sys.argv[1:] = planning.auto_argv(sys.argv[1:])  # the mesh is read at start-up: pick before it
    except config.ConfigError as error:
        cli.fail(str(error))
    startup = cli.startup_config(sys.argv[1:])
    allocator.ensure(startup)  # may re-execute this process: before Horovod starts
    try:
        dist.init(startup.horovod, startup.parallel)
        stamp = dist.run_stamp()
    except ValueError as error:  # a layout the world size cannot take: one line on every rank
        cli.fail(str(error))
    OmegaConf.register_new_resolver("run_stamp", lambda: stamp, replace=True)
    config.register()
    hydra_main()


if __name__ == "__main__":
    main()
