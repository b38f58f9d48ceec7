"""Run under a launcher: each rank records which token windows it trains on for a few steps;
rank 0 gathers them into a JSON file for the test to check."""
import json
import sys
from pathlib import Path

from app import data, dist

data_dir, out_path, steps = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
dist.init()
meta = json.loads((data_dir / "meta.json").read_text())
windows = data.TokenWindows(data.split_tokens(data_dir, meta, "train"), seq_len=32, seed=7)
stream = data.RankStream(windows, dist.rank(), dist.size(), micro_batch=3, accum_steps=2)
starts = []
for step in range(steps):
    for micro in range(stream.accum_steps):
        first = step * stream.global_batch + dist.rank() * stream.per_rank + micro * stream.micro_batch
        inputs, _ = stream.micro_batch_at(step * stream.global_batch, micro)
        window_starts = windows.window_starts(first, stream.micro_batch)
        # The batch really holds the tokens at those starts.
        tokens = windows.tokens
        assert all((inputs[i].numpy() == tokens[s : s + 32]).all() for i, s in enumerate(window_starts))
        starts.append([step, micro, window_starts.tolist()])
gathered = dist.allgather_object({"rank": dist.rank(), "starts": starts}, name="starts")
if dist.is_main():
    Path(out_path).write_text(json.dumps(gathered))
