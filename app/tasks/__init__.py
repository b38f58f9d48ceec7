"""What is trained: each task owns its data stream, model, loss and evaluation, so the loop
in app/train.py is the same for a LLaMA decoder and a BERT encoder."""


def build(cfg, rank: int, world: int, split: str = "val"):
    """The task of cfg.task, evaluating on `split` of the prepared data."""
    if cfg.task == "clm":
        from app.tasks.clm import CausalLM

        return CausalLM(cfg, rank, world, split)
    from app.tasks.encoder import Classify, MaskedLM

    return {"classify": Classify, "mlm": MaskedLM}[cfg.task](cfg, rank, world, split)
