"""Draw one training step as a PNG: the step's phases from the torch.profiler trace
(train.profile_steps) above Horovod's negotiations and allreduces from its timeline
(horovod.timeline), on one clock. The README's picture is drawn by this.

    python scripts/step_timeline.py RUN_DIR STEP OUT.png

Both traces are Chrome-trace JSON written by rank 0: the profiler's times count from its
baseTimeNanoseconds, Horovod's from the start time in its first metadata event; both are turned
into microseconds since the epoch."""
import json
import sys
from pathlib import Path
from typing import Dict, List, Tuple

from PIL import Image, ImageDraw

Span = Tuple[float, float]  # start, end: microseconds since the epoch
PHASES = ("data", "forward", "backward", "allreduce_wait", "optimizer", "parameter_average")
COLOURS = {"data": "#9e9e9e", "forward": "#4c78a8", "backward": "#f58518", "allreduce_wait": "#e45756",
           "optimizer": "#54a24b", "parameter_average": "#b279a2", "negotiate": "#bab0ac", "allreduce": "#72b7b2"}
WIDTH, LANE_H, LEFT, TOP = 1400, 34, 190, 40


def profiler_spans(run_dir: Path, step: int) -> Tuple[Span, Dict[str, List[Span]]]:
    """The step's own range and its phases' ranges (app/step.py PhaseTimer names them)."""
    trace = json.loads(next((run_dir / "profile").glob("*.pt.trace.json")).read_text())
    base_us = trace["baseTimeNanoseconds"] / 1000

    def span(event) -> Span:
        return base_us + event["ts"], base_us + event["ts"] + event["dur"]

    ranges = [e for e in trace["traceEvents"] if e.get("cat") == "user_annotation"]
    step_span = next(span(e) for e in ranges if e["name"] == f"ProfilerStep#{step}")
    phases: Dict[str, List[Span]] = {}
    for event in ranges:
        start, end = span(event)
        if event["name"].startswith("phase/") and step_span[0] <= start and end <= step_span[1]:
            phases.setdefault(event["name"][len("phase/"):], []).append((start, end))
    return step_span, phases


def horovod_spans(run_dir: Path, window: Span) -> Dict[str, List[Span]]:
    """Negotiation and allreduce ranges (B/E pairs, one track per tensor) inside `window`."""
    events = json.loads((run_dir / "horovod_timeline.json").read_text())
    start_us = next(e["args"]["start_time_since_epoch_in_micros"] for e in events
                    if e.get("args", {}).get("start_time_since_epoch_in_micros"))
    open_ranges: Dict[int, List[Tuple[str, float]]] = {}
    lanes: Dict[str, List[Span]] = {"negotiate": [], "allreduce": []}
    for event in events:
        if event.get("ph") == "B":
            open_ranges.setdefault(event["pid"], []).append((event["name"], start_us + event["ts"]))
        elif event.get("ph") == "E" and open_ranges.get(event["pid"]):
            name, began = open_ranges[event["pid"]].pop()
            lane = "negotiate" if name.startswith("NEGOTIATE") else "allreduce" if name == "ALLREDUCE" else None
            if lane and window[0] <= began and start_us + event["ts"] <= window[1]:
                lanes[lane].append((began, start_us + event["ts"]))
    return lanes


def draw(step: int, step_span: Span, lanes: Dict[str, List[Span]], out: Path) -> None:
    names = [n for n in PHASES if n in lanes] + ["negotiate", "allreduce"]
    image = Image.new("RGB", (WIDTH, TOP + LANE_H * len(names) + 50), "white")
    pen = ImageDraw.Draw(image)
    begin, length_us = step_span[0], step_span[1] - step_span[0]

    def x(t: float) -> float:
        return LEFT + (t - begin) / length_us * (WIDTH - LEFT - 20)

    pen.text((10, 10), f"one training step (step {step}, rank 0): {length_us / 1000:.0f} ms", fill="black")
    for row, name in enumerate(names):
        y = TOP + row * LANE_H
        label = {"negotiate": "Horovod negotiate", "allreduce": "Horovod allreduce"}.get(name, name)
        pen.text((10, y + 10), label, fill="black")
        for start, end in lanes.get(name, []):
            pen.rectangle([x(start), y + 4, max(x(end), x(start) + 1), y + LANE_H - 4], fill=COLOURS[name])
    axis_y = TOP + LANE_H * len(names) + 10
    pen.line([LEFT, axis_y, WIDTH - 20, axis_y], fill="black")
    for tick in range(11):
        t = begin + length_us * tick / 10
        pen.line([x(t), axis_y, x(t), axis_y + 5], fill="black")
        pen.text((x(t) - 12, axis_y + 8), f"{(t - begin) / 1000:.0f} ms", fill="black")
    image.save(out)


def main() -> None:
    run_dir, step, out = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    step_span, phases = profiler_spans(run_dir, step)
    draw(step, step_span, {**phases, **horovod_spans(run_dir, step_span)}, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
