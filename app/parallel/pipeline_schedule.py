"""The order in which one pipeline stage runs its micro-batches' forward and backward passes.

A schedule is a list of actions, ("F", i) or ("B", i), for one stage; the executor
(app/parallel/pipeline.py) runs it and receives whatever each action needs from its neighbours.

- GPipe (Huang et al. 2019; torchtitan's ScheduleGPipe): every forward, then every backward.
  Simple, but each stage keeps all m micro-batches' activations until its backwards start.
- 1F1B (PipeDream-Flush; Megatron-LM's forward_backward_pipelining_without_interleaving,
  torchtitan's Schedule1F1B): stage s first runs P - s - 1 warm-up forwards, then alternates one
  forward and one backward, then drains the remaining backwards. The bubble is the same as
  GPipe's, (P - 1) / (m + P - 1) of the step, but a stage holds at most P - s micro-batches'
  activations instead of m.
"""
from typing import List, Tuple

FORWARD, BACKWARD = "F", "B"
SCHEDULES = ("gpipe", "1f1b")
Action = Tuple[str, int]


def gpipe(stage: int, stages: int, micro_batches: int) -> List[Action]:
    return [(FORWARD, i) for i in range(micro_batches)] + [(BACKWARD, i) for i in range(micro_batches)]


def one_forward_one_backward(stage: int, stages: int, micro_batches: int) -> List[Action]:
    warmup = min(stages - stage - 1, micro_batches)
    actions = [(FORWARD, i) for i in range(warmup)]
    for i in range(micro_batches - warmup):
        actions += [(FORWARD, warmup + i), (BACKWARD, i)]
    return actions + [(BACKWARD, i) for i in range(micro_batches - warmup, micro_batches)]


def actions(schedule: str, stage: int, stages: int, micro_batches: int) -> List[Action]:
    if schedule not in SCHEDULES:
        raise ValueError(f"parallel.schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
    build = gpipe if schedule == "gpipe" else one_forward_one_backward
    return build(stage, stages, micro_batches)


def receives(plan: List[Action], stage: int, stages: int) -> List[Action]:
    """What this stage receives, in the order it needs it: the activation before each forward
    (all but the first stage) and the output's gradient before each backward (all but the last)."""
    return [(kind, i) for kind, i in plan
            if (kind == FORWARD and stage > 0) or (kind == BACKWARD and stage < stages - 1)]


def ideal_bubble_fraction(stages: int, micro_batches: int) -> float:
    """The idle share of a step when every stage's forward and backward take equal time."""
    return (stages - 1) / (micro_batches + stages - 1)


def most_activations_held(plan: List[Action]) -> int:
    """The largest number of micro-batches whose activations the stage holds at once."""
    held = peak = 0
    for kind, _ in plan:
        held += 1 if kind == FORWARD else -1
        peak = max(peak, held)
    return peak
