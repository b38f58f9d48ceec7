"""The benchmark's results as Markdown: a table per section, the targets after throughput."""
from typing import List

from app.bench.breakdown import PHASES

# How each bench.launcher starts a Horovod job, and so which controller runs the allreduces.
_LAUNCHED_BY = {"mpi": "mpirun (Horovod's MPI controller)", "gloo": "horovodrun --gloo (Gloo controller)"}


def _table(header: List[str], rows: List[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _size(n_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:g} {unit}"
    return f"{n_bytes} B"


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def machine(results: dict) -> str:
    m = results["machine"]
    flags = ", ".join(m["cpu_flags"]) or "none of note"
    return (f"# Benchmark: {results['config']['model']} on {m['cpu']} ({m['cores']} cores; flags: {flags})\n\n"
            f"torch {m['torch']}, horovod {m['horovod']}, transformers {m['transformers']}; "
            f"took {results['elapsed_s']:.0f} s. Results in bench.json; launch logs under work/.")


def peak(section: dict) -> str:
    cores, size = section["cores"], section["matrix_size"]
    rows = [[precision, f"{p['tflops_1_thread']:.3f}", f"{p['tflops_all_cores']:.3f}",
             f"{p['all_cores_over_cores_x_1_thread']:.2f}"] for precision, p in section["precisions"].items()]
    header = ["precision", "1 thread", f"all {cores} cores", f"all cores / ({cores} x 1 thread)"]
    return f"## Matmul peak (TFLOP/s, {size}x{size} matmul, best of trials)\n\n" + _table(header, rows)


def _warmup(run: dict) -> str:
    seconds = run.get("compile_warmup_s") or run.get("first_step_s")
    return f"{seconds:.1f}" if seconds else ""


def throughput(section: dict) -> str:
    rows = [[r["method"], r["precision"], r["processes"], f"{r['tokens_per_second']:,.0f}",
             f"{r['tokens_per_second_per_process']:,.0f}", _percent(r["mfu"]),
             _percent(r["scaling_efficiency"]) if "scaling_efficiency" in r else "", _warmup(r)]
            for r in section["runs"]]
    note = (f"{section['model']}: {section['parameters'] / 1e6:.2f}M parameters, "
            f"{section['flops_per_token'] / 1e6:.1f} MFLOPs/token, {section['tokens_per_step_per_process']:,} tokens "
            f"per step per process, {section['threads_per_process']} thread(s) per process; "
            f"{section['measure_steps']} steps timed after {section['warmup_steps']} warm-up steps. "
            "MFU is against the matmul peak at the same thread count; scaling efficiency is tokens/s at p processes "
            f"over p x tokens/s at 1. trainer: python -m app.train under {_LAUNCHED_BY[section['launcher']]}; "
            "plain: a PyTorch loop, no Horovod; ddp: DistributedDataParallel, Gloo, torchrun, its ranks pinned to cores as the trainer pins "
            "its own (train.bind_cores).")
    if section.get("trainer_compile", "false") != "false":
        note += (f" trainer_compile: the trainer with train.compile={section['trainer_compile']}; its first step "
                 "compiles, reported as warm-up and left out of tokens/s.")
    if any(r["method"].startswith("hf_trainer") for r in section["runs"]):
        note += (" hf_trainer: transformers.Trainer (fused AdamW, bf16=True in bf16 rows; no evaluation, saving or "
                 "logging) on the same model, windows and batch; hf_trainer_compile: with torch_compile=True; "
                 "warm-up is its first step.")
    if section.get("untuned_overrides"):
        note += f" trainer_untuned: the trainer with {' '.join(section['untuned_overrides'])}."
    if section.get("ddp_skipped"):
        note += f" DDP skipped: {section['ddp_skipped']}."
    header = ["method", "precision", "processes", "tokens/s", "tokens/s per process", "MFU", "scaling efficiency",
              "warm-up (s)"]
    return "## Training throughput\n\n" + note + "\n\n" + _table(header, rows)


def targets(section: dict) -> str:
    rows = [[t["name"], t["precision"], f"{t['value']:.3f}", f">= {t['threshold']:.2f}",
             "yes" if t["met"] else "**no**"] for t in section["targets"]]
    header = ["ratio", "precision", "measured", "target", "met"]
    return "## Targets (measured, not asserted)\n\n" + _table(header, rows)


def bandwidth(section: dict) -> str:
    launchers = list(section["launchers"])
    by_size = {}
    for launcher in launchers:
        for row in section["launchers"][launcher]["rows"]:
            by_size.setdefault(row["bytes"], {})[launcher] = row
    header = ["size"]
    for launcher in launchers:
        header += [f"{launcher} time (us)", f"{launcher} algbw (GB/s)", f"{launcher} busbw (GB/s)"]
    rows = []
    for size, cells in sorted(by_size.items()):
        row = [_size(size)]
        for launcher in launchers:
            r = cells.get(launcher)
            row += [f"{r['time_s'] * 1e6:,.0f}", f"{r['algbw_gbps']:.3f}", f"{r['busbw_gbps']:.3f}"] if r else [""] * 3
        rows.append(row)
    return (f"## Allreduce bandwidth ({section['processes']} processes, float32, through Horovod)\n\n"
            "algbw = bytes / time; busbw = algbw x 2(n-1)/n, as nccl-tests defines them. "
            f"gloo: {_LAUNCHED_BY['gloo']}; mpi: {_LAUNCHED_BY['mpi']}. Each message waits for Horovod's next "
            "background cycle (HOROVOD_CYCLE_TIME), so small sizes show Horovod's latency more than the transport's.\n\n"
            + _table(header, rows))


def fusion(section: dict) -> str:
    rows = [[_size(r["fusion_threshold_bytes"]) if r["fusion_threshold_bytes"] else "0 (off)",
             f"{r['cycle_time_ms']:g} ms", f"{r['median_s'] * 1e3:.2f}", f"{r['min_s'] * 1e3:.2f}"]
            for r in section["rows"]]
    first = section["rows"][0]
    header = ["HOROVOD_FUSION_THRESHOLD", "HOROVOD_CYCLE_TIME", "median ms per set", "min ms per set"]
    return (f"## Gradient-set allreduce vs fusion threshold and cycle time\n\n{section['model']}'s gradients: "
            f"{first['tensors']} tensors, {_size(first['bytes'])}, one allreduce_async_ each in backward order; "
            f"{_LAUNCHED_BY[section['launcher']]}, {section['processes']} processes, {first['sets']} sets timed.\n\n"
            + _table(header, rows))


def breakdown(section: dict) -> str:
    seconds = section["seconds_per_step"]
    rows = [[phase.replace("_", " "), f"{seconds[phase] * 1e3:.1f}", _percent(seconds[phase] / seconds["step"])]
            for phase in PHASES]
    rows.append(["step (wall)", f"{seconds['step'] * 1e3:.1f}", "100%"])
    standalone_ms = section["standalone_allreduce"]["median_s"] * 1e3
    return (f"## Step-time breakdown ({section['precision']}, {section['processes']} processes over "
            f"{section['controller'].upper()}, "
            f"{section['threads']} thread(s) each, {section['tokens_per_second']:,.0f} tokens/s)\n\n"
            + _table(["phase", "ms per step", "share"], rows)
            + "\n\nBackward overlaps the allreduce: Horovod's hooks send each gradient as backward produces it, "
            "so 'backward' includes what the concurrent sends take from compute, and 'allreduce wait' "
            "(optimizer.synchronize) is the part left exposed, plus any wait for a slower rank's backward. "
            f"The same gradient set allreduced alone takes {standalone_ms:.1f} ms; about "
            f"{_percent(section['hidden_fraction'])} of it is hidden behind backward (1 - wait / standalone).")


# Timeline characters: micro-batch i's forward is the digit i, its backward the letter (a = 0).
_BACKWARD_MARKS = "abcdefghijklmnopqrstuvwxyz"


def timeline(ranks: list, width: int = 72) -> str:
    """One step of each stage (of the first pipeline) as a row of characters on a shared clock."""
    stages = {}
    for rank in ranks:
        stages.setdefault(rank["stage"], rank["timeline"])
    events = [event for rows in stages.values() for event in rows]
    start, end = min(e[2] for e in events), max(e[3] for e in events)
    lines = []
    for stage, rows in sorted(stages.items()):
        cells = ["."] * width
        for kind, i, t0, t1 in rows:
            first = int((t0 - start) / (end - start) * width)
            last = max(first + 1, int((t1 - start) / (end - start) * width))
            mark = str(i % 10) if kind == "F" else _BACKWARD_MARKS[i % 26]
            cells[first:last] = mark * (min(last, width) - first)
        lines.append(f"stage {stage} |{''.join(cells)}|")
    return "\n".join(lines) + f"\n         0 ms{' ' * (width - 12)}{(end - start) * 1e3:.0f} ms"


def pipeline(section: dict) -> str:
    rows = []
    for name in ("data_parallel", "pipeline"):
        run = section[name]
        bubble = _percent(run["bubble_fraction"]) if name == "pipeline" else ""
        ideal = _percent(run["layout"]["ideal_bubble_fraction"]) if name == "pipeline" else ""
        memory = ", ".join(f"{r['peak_memory_bytes'] / 2**20:.0f}" for r in sorted(run["ranks"], key=lambda r: r["rank"]))
        rows.append([run["layout"]["mode"], run["processes"], f"{run['tokens_per_second']:,.0f}", bubble, ideal, memory])
    run = section["pipeline"]
    header = ["layout", "processes", "tokens/s", "bubble (measured)", "bubble (ideal)", "peak memory per rank (MiB)"]
    return (f"## Pipeline against data parallelism ({section['model']}, {run['precision']}, {run['micro_batches']} "
            f"micro-batches of {run['micro_batch_size']} per step, {run['measured_steps']} steps timed)\n\n"
            + _table(header, rows)
            + "\n\nMeasured bubble: each rank's share of its forward/backward span spent waiting on a neighbour, "
            "averaged; ideal: (P-1)/(m+P-1). One step of the pipeline (digit i: micro-batch i's forward, letter: "
            "its backward, a = 0; '.': waiting):\n\n```\n" + timeline(run["ranks"]) + "\n```")


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.0f}"


def memory(section: dict) -> str:
    rows = []
    for r in section["runs"]:
        held, predicted = r["held_bytes_rank0"], r["predicted_model_state_bytes"]
        peaks = " / ".join(_mib(b) for b in r["peak_bytes_per_rank"])
        rows.append([r["zero_stage"], r["activation_checkpointing"], r["malloc"], peaks,
                     _mib(r["model_state_bytes"]), _mib(sum(predicted.values())),
                     f"{_mib(held['parameters'])} / {_mib(held['optimizer_state'])}", f"{r['tokens_per_second']:,.0f}"])
    header = ["ZeRO stage", "activation checkpointing", "malloc", "peak MiB per rank", "model state MiB (peak - before model)",
              "predicted model state MiB", "held at rest MiB (params / optimizer), rank 0", "tokens/s"]
    note = (f"{section['model']} ({section['parameters'] / 1e6:.1f}M parameters), {section['processes']} ranks under "
            f"{_LAUNCHED_BY[section['launcher']]}, {section['precision']}, {section['optimizer']}, micro-batch "
            f"{section['micro_batch_size']} x {section['seq_len']} tokens. Predicted: 4 bytes/parameter of weights and "
            "of gradients and the optimizer's state, each divided by the ranks from the stage that shards it "
            "(app/plan.py); activations are in the measured column only.")
    target_rows = [[t["name"], f"{t['value']:.3f}", ("<= " if t["at_most"] else ">= ") + f"{t['threshold']:.2f}",
                    "yes" if t["met"] else "**no**", t["formula"]] for t in section["targets"]]
    return ("## Memory per rank under ZeRO\n\n" + note + "\n\n" + _table(header, rows) + "\n\n"
            + _table(["ratio", "measured", "target", "met", "measured as"], target_rows))


def tensor(section: dict) -> str:
    rows = []
    for r in section["rows"]:
        layout = r["layout"]
        rows.append([f"tensor {layout.get('tensor', 1)} x data {layout.get('data', layout['world_size'])}",
                     r["micro_batch_per_rank"], f"{r['seconds_per_step'] * 1e3:,.0f}", f"{r['tokens_per_second']:,.0f}",
                     _size(int(r["tensor_payload_bytes_per_step"])), _size(int(r["megatron_tensor_payload"])),
                     _size(int(r["data_payload_bytes_per_step"])), _size(int(r["sent_estimate_bytes_per_step"]))])
    header = ["layout", "micro-batch per rank", "ms per step", "tokens/s", "tensor-parallel allreduce payload",
              "Megatron 4·L·b·s·h·4 B", "gradient allreduce payload", "sent per rank (ring)"]
    return (f"## Tensor vs data parallelism ({section['model']}, {section['precision']}, "
            f"{_LAUNCHED_BY[section['launcher']]}, global batch {section['rows'][0]['global_batch']})\n\n"
            "Bytes per rank per step, fp32 on the wire. The tensor-parallel payload also holds the embedding's "
            "forward sum, the LM head input's backward sum and the loss's per-token sums, which Megatron's "
            "per-block formula leaves out; a ring allreduce sends 2(n-1)/n of its payload from each rank.\n\n"
            + _table(header, rows))


def _layout_row(r: dict) -> list:
    row = [r["cell"], r["processes"], f"P{r['pipeline']} x T{r['tensor']} x D{r['data']}", r["zero_stage"],
           r["schedule"] or ""]
    if r["refused"]:
        row += ["", "", "", ""]
    else:
        peaks = " / ".join(_mib(b) for b in r["peak_memory_bytes_per_rank"])
        row += [f"{r['tokens_per_second']:,.0f}", f"{r['seconds_per_step']:.3f}", peaks, _mib(r["max_peak_memory_bytes"])]
    return row + ["yes" if r["oversubscribed"] else "no", f"refused: {r['refused']}" if r["refused"] else ""]


def layouts(section: dict) -> str:
    header = ["cell", "ranks", "mesh", "ZeRO", "schedule", "tokens/s", "s/step", "peak memory per rank (MiB)",
              "max (MiB)", "oversubscribed", "refused"]
    return (f"## Layouts ({section['model']}, {section['precision']}, global batch {section['global_batch']} in "
            f"{section['micro_batches']} micro-batches per step, {section['measure_steps']} timed steps after "
            f"{section['warmup_steps']} warm-up, {section['cores']} cores)\n\n"
            "Peak memory: each rank's resident-set high-water mark on a CPU (the allocator's peak on a GPU), "
            "the interpreter and libraries included. Oversubscribed: more ranks than cores, so ranks time-share "
            "the cores and tokens/s compare layouts poorly. Refused: the one line the trainer's config check "
            "gave at start-up.\n\n" + _table(header, [_layout_row(r) for r in section["rows"]]))


def _ratio(value) -> str:
    return "" if value is None else f"{value:.2f}x"


def _signed(value) -> str:
    return "" if value is None else f"{100 * value:+.1f}%"


def _fitted(fitted: dict) -> str:
    if not fitted:
        return ""
    held_out = "; ".join(f"{model} with the others' fit ({v['backward_overlap']:.2f}, {v['activation_factor']:.2f}): "
                         f"step {_percent(v['median_step_error'])}, memory {_percent(v['median_memory_error'])}"
                         for model, v in fitted["held_out"].items())
    return (f" Fitted to these rows: backward_overlap {fitted['backward_overlap']:.2f} (median step-time error "
            f"{_percent(fitted['median_step_error'])}), activation_factor {fitted['activation_factor']:.2f} (median "
            f"peak-memory error {_percent(fitted['median_memory_error'])})" + (f"; held out: {held_out}." if held_out else "."))


def planner(section: dict) -> str:
    targets = section["targets"]
    rows = [[r["model"], r["cell"], r["processes"], "yes" if r["oversubscribed"] else "no"]
            + ([f"refused: {r['refused']}", "", "", "", "", ""] if r["refused"] else
               [f"{r['predicted_step_s']:.3f}", f"{r['measured_step_s']:.3f}", _signed(r["step_error"]),
                _mib(r["predicted_peak_bytes"]), _mib(r["measured_peak_bytes"]), _signed(r["memory_error"])])
            for r in section["rows"]]
    picks = [[c["model"], "none" if c["cap_gib"] is None else f"{c['cap_gib']:g}", c["fastest"] or "nothing fits",
              c.get("pick", ""), _ratio(c.get("pick_over_fastest")), c.get("rule") or "", _ratio(c.get("rule_over_fastest"))]
             for c in section["picks"]]
    spearman = ", ".join(f"{m} {v:.2f}" if v is not None else f"{m} n/a" for m, v in section["spearman"].items())
    summary = (f"Median step-time error {_percent(section['median_step_error'] or 0)} (target at most "
               f"{_percent(targets['max_step_error'])}); Spearman {spearman} (target at least {targets['min_spearman']}); "
               f"median peak-memory error {_percent(section['median_memory_error'] or 0)} (target at most "
               f"{_percent(targets['max_memory_error'])}); picks within {_percent(targets['max_pick_slowdown'])} of "
               f"the fastest: {section['picks_within_target']} of {section['picks_judged']}." + _fitted(section["fitted"]))
    return (f"## Planner ({section['precision']}, {section['processes']} ranks, global batch "
            f"{section['global_batch']}, median of {section['repeats']} interleaved runs; {section['profile']})\n\n"
            + summary + "\n\n" + _table(["model", "cell", "ranks", "oversubscribed", "predicted s/step",
                                          "measured s/step", "error", "predicted peak (MiB)", "measured peak (MiB)",
                                          "error"], rows)
            + "\n\n" + _table(["model", "cap GiB", "fastest measured", "planner's pick", "pick / fastest",
                                 "plain rule", "rule / fastest"], picks))


def checkpoint(section: dict) -> str:
    disk = section["disk_write_bytes_per_s"]
    note = (f"{section['model']} at ZeRO-{section['zero_stage']} on {section['processes']} ranks"
            + (" (oversubscribed: more ranks than cores)" if section["oversubscribed"] else "")
            + f", {section['precision']}, micro-batch {section['micro_batch_size']} x {section['seq_len']} tokens, "
            f"a save every {section['checkpoint_every']} of {section['steps']} steps. Stall: the seconds the loop "
            "waited (sync: the whole save; async: the copy, the previous writer and its commit; the slowest rank). "
            "Write: every rank's shard files in parallel, bytes over the slowest rank's seconds, beside this disk's "
            f"sequential write speed (dd, fdatasync'ed: {disk / 1e9:.2f} GB/s).")
    save_rows = [[mode, s["step"], f"{s['stall_s']:.2f}", f"{s['write_s']:.2f}", _size(s["shard_bytes"]),
                  f"{s['write_bytes_per_s'] / 1e9:.2f}", _percent(s["of_disk"])]
                 for mode, run in section["modes"].items() for s in run["saves"]]
    memory_rows = [[mode, r["rank"], _mib(r["training_peak_rss_bytes"]), _mib(r["save_peak_rss_bytes"]),
                    f"{r['ratio']:.3f}"] for mode, run in section["modes"].items() for r in run["memory"]]
    resumed = section["resume"]
    resume_note = ("Not resumed (checkpoint.resume_processes=0). " if resumed is None else
                   f"Resumed from step {resumed['from_step']} on {resumed['processes']} ranks"
                   + (" (oversubscribed)" if resumed["oversubscribed"] else "")
                   + f": loss at step {resumed['step']} {resumed['loss']:.6f}, the first run's "
                   f"{resumed['first_run_loss']:.6f} (difference {resumed['difference']:.2e}). ")
    resume_note += f"Export peak RSS: {_mib(section['export_peak_rss_bytes'])} MiB."
    target_rows = [[t["name"], f"{t['value']:.3g}", t["target"], "yes" if t["met"] else "**no**"]
                   for t in section["targets"]]
    return ("## Checkpoints\n\n" + note + "\n\n"
            + _table(["saves", "step", "stall (s)", "write (s)", "shards", "write GB/s", "of disk"], save_rows)
            + "\n\n" + _table(["saves", "rank", "training peak RSS (MiB)", "save peak RSS (MiB)", "ratio"],
                                memory_rows)
            + "\n\n" + resume_note + "\n\n" + _table(["target", "measured", "wanted", "met"], target_rows))


def errors(failed: dict) -> str:
    lines = [f"- {name}: {message.splitlines()[0]}" for name, message in failed.items()]
    return "## Sections that failed\n\n" + "\n".join(lines)


SECTIONS = {"peak": peak, "throughput": throughput, "bandwidth": bandwidth, "fusion": fusion, "breakdown": breakdown,
            "pipeline": pipeline, "memory": memory, "tensor": tensor, "layouts": layouts, "planner": planner,
            "checkpoint": checkpoint}


def markdown(results: dict) -> str:
    parts = [machine(results)]
    for name, render in SECTIONS.items():
        if name in results:
            parts.append(render(results[name]))
            if name == "throughput":
                parts.append(targets(results[name]))
    if results.get("errors"):
        parts.append(errors(results["errors"]))
    return "\n\n".join(parts) + "\n"
