"""Model-state bytes per rank under ZeRO: the formula the benchmark prints beside what it measures.

Per parameter, in fp32: 4 bytes of weights, 4 of gradient, and the optimizer's state (AdamW and
Adam 8: two moments; SGD with momentum 4; plain SGD 0). Stage 1 divides the optimizer state by
the world size, stage 2 the gradients too, stage 3 the weights too (ZeRO paper, section 5).
Activations are not modelled here (see README, "Sharding and activation checkpointing")."""

OPTIMIZER_BYTES_PER_PARAMETER = {"adamw": 8, "adam": 8, "sgd_momentum": 4, "sgd": 0}


def optimizer_bytes_per_parameter(optim_name: str, momentum: float = 0.0) -> int:
    if optim_name == "sgd":
        return OPTIMIZER_BYTES_PER_PARAMETER["sgd_momentum" if momentum else "sgd"]
    return OPTIMIZER_BYTES_PER_PARAMETER[optim_name]


def model_state_bytes(parameters: int, stage: int, world: int, optimizer_bytes: int = 8) -> dict:
    """Bytes per rank for weights, gradients and optimizer state at a ZeRO stage."""
    def share(sharded: bool) -> float:
        return parameters / world if sharded else parameters

    return {"parameters": 4 * share(stage >= 3), "gradients": 4 * share(stage >= 2),
            "optimizer_state": optimizer_bytes * share(stage >= 1)}
