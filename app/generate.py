"""Sample text from a trained checkpoint, streaming tokens to the terminal.

    python -m app.generate checkpoint=runs/2026-11-22_05-10-00 prompt="ROMEO:" temperature=0.8 top_k=50
    python -m app.generate checkpoint=runs/.../checkpoints/step-000200 greedy=true max_new_tokens=50
"""
import torch
from transformers import TextStreamer

from app import checkpoint, cli, config, tokenizer


@torch.no_grad()
def generate_text(model, tok, prompt: str, max_new_tokens: int, temperature: float, top_k: int,
                  top_p: float = 1.0, greedy: bool = False, seed: int = 0, stream: bool = False) -> str:
    """Temperature / top-k / top-p sampling (or greedy decoding), reproducible by seed."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    input_ids = tok(prompt, return_tensors="pt").input_ids.to(device)
    torch.manual_seed(seed)
    sampling = {} if greedy else {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    output = model.generate(
        input_ids, max_new_tokens=max_new_tokens, do_sample=not greedy, pad_token_id=tok.eos_token_id,
        streamer=TextStreamer(tok, skip_special_tokens=True) if stream else None, **sampling,
    )
    model.train(was_training)
    return tok.decode(output[0], skip_special_tokens=True)


def main_with(cfg) -> str:
    found = checkpoint.find(cfg.checkpoint)
    model = checkpoint.load_trained_model(found)
    tok = tokenizer.load(checkpoint.tokenizer_dir(found))
    return generate_text(model, tok, cfg.prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                         cfg.greedy, cfg.seed, stream=cfg.stream)


def main() -> None:
    cli.run_tool(config.GenerateConfig, lambda cfg: main_with(cfg) if cfg.stream else print(main_with(cfg)))


if __name__ == "__main__":
    main()
