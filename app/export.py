"""Export a checkpoint as a Hugging Face directory that plain transformers loads.

    python -m app.export checkpoint=runs/2026-11-22_05-10-00 out=exported/shakespeare-14m
    # then, with no project code:
    #   AutoModelForCausalLM.from_pretrained("exported/shakespeare-14m")
    #   AutoTokenizer.from_pretrained("exported/shakespeare-14m")
"""
import torch

from app import checkpoint, cli, config, fileio, tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export(cfg) -> None:
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype={cfg.dtype!r} is not one of {', '.join(DTYPES)}")
    found = checkpoint.find(cfg.checkpoint)
    model = checkpoint.load_trained_model(found).to(DTYPES[cfg.dtype])
    tok = tokenizer.load(checkpoint.tokenizer_dir(found))
    with fileio.staged_directory(cfg.out) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tok.save_pretrained(staging)
    print(f"exported {found} -> {cfg.out}")


def main() -> None:
    cli.run_tool(config.ExportConfig, export)


if __name__ == "__main__":
    main()
